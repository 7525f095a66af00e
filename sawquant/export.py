"""Export: write a KV config into a Hugging Face checkpoint, atomically, never touching the source.

``export_checkpoint(source, config, out)`` builds OUT as a complete checkpoint:

* every file of the source (weights, tokenizer, generation config...) hard-linked into OUT, or
  copied when a link is impossible (another filesystem); nothing ever opens a linked file for
  writing, so the source cannot change;
* the envelope ``sawquant.checkpoint`` defines: ``sawquant_kv.json`` and a ``config.json`` that
  is the source's plus the ``kv_cache_quantization`` key (every other key, an existing weight
  ``quantization_config`` included, is kept as it is);
* with ``fold_values=True`` the V rotations folded into v_proj/o_proj (``sawquant.fold``).

Before anything is written, every safetensors weight is read once and must be finite, and a
symlink in the source may only point inside the checkpoint (or, for a Hub cache snapshot, into
that repository's ``blobs``): an export never pulls in a file from elsewhere on disk.

Atomicity: OUT is built in a hidden temporary directory next to it (same filesystem) and renamed
into place at the end, so an export that fails or is interrupted (Ctrl-C, SIGTERM through the
CLI) leaves no OUT. A temporary directory left by a process that was killed outright carries its
host and pid, and the next export to the same OUT removes it once that process is gone.

``force`` replaces only an earlier sawquant export (a directory carrying the envelope) or an
empty directory, never anything else: the old OUT is moved aside and deleted only after the new
one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sawquant.checkpoint import CONFIG_KEY, KV_CONFIG_FILE, envelope, is_export, read_config_json
from sawquant.config import KVConfig, ModelFacts
from sawquant.errors import ConfigError, InputError, UnsupportedModelError
from sawquant.fileio import describe_os_error
from sawquant.fold import fold_value_rotation, folded_config, plan_fold, write_folded_shard
from sawquant.weights import check_weights as check_source_weights
from sawquant.weights import weight_map

__all__ = ["ExportResult", "export_checkpoint", "fold_value_rotation"]

# Written by export itself, so never carried over from the source (a re-export replaces them).
_GENERATED = {"config.json", KV_CONFIG_FILE}
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote. Paths are relative to ``out``."""

    source: Path
    out: Path
    config: KVConfig  # as written to sawquant_kv.json
    linked: tuple[str, ...] = ()  # hard links to the source's files
    copied: tuple[str, ...] = ()  # copies (no hard link possible across filesystems)
    rewritten: tuple[str, ...] = ()  # weight shards rewritten with folded v_proj/o_proj
    written: tuple[str, ...] = ()  # config.json, sawquant_kv.json
    folded_layers: tuple[int, ...] = ()
    warnings: tuple[str, ...] = ()
    weights_checked: int = 0  # tensors read and found finite before writing


# -- reading inputs ------------------------------------------------------------------------------
def _resolve_source(source: str | Path | None) -> Path:
    if source is None:
        from sawquant.demo import demo_checkpoint_dir

        return Path(demo_checkpoint_dir()).resolve()
    from sawquant.offline import resolve_model

    path = resolve_model(source)
    if not path.is_dir():
        raise InputError(f"model {source} is not a checkpoint directory; give a local HF model dir")
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json; give a Hugging Face checkpoint directory")
    return path.resolve()


def _model_facts(source: Path) -> tuple[ModelFacts, int]:
    """(facts the KV config must match, number of query heads) from the source's config.json."""
    from transformers import AutoConfig

    from sawquant.architectures import check_supported, text_config

    try:
        hf_config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UnsupportedModelError(
            f"transformers cannot read {source}/config.json ({first}); use a supported model"
        ) from None
    # check_supported: a KV config only makes sense for a decoder-only causal LM we can serve.
    return check_supported(hf_config), int(text_config(hf_config).num_attention_heads)


def _check_paths(source: Path, out: Path, force: bool, protect: Iterable[Path]) -> None:
    real = out.resolve()
    if real == source or real.is_relative_to(source):
        raise InputError(
            f"output {out} is inside the source checkpoint; choose a directory outside"
        )
    if source.is_relative_to(real):
        raise InputError(f"output {out} contains the source checkpoint; choose another directory")
    if out.is_symlink():
        raise InputError(f"output {out} is a symlink; give the real directory path")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory; choose another path")
    if not any(out.iterdir()):
        return
    if not force:
        raise InputError(
            f"output {out} is not empty; choose a new or empty directory (--force replaces only "
            "an earlier sawquant export)"
        )
    if not is_export(out):
        raise InputError(
            f"output {out} is not an earlier sawquant export (no {KV_CONFIG_FILE} named by its "
            "config.json), so --force will not replace it; choose a new or empty directory"
        )
    cwd = Path.cwd().resolve()
    if cwd == real or cwd.is_relative_to(real):
        raise InputError(
            f"output {out} holds the current directory; run export from elsewhere or choose "
            "another output"
        )
    for path in protect:
        if Path(path).resolve().is_relative_to(real):
            raise InputError(
                f"{path} is inside the output {out}, which --force would replace; move it out "
                "first or choose another output"
            )


# -- temporary directories -----------------------------------------------------------------------
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
_LEFTOVER = re.compile(
    r"\.sawquant-(?:tmp|old)-(?:(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)-)?[0-9a-f]+$"
)


def _work_dir(out: Path, kind: str) -> Path:
    """A hidden sibling of OUT that names this host and process (for stale-directory cleanup)."""
    return out.with_name(
        f".{out.name}.sawquant-{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_leftovers(out: Path) -> list[str]:
    """Delete the temporary directories earlier exports to OUT left when they were killed.

    Only directories of this host whose process is gone are touched (or, for names without a
    pid from older sawquant versions, ones untouched for an hour).
    """
    removed = []
    prefix = f".{out.name}.sawquant-"
    if not out.parent.is_dir():
        return removed
    for path in out.parent.iterdir():
        if not path.name.startswith(prefix) or not path.is_dir():
            continue
        m = _LEFTOVER.search(path.name[len(out.name) + 1 :])
        if m is None:
            continue
        if m["pid"] is not None:
            stale = m["host"] == _HOST and not _alive(int(m["pid"]))
        else:
            stale = time.time() - path.stat().st_mtime > 3600
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


# -- the source's files --------------------------------------------------------------------------
def _allowed_roots(source: Path) -> list[Path]:
    """Where a symlink of the source may point: the checkpoint itself, and for a Hub cache
    snapshot (``.../models--org--name/snapshots/<rev>``) that repository's ``blobs``."""
    roots = [source]
    if source.parent.name == "snapshots":
        roots.append((source.parent.parent / "blobs").resolve())
    return roots


def _source_files(source: Path) -> list[Path]:
    """Every file of the checkpoint, relative, skipping hidden entries (.git, .cache).

    Symlinks are followed only inside the allowed roots; a loop or a link that points elsewhere
    is refused with one line.
    """
    roots = _allowed_roots(source)
    files: list[Path] = []
    seen: set[str] = set()

    def inside(real: str) -> bool:
        return any(Path(real).is_relative_to(r) for r in roots)

    def walk(directory: Path) -> None:
        real = os.path.realpath(directory)
        if real in seen:
            raise InputError(
                f"{directory} is a symlink loop inside the checkpoint; remove the link"
            )
        seen.add(real)
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                target = os.path.realpath(path)
                if not os.path.exists(target):
                    raise InputError(f"{path} is a broken or looping symlink; fix or remove it")
                if not inside(target):
                    raise InputError(
                        f"{path} is a symlink to {target}, outside the checkpoint; copy the "
                        "file into the checkpoint or remove the link"
                    )
            if entry.is_dir(follow_symlinks=True):
                walk(path)
            elif entry.is_file(follow_symlinks=True):
                files.append(path.relative_to(source))

    walk(source)
    return files


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link src (following symlinks, e.g. HF cache snapshots) to dst; copy if impossible."""
    try:
        # realpath, not follow_symlinks=True: some platforms still link the symlink itself,
        # and a hard link to a relative symlink would dangle in OUT.
        os.link(os.path.realpath(src), dst)
        return True
    except OSError:
        shutil.copy2(src, dst)
        _fsync(dst)
        return False


def _is_weight_file(rel: Path) -> bool:
    """Weights another loader might read (consolidated.safetensors, pytorch_model.bin...)."""
    name = rel.name
    return name.endswith(".safetensors") or (
        name.startswith(("pytorch_model", "consolidated")) and name.endswith((".bin", ".pth"))
    )


def _build(
    source: Path, tmp: Path, files: list[Path], config: KVConfig, hf_json: dict, plan: dict
) -> tuple[list[str], list[str], list[str], list[str]]:
    linked, copied, rewritten = [], [], []
    for rel in files:
        if str(rel) in _GENERATED:
            continue
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if str(rel) in plan:
            write_folded_shard(source / rel, dst, plan[str(rel)])
            rewritten.append(str(rel))
        elif _link_or_copy(source / rel, dst):
            linked.append(str(rel))
        else:
            copied.append(str(rel))
    hf_json = dict(hf_json)
    hf_json[CONFIG_KEY] = envelope(config)
    _write_text(tmp / KV_CONFIG_FILE, config.to_json() + "\n")
    _write_text(tmp / "config.json", json.dumps(hf_json, indent=2) + "\n")
    for d in sorted({tmp / rel.parent for rel in map(Path, linked + copied + rewritten)} | {tmp}):
        _fsync(d)
    return linked, copied, rewritten, ["config.json", KV_CONFIG_FILE]


def _swap_into_place(tmp: Path, out: Path) -> list[str]:
    """Rename the finished tmp dir to OUT; an existing OUT is deleted only once that succeeded."""
    warnings = []
    old = None
    try:
        if out.exists():
            if any(out.iterdir()):
                aside = _work_dir(out, "old")
                os.rename(out, aside)
                old = aside
            else:
                out.rmdir()
        os.rename(tmp, out)
    except BaseException:  # includes Ctrl-C between the two renames: put the old OUT back
        if old is not None and not out.exists():
            os.rename(old, out)
        raise
    _fsync(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():
            warnings.append(f"could not delete the replaced output {old}; delete it by hand")
    return warnings


# -- the entry point -----------------------------------------------------------------------------
def export_checkpoint(
    source: str | Path | None,
    config: KVConfig,
    out: str | Path,
    *,
    fold_values: bool = False,
    force: bool = False,
    protect: Iterable[str | Path] = (),
    check_weights: bool = True,
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``source`` plus the KV ``config`` to ``out`` as a complete checkpoint (see module doc).

    ``source`` None = the demo checkpoint; an offline model's name (``gemma3-270m``) = its
    converted copy. ``force`` replaces an earlier sawquant export (never
    another directory); ``protect`` lists paths that must survive (the calibration file the
    config was read from). ``check_weights`` reads every safetensors weight once first
    (``progress("weights", done, total)`` per shard). Raises InputError (paths, a non-empty
    OUT, unreadable or non-finite weights, quantized weights with ``fold_values``, a write
    that fails), ConfigError (a config made for another model shape) or UnsupportedModelError
    (folding an architecture without separate v/o_proj).
    """
    src = _resolve_source(source)
    out = Path(os.path.abspath(Path(out).expanduser()))  # not resolved: a symlink stays visible
    _check_paths(src, out, force, [Path(p) for p in protect])
    if config.values_folded:
        raise ConfigError(
            "this KV config has values_folded=true (it comes from an exported checkpoint); "
            "export with the calibration output instead"
        )
    facts, num_q_heads = _model_facts(src)
    config.check_model(facts.num_layers, facts.num_kv_heads, facts.head_dim)
    warnings = []
    if config.model.model_type and facts.model_type and config.model.model_type != facts.model_type:
        warnings.append(
            f"config was calibrated on a {config.model.model_type!r} model, the source is "
            f"{facts.model_type!r} (same shape, so it is accepted)"
        )
    hf_json = read_config_json(src)
    files = _source_files(src)  # refuses loops and links out of the checkpoint, before writing
    plan, folded_layers = {}, []
    if fold_values:
        plan, folded_layers = plan_fold(src, config, hf_json, num_q_heads)
        config = folded_config(config)
        indexed = set((weight_map(src) or {}).values())
        stray = [str(p) for p in files if _is_weight_file(p) and str(p) not in indexed]
        if stray and folded_layers:
            warnings.append(
                f"weight files outside the HF index were linked unfolded: {', '.join(stray)}; "
                "delete them from the output if another engine would load them"
            )
    checked = 0
    if check_weights:
        step = None if progress is None else (lambda d, t: progress("weights", d, t))
        checked, _ = check_source_weights(src, step)
    _remove_leftovers(out)
    tmp = _work_dir(out, "tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # os.mkdir (not mkdtemp, which makes it private) so OUT gets the usual umask permissions.
        os.mkdir(tmp)
        linked, copied, rewritten, written = _build(src, tmp, files, config, hf_json, plan)
        warnings += _swap_into_place(tmp, out)
    except OSError as err:
        raise InputError(f"cannot write the export to {out}: {describe_os_error(err)}") from err
    finally:
        if tmp.exists():  # failed or interrupted (Ctrl-C, SIGTERM via the CLI): nothing stays
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(
        source=src,
        out=out,
        config=config,
        linked=tuple(linked),
        copied=tuple(copied),
        rewritten=tuple(rewritten),
        written=tuple(written),
        folded_layers=tuple(folded_layers),
        warnings=tuple(warnings),
        weights_checked=checked,
    )
