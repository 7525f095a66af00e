"""Export: write a KV config into a Hugging Face checkpoint, atomically, never touching the source.

``export_checkpoint(source, config, out)`` builds OUT as a complete checkpoint:

* every file of the source (weights, tokenizer, generation config...) hard-linked into OUT, or
  copied when a link is impossible (another filesystem); nothing ever opens a linked file for
  writing, so the source cannot change;
* ``sawquant_kv.json``: the KV config (``KVConfig.to_json``);
* ``config.json``: the source's, plus the top-level key ``"kv_cache_quantization": {"method":
  "sawquant", "format_version": n, "config_file": "sawquant_kv.json"}``. Any other key, an
  existing weight ``quantization_config`` included, is kept as it is.

With ``fold_values=True`` each layer's value rotation R (``config.layers[i].v``) is folded into
the weights, and the written config says ``values_folded: true`` with identity V rotations, so the
runtime stores V exactly as the model produces it and never un-rotates. Per KV head h and query
head j (D = head_dim, rows/columns of that head only)::

    v'_h = v_h @ R           ->  W_v'[h] = R.T @ W_v[h]   ([D, hidden]),  b_v'[h] = b_v[h] @ R
    o_j' = o_j @ R (GQA)     ->  W_o'[:, j] = W_o[:, j] @ R   ([hidden, D]), so
    o_j' @ W_o'[:, j].T = o_j @ R @ R.T @ W_o[:, j].T = o_j @ W_o[:, j].T   (R orthonormal)

The softmax weights only depend on q and k, so the attention output of head j is the
(rotated) mix of its KV head's rotated values and the model's output is unchanged in exact
arithmetic; the fold is computed in float64 and cast back to the checkpoint's dtype. Only the
safetensors shards holding a folded v_proj/o_proj are rewritten; the others stay hard links.

Atomicity: OUT is built in a hidden temporary directory next to it (same filesystem) and renamed
into place at the end. An export that fails or is interrupted leaves no OUT (a stale hidden
``.OUT.sawquant-tmp-*`` may remain after a hard kill; it can be deleted). With ``force`` an
existing OUT is moved aside first and deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sawquant.checkpoint import CONFIG_KEY, KV_CONFIG_FILE, envelope
from sawquant.config import KVConfig, LayerConfig, ModelFacts, SideConfig
from sawquant.errors import ConfigError, InputError, UnsupportedModelError
from sawquant.quant.hadamard import block_hadamard

__all__ = [
    "ExportResult",
    "export_checkpoint",
    "fold_value_rotation",
]

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
# Written by export itself, so never carried over from the source (a re-export replaces them).
_GENERATED = {"config.json", KV_CONFIG_FILE}


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


# -- reading inputs ------------------------------------------------------------------------------
def _resolve_source(source: str | Path | None) -> Path:
    if source is None:
        from sawquant.demo import demo_checkpoint_dir

        return Path(demo_checkpoint_dir()).resolve()
    path = Path(source).expanduser()
    if not path.is_dir():
        raise InputError(f"model {source} is not a checkpoint directory; give a local HF model dir")
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json; give a Hugging Face checkpoint directory")
    return path.resolve()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(
            f"cannot read {path} ({err}); repair or re-download the checkpoint"
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object; repair or re-download the checkpoint")
    return data


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


def _check_paths(source: Path, out: Path, force: bool) -> None:
    real = out.resolve()
    if real == source or real.is_relative_to(source):
        raise InputError(
            f"output {out} is inside the source checkpoint; choose a directory outside"
        )
    if source.is_relative_to(real):
        raise InputError(f"output {out} contains the source checkpoint; choose another directory")
    if out.is_symlink():
        raise InputError(f"output {out} is a symlink; give the real directory path")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"output {out} exists and is not a directory; choose another path")
        if any(out.iterdir()) and not force:
            raise InputError(f"output {out} is not empty; pass --force to replace it")


# -- folding -------------------------------------------------------------------------------------
def _needs_fold(side: SideConfig) -> bool:
    return side.rotation_block != 1 or side.sign_seed is not None


# Each tensor folds on its own (W_v', b_v' and W_o' each depend only on their own tensor and R),
# so shards stream one at a time: memory is one shard, never the whole model.
def _fold_v_weight(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # w: [H_kv * D, hidden] -> per KV head R.T @ W_v[h], in float64
    d = r.shape[0]
    wv = w.to(torch.float64).reshape(-1, d, w.shape[-1])  # [H_kv, D, hidden]
    return torch.einsum("de,hdi->hei", r.to(torch.float64), wv).reshape(w.shape)


def _fold_v_bias(b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # b: [H_kv * D] -> per KV head b_v[h] @ R
    d = r.shape[0]
    return (b.to(torch.float64).reshape(-1, d) @ r.to(torch.float64)).reshape(b.shape)


def _fold_o_weight(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # w: [hidden, H_q * D] -> per query head W_o[:, j] @ R
    d = r.shape[0]
    wo = w.to(torch.float64).reshape(w.shape[0], -1, d)  # [hidden, H_q, D]
    return (wo @ r.to(torch.float64)).reshape(w.shape)


_FOLDERS = {
    "v_proj.weight": _fold_v_weight,
    "v_proj.bias": _fold_v_bias,
    "o_proj.weight": _fold_o_weight,
}


def fold_value_rotation(
    w_v: torch.Tensor,
    b_v: torch.Tensor | None,
    w_o: torch.Tensor,
    r: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Fold the value rotation R into one layer's v_proj and o_proj, in float64.

    w_v: [H_kv * D, hidden] (nn.Linear layout), b_v: [H_kv * D] or None, w_o: [hidden, H_q * D],
    r: [D, D] orthonormal. Returns (w_v', b_v', w_o') in float64 such that the projected values
    become ``v @ R`` per KV head and ``o_proj`` maps rotated head outputs to the same result.
    Equivalent to ``W_v'[h] = R.T @ W_v[h]``, ``b_v'[h] = b_v[h] @ R`` per KV head h and
    ``W_o'[:, j] = W_o[:, j] @ R`` per query head j.
    """
    b_new = None if b_v is None else _fold_v_bias(b_v, r)
    return _fold_v_weight(w_v, r), b_new, _fold_o_weight(w_o, r)


def _probe_fold(part: str, old: torch.Tensor, new: torch.Tensor, r: torch.Tensor, where: str):
    """Check in float64 on random inputs that a folded tensor does what the rotation promises."""
    r = r.to(torch.float64)
    d = r.shape[0]
    old, new = old.to(torch.float64), new.to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    if part == "v_proj.bias":
        got, want = new.reshape(-1, d), old.reshape(-1, d) @ r
    else:
        x = torch.randn(4, old.shape[-1], generator=gen, dtype=torch.float64)  # [4, in]
        if part == "v_proj.weight":  # x @ W_v'.T == (x @ W_v.T) @ R per KV head
            got, want = (x @ new.T).reshape(4, -1, d), (x @ old.T).reshape(4, -1, d) @ r
        else:  # rotated head outputs through W_o' == plain ones through W_o
            got = ((x.reshape(4, -1, d) @ r).reshape(4, -1)) @ new.T
            want = x @ old.T
    if not torch.allclose(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max() + 1)):
        raise RuntimeError(f"internal error: value folding check failed for {where}")


def _apply_fold(name: str, tensor: torch.Tensor, fold: tuple[str, torch.Tensor]) -> torch.Tensor:
    """The folded tensor in the original dtype (float64 math, one final rounding)."""
    part, r = fold
    new = _FOLDERS[part](tensor, r)
    _probe_fold(part, tensor, new, r, name)
    return new.to(tensor.dtype).contiguous()


def _attention_names(model_type: str, weight_names: set[str], num_layers: int) -> list[str]:
    """The safetensors prefix of each layer's attention (``...self_attn``), or a clear error."""
    from sawquant.architectures import ARCHITECTURES

    arch = ARCHITECTURES.get(model_type)
    if arch is None or not arch.foldable:
        foldable = sorted(t for t, a in ARCHITECTURES.items() if a.foldable)
        raise UnsupportedModelError(
            f"--fold-values does not know where v_proj/o_proj live in model type {model_type!r} "
            f"(supported: {', '.join(foldable)}); export without --fold-values"
        )
    for prefix in arch.attention_prefixes:
        names = [prefix.format(i=i) for i in range(num_layers)]
        if all(f"{n}.v_proj.weight" in weight_names for n in names):
            if all(f"{n}.o_proj.weight" in weight_names for n in names):
                return names
    raise UnsupportedModelError(
        f"no separate v_proj/o_proj weights found for model type {model_type!r} (fused qkv?); "
        "export without --fold-values"
    )


def _weight_map(source: Path) -> dict[str, str] | None:
    """tensor name -> safetensors file (relative), or None if the weights are not safetensors."""
    index = source / _INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index} has no weight_map; repair or re-download the checkpoint")
        return {str(k): str(v) for k, v in weight_map.items()}
    single = source / _SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), _SINGLE_FILE)
    return None


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _plan_fold(
    source: Path, config: KVConfig, hf_json: dict, num_q_heads: int
) -> tuple[dict[str, dict[str, tuple[str, torch.Tensor]]], list[int]]:
    """What to fold where: {shard file: {tensor name: (part, R)}}, and the folded layers.

    Reads only tensor headers (shapes, dtypes), so every refusal happens before any write.
    """
    from safetensors import safe_open

    for key in ("quantization_config", "compression_config"):
        if key in hf_json or key in (hf_json.get("text_config") or {}):
            raise InputError(
                f"the source weights are quantized ({key} in config.json) and cannot be folded; "
                "export without --fold-values"
            )
    layers = [i for i, layer in enumerate(config.layers) if _needs_fold(layer.v)]
    if not layers:
        return {}, []
    weight_map = _weight_map(source)
    if weight_map is None:
        raise InputError(
            f"{source} has no safetensors weights; --fold-values needs model.safetensors "
            "(re-save with save_pretrained) or export without --fold-values"
        )
    # The top-level type names the weight layout (a multimodal wrapper nests the text model).
    model_type = str(hf_json.get("model_type", ""))
    prefixes = _attention_names(model_type, set(weight_map), config.model.num_layers)
    d, h_kv = config.model.head_dim, config.model.num_kv_heads
    want_shape = {
        "v_proj.weight": lambda s: len(s) == 2 and s[0] == h_kv * d,
        "v_proj.bias": lambda s: list(s) == [h_kv * d],
        "o_proj.weight": lambda s: len(s) == 2 and s[1] == num_q_heads * d,
    }
    plan: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for i in layers:
        side = config.layers[i].v
        r = block_hadamard(d, side.rotation_block, seed=side.sign_seed, dtype=torch.float64)
        for part, ok in want_shape.items():
            name = f"{prefixes[i]}.{part}"
            if name not in weight_map:  # only a bias may be absent (checked above for weights)
                continue
            if not (source / weight_map[name]).is_file():
                raise InputError(
                    f"{source} index names {weight_map[name]} for {name}, but that file is "
                    "missing; re-download the checkpoint"
                )
            with safe_open(str(source / weight_map[name]), framework="pt") as f:
                info = f.get_slice(name)
                shape, dtype = info.get_shape(), info.get_dtype()
            if dtype not in _FLOAT_DTYPES:
                raise InputError(
                    f"{name} is {dtype}, not floating point (quantized weights?); "
                    "export without --fold-values"
                )
            if not ok(shape):
                raise UnsupportedModelError(
                    f"{name} has shape {list(shape)}, which does not match {h_kv} KV heads / "
                    f"{num_q_heads} query heads of head_dim {d}; export without --fold-values"
                )
            plan.setdefault(weight_map[name], {})[name] = (part, r)
    return plan, layers


def _folded_config(config: KVConfig) -> KVConfig:
    """values_folded=True and identity V rotations: no consumer can rotate V a second time."""
    identity = [
        LayerConfig(k=layer.k, v=replace(layer.v, rotation_block=1, sign_seed=None))
        for layer in config.layers
    ]
    return replace(config, layers=tuple(identity), values_folded=True)


# -- writing -------------------------------------------------------------------------------------
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


def _write_shard(src: Path, dst: Path, folds: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Write a copy of safetensors file ``src`` to ``dst`` with the ``folds`` applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        tensors = {}
        for name in f.keys():
            tensor = f.get_tensor(name)
            tensors[name] = _apply_fold(name, tensor, folds[name]) if name in folds else tensor
    save_file(tensors, str(dst), metadata=metadata)
    shutil.copymode(src, dst)  # same permissions as the linked files beside it
    _fsync(dst)


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


def _source_files(source: Path) -> list[Path]:
    """Every file of the checkpoint, relative, skipping hidden entries (.git, .cache)."""
    files = []
    for root, dirs, names in os.walk(source, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                files.append((Path(root) / name).relative_to(source))
    return files


def _build(
    source: Path, tmp: Path, config: KVConfig, hf_json: dict, plan: dict
) -> tuple[list[str], list[str], list[str], list[str]]:
    linked, copied, rewritten = [], [], []
    for rel in _source_files(source):
        if str(rel) in _GENERATED:
            continue
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if str(rel) in plan:
            _write_shard(source / rel, dst, plan[str(rel)])
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
                aside = out.with_name(f".{out.name}.sawquant-old-{uuid.uuid4().hex[:8]}")
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
) -> ExportResult:
    """Write ``source`` plus the KV ``config`` to ``out`` as a complete checkpoint (see module doc).

    ``source`` None = the demo checkpoint. Raises InputError (paths, non-empty OUT without
    ``force``, quantized weights with ``fold_values``), ConfigError (a config made for another
    model shape) or UnsupportedModelError (folding an architecture without separate v/o_proj).
    """
    src = _resolve_source(source)
    out = Path(os.path.abspath(Path(out).expanduser()))  # not resolved: a symlink stays visible
    _check_paths(src, out, force)
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
    hf_json = _read_json(src / "config.json")
    plan, folded_layers = {}, []
    if fold_values:
        plan, folded_layers = _plan_fold(src, config, hf_json, num_q_heads)
        config = _folded_config(config)
        indexed = set((_weight_map(src) or {}).values())
        stray = [str(p) for p in _source_files(src) if _is_weight_file(p) and str(p) not in indexed]
        if stray and folded_layers:
            warnings.append(
                f"weight files outside the HF index were linked unfolded: {', '.join(stray)}; "
                "delete them from the output if another engine would load them"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not mkdtemp, which makes it private) so OUT gets the usual umask permissions.
    tmp = out.with_name(f".{out.name}.sawquant-tmp-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        linked, copied, rewritten, written = _build(src, tmp, config, hf_json, plan)
        warnings += _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    )
