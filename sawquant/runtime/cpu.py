"""Batched torch decode attention for CPU tensors: the same function as the kernel's twin
``paged_decode_attention_ref`` without its per-sequence Python loop.

The twin gathers and attends one sequence at a time (clear, and the specification). On the CPU
the runtime serves every decode step of every layer through here instead: all sequences are
gathered at once, padded to the longest, and masked by their lengths, so a step costs a fixed
number of torch calls whatever the batch. ``tests/runtime/test_cpu.py`` checks it equals the
twin (float32 rounding apart).
"""

from __future__ import annotations

import torch

from sawquant.format import SideStore
from sawquant.quant import dequantize, rotate, unpack_int4, unrotate

__all__ = ["gather_padded", "paged_decode_attention_cpu"]


def _pages(t: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """Whole pages of a pool tensor [P, H, page, X] -> [B, H, length, X] (contiguous copies)."""
    b, n = pages.shape
    x = t[pages.reshape(-1)]  # [B * n, H, page, X]: one gather of contiguous pages
    x = x.view(b, n, *t.shape[1:]).transpose(1, 2)  # [B, H, n, page, X]
    return x.reshape(b, t.shape[1], n * t.shape[2], t.shape[3])[:, :, :length]


def gather_padded(store: SideStore, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Dequantize the first ``length`` positions of every sequence: [B, H_kv, length, D] float32,
    still in the store's rotated basis. Positions past a sequence's end hold finite garbage."""
    b = block_table.shape[0]
    pages = block_table[:, : -(-length // store.page_size)].long()  # [B, n]
    out = torch.empty(b, store.num_kv_heads, length, store.head_dim, device=block_table.device)
    for bits, pool in store.pools.items():
        codes = _pages(pool.codes, pages, length)  # [B, H_pool, L, W]
        if bits == 16:
            x = codes.float()
        else:
            q = unpack_int4(codes) if bits == 4 else codes
            scale, zero = _pages(pool.scale, pages, length), _pages(pool.zero, pages, length)
            x = dequantize(q, scale, zero, group_size=pool.spec.group_size)
        out[:, store.heads[bits].long()] = x
    return out


def paged_decode_attention_cpu(
    q: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    softmax_scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Equivalent to ``paged_decode_attention_ref`` (same arguments and result): q [B, H_q, D]
    not rotated, seq_lens [B] including the current token; returns [B, H_q, D] in q.dtype."""
    del num_splits
    b, h_q, d = q.shape
    h_kv = k_store.num_kv_heads
    length = int(seq_lens.max())
    keys = gather_padded(k_store, block_table, length)  # [B, H_kv, L, D]
    values = gather_padded(v_store, block_table, length)
    qr = rotate(q, k_store.block, k_store.signs).view(b, h_kv, h_q // h_kv, d)  # [B, H_kv, G, D]
    s = torch.einsum("bhgd,bhld->bhgl", qr, keys) * softmax_scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(length, device=q.device)
    lens = seq_lens.long().view(b, 1)
    allowed = pos < lens  # [B, L]
    if sliding_window is not None:
        allowed &= pos >= lens - sliding_window
    s = s.masked_fill(~allowed[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgl,bhld->bhgd", torch.softmax(s, dim=-1), values)
    return unrotate(out.reshape(b, h_q, d), v_store.block, v_store.signs).to(q.dtype)
