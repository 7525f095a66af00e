"""sawquant: serve Hugging Face LLMs with a calibrated 4-bit KV cache.

Heavy imports (transformers, the runtime) happen on first use, so ``import sawquant`` is cheap.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sawquant")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__", "from_pretrained", "patch"]


def __getattr__(name: str):
    if name in ("from_pretrained", "patch"):
        from sawquant import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'sawquant' has no attribute {name!r}")
