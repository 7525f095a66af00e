"""Load-time runtime: an engine-agnostic core and thin adapters per engine.

Core (no engine import): ``pages`` (the page allocator of sawquant's own runtime), ``layer``
(one layer's K/V stores and their kernel plans), ``dispatch`` (Triton kernels or torch twins),
``memory`` (bytes per token). Adapters: ``hf`` (transformers: the Cache subclass, the attention
function, ``patch`` / ``from_pretrained``) and ``vllm`` (the vLLM plugin).

The names below are the public API; they import transformers on first use only.
"""

from __future__ import annotations

from typing import Any

from sawquant.checkpoint import CONFIG_KEY, KV_CONFIG_FILE, read_kv_config
from sawquant.runtime.memory import KVMemory, kv_memory
from sawquant.runtime.pages import CacheFullError

__all__ = [
    "CONFIG_KEY",
    "KV_CONFIG_FILE",
    "CacheFullError",
    "KVMemory",
    "SawquantCache",
    "from_pretrained",
    "is_patched",
    "kv_memory",
    "patch",
    "read_kv_config",
    "unpatch",
]

_HF = {"SawquantCache": "cache", "from_pretrained": "patch", "is_patched": "patch",
       "patch": "patch", "unpatch": "patch"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _HF:
        import importlib

        return getattr(importlib.import_module(f"sawquant.runtime.hf.{_HF[name]}"), name)
    raise AttributeError(f"module 'sawquant.runtime' has no attribute {name!r}")
