"""Load-time runtime: the paged INT4 KV cache, its attention function, and ``patch`` /
``from_pretrained`` that apply an exported KV config to a transformers model."""

from sawquant.runtime.cache import CacheFullError, SawquantCache
from sawquant.runtime.memory import KVMemory, kv_memory
from sawquant.runtime.patch import (
    CONFIG_KEY,
    KV_CONFIG_FILE,
    from_pretrained,
    is_patched,
    patch,
    read_kv_config,
    unpatch,
)

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
