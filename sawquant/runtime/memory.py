"""KV-cache memory per token: what a config stores, next to what a BF16 cache would.

Counts every byte a token costs in the paged cache: INT4 codes, the fp16 scale and zero of
each group, the INT8/BF16 fallback pools, and the block table (one int32 per page per sequence,
shared by all layers, i.e. 4 / page_size bytes per token).
"""

from __future__ import annotations

from dataclasses import dataclass

from sawquant.config import KVConfig
from sawquant.format import PoolSpec

__all__ = ["KVMemory", "kv_memory"]


@dataclass(frozen=True)
class KVMemory:
    """Bytes one cached token occupies, over all layers, K and V together."""

    bytes_per_token: float  # pools (codes, scales, zeros, fallbacks) + block table
    bf16_bytes_per_token: int  # the same token in a BF16 cache
    per_layer: tuple[int, ...]  # pool bytes per token of each layer (K + V)
    block_table_bytes_per_token: float

    @property
    def ratio(self) -> float:
        """bytes_per_token / bf16_bytes_per_token (0.266 for plain INT4 at head_dim 128)."""
        return self.bytes_per_token / self.bf16_bytes_per_token

    def tokens_in(self, budget_bytes: int) -> int:
        """How many tokens fit in ``budget_bytes`` of KV memory."""
        return int(budget_bytes // self.bytes_per_token)


def kv_memory(config: KVConfig, *, page_size: int = 16) -> KVMemory:
    """Per-token KV memory of ``config`` (16-bit fallback pools counted at 2 bytes)."""
    m = config.model
    per_layer = []
    for layer in config.layers:
        total = 0
        for side in (layer.k, layer.v):
            bits = side.head_bits(m.num_kv_heads)
            for b in set(bits):
                spec = PoolSpec(1, page_size, bits.count(b), m.head_dim, b, side.group_size)
                total += spec.bytes_per_token()
        per_layer.append(total)
    table = 4 / page_size
    return KVMemory(
        bytes_per_token=sum(per_layer) + table,
        bf16_bytes_per_token=2 * m.num_layers * m.num_kv_heads * m.head_dim * 2,
        per_layer=tuple(per_layer),
        block_table_bytes_per_token=table,
    )
