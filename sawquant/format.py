"""The on-device KV storage format, versioned. Kernels, reference twins and memory reports all
read their shapes from here.

Layout ``sawquant-paged-v1`` (FORMAT_VERSION 1), for one layer and one side (K or V):

* Paging: the cache is ``num_pages`` fixed-size pages of ``page_size`` token slots. A sequence
  owns the pages listed in its row of the block table (int32 ``[batch, max_pages]``); token t of
  that sequence lives in page ``block_table[b, t // page_size]`` at offset ``t % page_size``. A
  write addresses slots directly: ``slot = page * page_size + offset`` (int64; -1 = skip).
* Heads are split by precision into pools that share the block table and the slot numbering.
  Each pool stores its heads head-major inside a page, so one KV head's page is contiguous
  (what the decode kernel reads):

  ==========  =====================================  ==========================================
  pool        ``codes``                              ``scale`` / ``zero``
  ==========  =====================================  ==========================================
  INT4        uint8 ``[P, H4, page, D // 2]``        fp16 ``[P, H4, page, D // g]`` each
  INT8        uint8 ``[P, H8, page, D]``             fp16 ``[P, H8, page, D // g]`` each
  BF16        model dtype ``[P, H16, page, D]``      none
  ==========  =====================================  ==========================================

  P = num_pages, page = page_size, D = head_dim, g = group size (D by default).
* INT4 nibble order: byte j of a row holds element 2j in its low nibble and element 2j+1 in
  its high nibble (``byte = q[2j] | q[2j+1] << 4``).
* Values are stored in the rotated basis (``x @ R``, see ``sawquant.quant.hadamard``) and
  quantized asymmetrically per token and head (``sawquant.quant.int4``): ``x = q * scale + zero``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sawquant.config import KVLayout, check_group

__all__ = [
    "FORMAT_VERSION",
    "KVLayout",
    "Pool",
    "PoolSpec",
    "SideStore",
    "allocate_pool",
    "allocate_side",
]

# The in-memory page layout (not persisted: a checkpoint stores the config, and the runtime lays
# out pages as this version says). Its name is the config's ``layout``.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PoolSpec:
    """One pool: the heads of one layer side stored at one precision."""

    num_pages: int
    page_size: int
    num_heads: int
    head_dim: int
    bits: int  # 4, 8 or 16
    group_size: int | None = None  # None: one scale/zero per token and head

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16):
            raise ValueError(f"pool bits must be 4, 8 or 16, got {self.bits}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even")
        check_group(self.head_dim, self.group_size)

    @property
    def groups_divisor(self) -> int:
        return self.head_dim if self.group_size is None else self.group_size

    @property
    def num_groups(self) -> int:
        return self.head_dim // self.groups_divisor

    @property
    def code_width(self) -> int:
        """Elements in the last dim of ``codes``."""
        return self.head_dim // 2 if self.bits == 4 else self.head_dim

    def bytes_per_token_head(self, dtype_bytes: int = 2) -> int:
        """Bytes one token of one head occupies, scales and zeros included."""
        if self.bits == 16:
            return self.head_dim * dtype_bytes
        return self.code_width + 2 * 2 * self.num_groups

    def bytes_per_token(self) -> int:
        return self.num_heads * self.bytes_per_token_head()


@dataclass
class Pool:
    """The tensors of one pool. ``scale``/``zero`` are None for the BF16 pool."""

    spec: PoolSpec
    codes: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.codes, self.scale, self.zero)
            if t is not None
        )


def allocate_pool(
    spec: PoolSpec, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> Pool:
    """Allocate an empty pool. ``dtype`` is the storage dtype of a BF16 (16-bit) pool."""
    p, h, s = spec.num_pages, spec.num_heads, spec.page_size
    if spec.bits == 16:
        return Pool(
            spec, torch.zeros(p, h, s, spec.head_dim, dtype=dtype, device=device), None, None
        )
    codes = torch.zeros(p, h, s, spec.code_width, dtype=torch.uint8, device=device)
    scale = torch.zeros(p, h, s, spec.num_groups, dtype=torch.float16, device=device)
    zero = torch.zeros(p, h, s, spec.num_groups, dtype=torch.float16, device=device)
    return Pool(spec, codes, scale, zero)


@dataclass
class SideStore:
    """Everything stored for one side (K or V) of one layer: its pools and how heads map to them.

    ``pools[bits]`` holds the heads listed in ``heads[bits]`` (int32 on the pool's device, in
    pool order: pool head i is KV head ``heads[bits][i]``). Every KV head is in exactly one pool.
    ``block``/``signs`` are the rotation applied before storing (block 1 and None: none); the
    16-bit pool stores rotated vectors too, so every pool shares one basis.
    """

    num_kv_heads: int
    head_dim: int
    block: int
    signs: torch.Tensor | None  # float32 [head_dim] of +-1 on the pool device, or None
    pools: dict[int, Pool]
    heads: dict[int, torch.Tensor]
    # Exact transforms before the rotation: x is stored as rotate((x - center) * inv_smooth).
    center: torch.Tensor | None = None  # float32 [H_kv, D] on the pool device
    smooth: torch.Tensor | None = None  # float32 [H_kv, D] > 0 (what the read side multiplies)
    inv_smooth: torch.Tensor | None = None  # float32 1 / smooth, computed once (write side)

    def __post_init__(self) -> None:
        seen = sorted(h for t in self.heads.values() for h in t.tolist())
        if seen != list(range(self.num_kv_heads)):
            raise ValueError(
                f"heads {seen} must list every KV head 0..{self.num_kv_heads - 1} once"
            )
        if set(self.pools) != set(self.heads):
            raise ValueError("pools and heads must have the same precisions")
        if self.smooth is not None and self.inv_smooth is None:
            # Computed once in float32: the twin and the kernel multiply by the same values.
            self.inv_smooth = (1.0 / self.smooth).contiguous()

    @property
    def page_size(self) -> int:
        return next(iter(self.pools.values())).spec.page_size

    @property
    def num_pages(self) -> int:
        return next(iter(self.pools.values())).spec.num_pages

    def pool_of(self) -> list[tuple[int, int]]:
        """For every KV head: (bits of its pool, its index inside that pool)."""
        where = [(0, 0)] * self.num_kv_heads
        for bits, heads in self.heads.items():
            for i, h in enumerate(heads.tolist()):
                where[h] = (bits, i)
        return where

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.pools.values())

    def bytes_per_token(self) -> int:
        return sum(p.spec.bytes_per_token() for p in self.pools.values())


def allocate_side(
    *,
    num_kv_heads: int,
    head_dim: int,
    head_bits: tuple[int, ...],
    num_pages: int,
    page_size: int,
    block: int = 1,
    signs: torch.Tensor | None = None,
    group_size: int | None = None,
    center: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> SideStore:
    """Allocate the pools of one side; ``head_bits[h]`` is KV head h's precision (4, 8, 16);
    ``center`` / ``smooth``: [H_kv, D] transforms applied before the rotation (or None)."""
    if len(head_bits) != num_kv_heads:
        raise ValueError(f"head_bits has {len(head_bits)} entries for {num_kv_heads} KV heads")
    pools, heads = {}, {}
    for bits in sorted(set(head_bits)):
        ids = [h for h, b in enumerate(head_bits) if b == bits]
        spec = PoolSpec(num_pages, page_size, len(ids), head_dim, bits, group_size)
        pools[bits] = allocate_pool(spec, device=device, dtype=dtype)
        heads[bits] = torch.tensor(ids, dtype=torch.int32, device=device)
    if signs is not None:
        signs = signs.to(device=device, dtype=torch.float32)
    extra = {}
    for name, t in (("center", center), ("smooth", smooth)):
        if t is not None:
            if tuple(t.shape) != (num_kv_heads, head_dim):
                raise ValueError(f"{name} must be [{num_kv_heads}, {head_dim}]")
            extra[name] = t.to(device=device, dtype=torch.float32).contiguous()
    return SideStore(num_kv_heads, head_dim, block, signs, pools, heads, **extra)
