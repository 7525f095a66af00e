"""sawquant's pages inside an engine's opaque KV blocks.

Serving engines (vLLM) allocate the KV cache themselves as fixed-size blocks of bytes, one
tensor per layer, and own the block table and slot numbering. :class:`BlockLayout` says how one
layer's K and V pools sit inside such a block (each pool a contiguous region of the block, its
heads head-major inside it, exactly the page layout of ``sawquant.format``), how many bytes a
token costs, and builds the :class:`LayerKV` whose pool tensors are strided views into the
engine's buffer: the same write and attention code (kernels or twins) then runs on the engine's
memory. Engine-agnostic: no engine import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sawquant.config import LayerConfig, ModelFacts
from sawquant.format import Pool, PoolSpec, SideStore
from sawquant.runtime.layer import LayerKV, make_side_store

__all__ = ["BlockLayout"]

_ALIGN = 16  # every region starts 16-byte aligned (the kernels' vector loads)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class _Region:
    side: str  # "k" or "v"
    bits: int  # the pool
    field: str  # codes, scale, zero
    offset: int  # bytes from the block start
    shape: tuple[int, int, int]  # [pool heads, block_size, per-token elements]
    dtype: torch.dtype


@dataclass(frozen=True)
class BlockLayout:
    """One layer's pools inside a block of ``block_size`` tokens."""

    block_size: int
    regions: tuple[_Region, ...]
    block_bytes: int

    @property
    def bytes_per_token(self) -> int:
        """Bytes a token costs in this layer (block bytes / block size; padding included)."""
        return self.block_bytes // self.block_size

    @classmethod
    def build(
        cls,
        layer: LayerConfig,
        facts: ModelFacts,
        *,
        block_size: int,
        dtype: torch.dtype,
        values_folded: bool = False,
    ) -> BlockLayout:
        """The layout of ``layer`` (16-bit pools stored in ``dtype``, the model's)."""
        regions, offset = [], 0
        for name, side in (("k", layer.k), ("v", layer.v)):
            bits = side.head_bits(facts.num_kv_heads)
            for b in sorted(set(bits)):
                spec = PoolSpec(1, block_size, bits.count(b), facts.head_dim, b, side.group_size)
                fields = [("codes", spec.code_width, torch.uint8 if b != 16 else dtype)]
                if b != 16:
                    fields += [("scale", spec.num_groups, torch.float16),
                               ("zero", spec.num_groups, torch.float16)]  # fmt: skip
                for field, width, dt in fields:
                    shape = (spec.num_heads, block_size, width)
                    regions.append(_Region(name, b, field, offset, shape, dt))
                    size = shape[0] * shape[1] * shape[2] * torch.empty(0, dtype=dt).element_size()
                    offset += _aligned(size)
        # Whole tokens per block and bytes per token both integers: the engine divides by both.
        block_bytes = -(-offset // block_size) * block_size
        return cls(block_size, tuple(regions), block_bytes)

    def layer_kv(
        self,
        buffer: torch.Tensor,
        layer: LayerConfig,
        facts: ModelFacts,
        *,
        values_folded: bool = False,
    ) -> LayerKV:
        """A LayerKV whose pools are views of ``buffer`` ([num_blocks, >= block_bytes] bytes,
        any shape whose rows are the blocks): writing into it writes the engine's blocks."""
        num_blocks = buffer.shape[0]
        raw = buffer.reshape(num_blocks, -1).view(torch.uint8)
        if raw.shape[1] < self.block_bytes:
            raise ValueError(f"blocks of {raw.shape[1]} bytes, the layout needs {self.block_bytes}")
        row = raw.stride(0)  # bytes from one block to the next
        stores = {}
        for name, side in (("k", layer.k), ("v", layer.v)):
            # The side's metadata (heads per pool, rotation, signs, transforms), then its pools
            # replaced by views: a one-page store is cheap to make.
            store = make_side_store(
                side, num_kv_heads=facts.num_kv_heads, head_dim=facts.head_dim, num_pages=1,
                page_size=self.block_size, rotate=not (name == "v" and values_folded),
                device=buffer.device, dtype=self._dtype16(name),
            )  # fmt: skip
            pools = {}
            for bits, pool in store.pools.items():
                tensors = {}
                for r in self.regions:
                    if r.side == name and r.bits == bits:
                        tensors[r.field] = self._view(raw, row, r, num_blocks)
                spec = PoolSpec(num_blocks, self.block_size, pool.spec.num_heads,
                                facts.head_dim, bits, side.group_size)  # fmt: skip
                pools[bits] = Pool(spec, tensors["codes"], tensors.get("scale"),
                                   tensors.get("zero"))  # fmt: skip
            stores[name] = SideStore(
                store.num_kv_heads, store.head_dim, store.block, store.signs, pools,
                store.heads, center=store.center, smooth=store.smooth,
                inv_smooth=store.inv_smooth,
            )  # fmt: skip
        return LayerKV(k=stores["k"], v=stores["v"])

    def _dtype16(self, side: str) -> torch.dtype:
        for r in self.regions:
            if r.side == side and r.bits == 16:
                return r.dtype
        return torch.bfloat16

    @staticmethod
    def _view(raw: torch.Tensor, row: int, r: _Region, num_blocks: int) -> torch.Tensor:
        """[num_blocks, heads, block_size, width] view of one region, in its dtype."""
        size = torch.empty(0, dtype=r.dtype).element_size()
        if row % size or r.offset % size:
            raise ValueError("engine blocks are not aligned for this pool's dtype")
        typed = raw.view(r.dtype)  # [num_blocks, bytes / size]
        heads, tokens, width = r.shape
        return typed.as_strided(
            (num_blocks, heads, tokens, width),
            (row // size, tokens * width, width, 1),
            typed.storage_offset() + r.offset // size,
        )
