"""Builders the test suite and the GPU benchmarks share: stores filled with recognisable
bytes, deep copies of stores, and paged caches holding real quantized tokens. Not used by the
library itself."""

from __future__ import annotations

import math

import torch

from sawquant.config import SideConfig
from sawquant.format import Pool, SideStore, allocate_side
from sawquant.quant import random_signs, slots_for
from sawquant.quant.write import rotate_quantize_paged_ref
from sawquant.runtime.layer import make_side_store

__all__ = ["copy_side", "differing_bytes", "paged_cache", "poisoned_side"]


def poisoned_side(
    *,
    num_kv_heads: int,
    head_dim: int,
    block: int,
    num_pages: int,
    page_size: int,
    seed: int | None = None,
    group: int | None = None,
    head_bits: tuple[int, ...] | None = None,
    center: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> SideStore:
    """A side whose pools hold random bytes, so slots a write must not touch are recognisable
    (``seed``: random signs from that seed, else none; ``center`` / ``smooth``: [H_kv, D])."""
    store = allocate_side(
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        head_bits=head_bits or (4,) * num_kv_heads,
        num_pages=num_pages,
        page_size=page_size,
        block=block,
        signs=None if seed is None else random_signs(head_dim, seed),
        group_size=group,
        center=center,
        smooth=smooth,
        device=device,
        dtype=dtype,
    )
    for pool in store.pools.values():
        for t in (pool.codes, pool.scale, pool.zero):
            if t is not None:
                raw = t.view(torch.uint8)
                raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8))
                if t.is_floating_point():  # keep the poison finite: NaN != NaN hides nothing
                    t.nan_to_num_(0.0, 0.0, 0.0)
    return store


def copy_side(store: SideStore, device: torch.device | str | None = None) -> SideStore:
    """A deep copy of a store (on ``device``; default where it is)."""

    def dup(t):
        return None if t is None else t.to(device or t.device, copy=True)

    pools = {
        b: Pool(p.spec, dup(p.codes), dup(p.scale), dup(p.zero)) for b, p in store.pools.items()
    }
    heads = {b: dup(h) for b, h in store.heads.items()}
    return SideStore(
        store.num_kv_heads, store.head_dim, store.block, dup(store.signs), pools, heads,
        center=dup(store.center), smooth=dup(store.smooth), inv_smooth=dup(store.inv_smooth),
    )  # fmt: skip


def differing_bytes(a: SideStore, b: SideStore) -> int:
    """Bytes in which two stores of the same layout differ (codes, scales, zeros of every pool;
    compared on the CPU, so the stores may live on different devices)."""
    bad = 0
    for bits in a.pools:
        for name in ("codes", "scale", "zero"):
            x, y = getattr(a.pools[bits], name), getattr(b.pools[bits], name)
            if x is not None:
                bad += int((x.cpu().view(torch.uint8) != y.cpu().view(torch.uint8)).sum())
    return bad


def paged_cache(
    *,
    lens: list[int],
    k_side: SideConfig,
    v_side: SideConfig,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[SideStore, SideStore, torch.Tensor]:
    """K and V stores (as the side configs say) holding ``lens[b]`` random tokens per sequence,
    written by the reference write through a randomly permuted block table (the way
    flash-attention's tests build theirs), plus a spare page per sequence. Keys and values get
    channel-dependent scales (some outlier channels, as real K/V have).

    Returns (k_store, v_store, block_table int32 [B, pages])."""
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = max(1, max(math.ceil(n / page_size) for n in lens)) + 1  # spare page
    num_pages = len(lens) * pages_per_seq + 3
    perm = torch.randperm(num_pages, generator=g)[: len(lens) * pages_per_seq]
    table = perm.view(len(lens), pages_per_seq).to(torch.int32)
    common = dict(num_kv_heads=num_kv_heads, head_dim=head_dim, num_pages=num_pages,
                  page_size=page_size, dtype=dtype)  # fmt: skip
    k_store, v_store = make_side_store(k_side, **common), make_side_store(v_side, **common)
    for b, n in enumerate(lens):
        slots = slots_for(table[b : b + 1], torch.arange(n)[None], page_size)[0]
        k = torch.randn(n, num_kv_heads, head_dim, generator=g)
        k = k * (1 + 3 * torch.rand(head_dim, generator=g))
        v = torch.randn(n, num_kv_heads, head_dim, generator=g)
        v = v * (1 + 3 * torch.rand(head_dim, generator=g))
        rotate_quantize_paged_ref(k, v, slots, k_store, v_store)
    if device != "cpu":
        k_store, v_store = copy_side(k_store, device), copy_side(v_store, device)
        table = table.to(device)
    return k_store, v_store, table
