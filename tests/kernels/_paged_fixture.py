"""Shared fixtures of the attention-kernel tests: a paged quantized cache built the way
flash-attention's tests build theirs (random permuted block table), filled by the reference
write, and NaN poisoning of every float buffer a kernel launcher allocates."""

from __future__ import annotations

import math

import torch

from sawquant.format import SideStore, allocate_side
from sawquant.quant import paged_write_ref, random_signs, slots_for


def build_cache(
    *,
    lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    block: int,
    k_bits: tuple[int, ...] | None = None,
    v_bits: tuple[int, ...] | None = None,
    group_size: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> tuple[SideStore, SideStore, torch.Tensor]:
    """K and V stores holding ``lens[b]`` random tokens per sequence, and the block table.

    K uses random signs on top of the block rotation, V the plain block rotation, so both
    rotation paths (and their inverses) are exercised.
    """
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = max(1, max(math.ceil(n / page_size) for n in lens)) + 1  # spare page
    num_pages = len(lens) * pages_per_seq + 3
    perm = torch.randperm(num_pages, generator=g)[: len(lens) * pages_per_seq]
    table = perm.view(len(lens), pages_per_seq).to(torch.int32)
    stores = []
    for side, bits in enumerate((k_bits, v_bits)):
        store = allocate_side(
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            head_bits=bits or (4,) * num_kv_heads,
            num_pages=num_pages,
            page_size=page_size,
            block=block,
            signs=random_signs(head_dim, seed + 7) if side == 0 and block > 1 else None,
            group_size=group_size,
            dtype=dtype,
        )
        for b, n in enumerate(lens):
            pos = torch.arange(n)
            slots = slots_for(table[b : b + 1], pos[None], page_size)[0]
            # Channel-dependent scale: some outlier channels, as real K/V have.
            x = torch.randn(n, num_kv_heads, head_dim, generator=g)
            x = x * (1 + 3 * torch.rand(head_dim, generator=g))
            for pb, pool in store.pools.items():
                heads = store.heads[pb].long()
                paged_write_ref(x[:, heads], slots, pool, block=store.block, signs=store.signs)
        stores.append(store)
    return stores[0], stores[1], table


def poison_float_allocations(monkeypatch) -> None:
    """Make torch.empty / empty_like return NaN-filled float tensors while the test runs, so an
    element a kernel forgets to write (output or workspace) shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


def check_close(out: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor) -> None:
    """flash-attention's rule: err(kernel) <= 2 * err(torch in the same dtype) + atol, max-abs
    errors against the float32 reference; every element finite. atol is one rounding of the
    largest output to its dtype (both sides round their result once)."""
    assert torch.isfinite(out).all(), "kernel left NaN/Inf in the output"
    atol = torch.finfo(out.dtype).eps * ref.float().abs().max().item()
    err = (out.float() - ref.float()).abs().max().item()
    err_lowp = (lowp.float() - ref.float()).abs().max().item()
    print(f"max err kernel {err:.3e}, torch {lowp.dtype} {err_lowp:.3e}, atol {atol:.1e}")
    assert err <= 2 * err_lowp + atol
