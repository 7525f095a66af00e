"""Chunked-prefill attention: T new queries over the quantized cache plus their own chunk.

The cached positions (< cached_lens) are read from the quantized pages by one Triton kernel
that dequantizes and un-rotates them back to the original basis, in q.dtype, straight into a
contiguous K/V buffer already laid out per query head (GQA groups repeated) with room for the
chunk behind them; the chunk's own full-precision K/V are copied in, and torch's
``scaled_dot_product_attention`` (flash / memory-efficient kernels) does the attention with the
causal offset. When the chunk is already in the pages (the runtimes write a step's K/V before
attending), ``paged_prefill_attention_stored`` reads prefix and chunk in the same gather: the
chunk attends to its K/V as stored without a separate quantize-dequantize pass. Softcapped
logits have no SDPA kernel: that case runs explicit attention math,
blocked over the queries to bound memory.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.nn.functional import scaled_dot_product_attention

from sawquant.errors import InputError
from sawquant.format import SideStore
from sawquant.kernels.common import rotate_rows
from sawquant.kernels.plans import PrefillPlan, next_pow2
from sawquant.quant.attention import prefill_allowed, stored_prefill_allowed
from sawquant.quant.prefill import check_prefill_inputs, check_stored_prefill_inputs

__all__ = ["paged_prefill_attention", "paged_prefill_attention_stored"]


@triton.jit
def _load_halves(ptr, tok, cols, mask, BITS: tl.constexpr):
    """Even/odd column halves of a [BLOCK_N, D] tile: ([BLOCK_N, DH], [BLOCK_N, DH]) raw."""
    if BITS == 4:
        c = tl.load(ptr + tok[:, None] + cols[None, :], mask=mask, other=0)
        lo = c & 15
        hi = c >> 4
    else:
        lo = tl.load(ptr + tok[:, None] + 2 * cols[None, :], mask=mask, other=0)
        hi = tl.load(ptr + tok[:, None] + 2 * cols[None, :] + 1, mask=mask, other=0)
    return lo, hi


# fmt: off
@triton.jit
def _gather_dequant_kernel(
    C, S, Z, BT, LENS, HEADS, H, SM, CE, OUT,
    buf_len, rot_scale,
    stride_cp, stride_ch, stride_ct,
    stride_sp, stride_sh, stride_st,
    stride_btb, stride_ob, stride_oh, stride_ot,
    HEAD_DIM: tl.constexpr, BLOCK_DH: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    BITS: tl.constexpr, GS: tl.constexpr, ROT: tl.constexpr,
    REPEAT: tl.constexpr, SMOOTH: tl.constexpr, CENTER: tl.constexpr,
):
    """Tokens [n0, n0 + BLOCK_N) of one pool head: dequantize, un-rotate, undo the transforms
    (``* smooth + center`` of the KV head), write REPEAT copies.

    Positions in [cached_len, buf_len) are written as zeros (masked later, but never NaN).
    """
    b = tl.program_id(0)
    i = tl.program_id(1)
    pos = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    kvh = tl.load(HEADS + i)
    length = tl.load(LENS + b)
    tok_ok = pos < length
    cols = tl.arange(0, BLOCK_DH)
    col_ok = cols < HEAD_DIM // 2
    tile_ok = tok_ok[:, None] & col_ok[None, :]
    page = tl.load(BT + b.to(tl.int64) * stride_btb + pos // PAGE, mask=tok_ok, other=0)
    page = page.to(tl.int64)
    off = (pos % PAGE).to(tl.int64)
    c_tok = page * stride_cp + i.to(tl.int64) * stride_ch + off * stride_ct
    lo, hi = _load_halves(C, c_tok, cols, tile_ok, BITS)
    if BITS == 16:
        x_even = lo.to(tl.float32)
        x_odd = hi.to(tl.float32)
    else:
        s_tok = page * stride_sp + i.to(tl.int64) * stride_sh + off * stride_st
        if GS == HEAD_DIM:
            scale = tl.load(S + s_tok, mask=tok_ok, other=0.0).to(tl.float32)[:, None]
            zero = tl.load(Z + s_tok, mask=tok_ok, other=0.0).to(tl.float32)[:, None]
        else:
            g_off = s_tok[:, None] + (2 * cols[None, :]) // GS
            scale = tl.load(S + g_off, mask=tile_ok, other=0.0).to(tl.float32)
            zero = tl.load(Z + g_off, mask=tile_ok, other=0.0).to(tl.float32)
        x_even = lo.to(tl.float32) * scale + zero
        x_odd = hi.to(tl.float32) * scale + zero

    row = OUT + b.to(tl.int64) * stride_ob + pos.to(tl.int64)[:, None] * stride_ot
    keep = pos < buf_len
    if ROT:
        # x = x' @ (H diag(signs)), x' split into even/odd rows of H: no interleave needed.
        d = tl.arange(0, 2 * BLOCK_DH)
        d_ok = d < HEAD_DIM
        h_mask = col_ok[:, None] & d_ok[None, :]
        x = rotate_rows(x_even, H, rot_scale, (2 * cols) * HEAD_DIM, d, h_mask)
        x += rotate_rows(x_odd, H, rot_scale, (2 * cols + 1) * HEAD_DIM, d, h_mask)
        if SMOOTH:
            x = x * tl.load(SM + kvh * HEAD_DIM + d, mask=d_ok, other=0.0)[None, :]
        if CENTER:
            x = x + tl.load(CE + kvh * HEAD_DIM + d, mask=d_ok, other=0.0)[None, :]
        x = x.to(OUT.dtype.element_ty)
        for r in tl.static_range(REPEAT):
            ptr = row + (kvh * REPEAT + r).to(tl.int64) * stride_oh + d[None, :]
            tl.store(ptr, x, mask=keep[:, None] & d_ok[None, :])
    else:
        even, odd = kvh * HEAD_DIM + 2 * cols, kvh * HEAD_DIM + 2 * cols + 1
        if SMOOTH:
            x_even = x_even * tl.load(SM + even, mask=col_ok, other=0.0)[None, :]
            x_odd = x_odd * tl.load(SM + odd, mask=col_ok, other=0.0)[None, :]
        if CENTER:
            x_even = x_even + tl.load(CE + even, mask=col_ok, other=0.0)[None, :]
            x_odd = x_odd + tl.load(CE + odd, mask=col_ok, other=0.0)[None, :]
        x_even = x_even.to(OUT.dtype.element_ty)
        x_odd = x_odd.to(OUT.dtype.element_ty)
        for r in tl.static_range(REPEAT):
            ptr = row + (kvh * REPEAT + r).to(tl.int64) * stride_oh + 2 * cols[None, :]
            tl.store(ptr, x_even, mask=keep[:, None] & col_ok[None, :])
            tl.store(ptr + 1, x_odd, mask=keep[:, None] & col_ok[None, :])
# fmt: on


def _dequant_into(
    buf: torch.Tensor,
    store: SideStore,
    block_table: torch.Tensor,
    cached_lens: torch.Tensor,
    width: int,
    repeat: int,
    hmat: torch.Tensor | None,
    rot_scale: float,
) -> None:
    """Fill buf[:, :, :width] ([B, H_q, width + T, D]) from the pages, in the original basis
    (``hmat``: the store's inverse rotation from the layer's PrefillPlan)."""
    b, _, _, d = buf.shape
    block_n = 32
    block_dh = next_pow2(max(d // 2, 16))
    for bits, pool in store.pools.items():
        heads = store.heads[bits]
        s = pool.scale if pool.scale is not None else pool.codes
        z = pool.zero if pool.zero is not None else pool.codes
        grid = (b, heads.numel(), -(-width // block_n))
        # fmt: off
        _gather_dequant_kernel[grid](
            pool.codes, s, z, block_table, cached_lens, heads, buf if hmat is None else hmat,
            buf if store.smooth is None else store.smooth,
            buf if store.center is None else store.center, buf,
            width, rot_scale,
            *pool.codes.stride()[:3], *s.stride()[:3],
            block_table.stride(0), buf.stride(0), buf.stride(1), buf.stride(2),
            HEAD_DIM=d, BLOCK_DH=block_dh, PAGE=store.page_size, BLOCK_N=block_n,
            BITS=bits, GS=pool.spec.groups_divisor, ROT=hmat is not None, REPEAT=repeat,
            SMOOTH=store.smooth is not None, CENTER=store.center is not None,
            num_warps=4,
        )
        # fmt: on


def paged_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    block_table: torch.Tensor,
    cached_lens: torch.Tensor,
    *,
    softmax_scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    plan: PrefillPlan | None = None,
) -> torch.Tensor:
    """Chunked-prefill attention over the paged quantized cache (Triton gather + SDPA).

    Equivalent to its twin ``sawquant.quant.prefill.paged_prefill_attention_ref``: q [B, H_q,
    T, D]; k, v [B, H_kv, T, D] the chunk's own K/V (not rotated); cached_lens [B] int32. Query
    t of sequence b sees the cached positions < cached_lens[b] and chunk positions <= t (within
    ``sliding_window`` of it when given). Returns [B, H_q, T, D] in q.dtype. ``plan``: the
    layer's PrefillPlan (built here when None).
    """
    check_prefill_inputs(
        q, k, v, k_store, v_store, block_table, cached_lens,
        sliding_window=sliding_window, softcap=softcap,
    )  # fmt: skip
    b, h_q, t, d = q.shape
    if plan is None:
        plan = PrefillPlan.build(k_store, v_store, q.device)
    if b == 0 or t == 0:
        return torch.empty_like(q)
    group = h_q // k.shape[1]
    lens = cached_lens.tolist()  # one sync: sizes the buffer (prefill is not graph-captured)
    cap = block_table.shape[1] * k_store.page_size
    if b and (min(lens) < 0 or max(lens) > cap):
        raise InputError(f"cached_lens must be in [0, {cap}] (block table pages x page size)")
    width = max(lens, default=0)
    block_table = block_table.contiguous()
    # keys/values: [B, H_q, width + T, D] = [cache (zero padded) | chunk], per query head.
    keys = torch.empty(b, h_q, width + t, d, dtype=q.dtype, device=q.device)
    values = torch.empty_like(keys)
    sides = (
        (keys, k_store, k, plan.k_unrot, plan.k_rot_scale),
        (values, v_store, v, plan.v_unrot, plan.v_rot_scale),
    )
    for buf, store, chunk, hmat, rot_scale in sides:
        if width:
            _dequant_into(buf, store, block_table, cached_lens, width, group, hmat, rot_scale)
        buf[:, :, width:] = chunk.to(q.dtype).repeat_interleave(group, dim=1)
    masks = functools.partial(prefill_allowed, total=width + t)
    return _attend(q, keys, values, lens, masks, softmax_scale, sliding_window, softcap)


def paged_prefill_attention_stored(
    q: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    block_table: torch.Tensor,
    cached_lens: torch.Tensor,
    *,
    softmax_scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    plan: PrefillPlan | None = None,
) -> torch.Tensor:
    """:func:`paged_prefill_attention` for a chunk already written to the pages (positions
    [cached_lens[b], cached_lens[b] + T)): one gather reads prefix and chunk back as stored,
    so the chunk needs no quantize-dequantize round trip of its own. Twin:
    ``sawquant.quant.prefill.paged_prefill_attention_stored_ref``."""
    check_stored_prefill_inputs(
        q, k_store, v_store, block_table, cached_lens,
        sliding_window=sliding_window, softcap=softcap, stored=0,
    )  # fmt: skip
    b, h_q, t, d = q.shape
    if plan is None:
        plan = PrefillPlan.build(k_store, v_store, q.device)
    if b == 0 or t == 0:
        return torch.empty_like(q)
    group = h_q // k_store.num_kv_heads
    cached = cached_lens.tolist()  # one sync: sizes the buffer (prefill is not graph-captured)
    cap = block_table.shape[1] * k_store.page_size
    if min(cached) < 0 or max(cached) + t > cap:
        raise InputError(
            f"cached_lens + {t} chunk tokens must be in [0, {cap}] (block table pages x page "
            "size); allocate the chunk's pages before attending"
        )
    width = max(cached) + t
    total = cached_lens + t  # int32: positions each sequence's pages hold
    block_table = block_table.contiguous()
    keys = torch.empty(b, h_q, width, d, dtype=q.dtype, device=q.device)
    values = torch.empty_like(keys)
    for buf, store, hmat, rot_scale in (
        (keys, k_store, plan.k_unrot, plan.k_rot_scale),
        (values, v_store, plan.v_unrot, plan.v_rot_scale),
    ):
        _dequant_into(buf, store, block_table, total, width, group, hmat, rot_scale)
    masks = functools.partial(stored_prefill_allowed, total=width)
    return _attend(q, keys, values, cached, masks, softmax_scale, sliding_window, softcap)


def _attend(q, keys, values, cached: list[int], masks, scale, sliding_window, softcap):
    """Attention of q [B, H_q, T, D] over keys/values [B, H_q, S, D] with the mask ``masks``
    builds per sequence (``masks(cached, t, sliding_window=, device=)``)."""
    t = q.shape[2]
    if softcap is None and sliding_window is None and min(cached) == max(cached):
        # Equal cached lengths: the mask is the causal one aligned to the bottom right, which
        # torch serves with its flash / memory-efficient kernels without building a mask.
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(t, keys.shape[2])
        return scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    rows = [masks(c, t, sliding_window=sliding_window, device=q.device) for c in cached]
    allowed = torch.stack(rows)[:, None]  # [B, 1, T, S]
    if softcap is None:
        return scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale)
    out = torch.empty_like(q)
    kf, vf = keys.float(), values.float()
    for t0 in range(0, t, 256):  # explicit math, 256 queries at a time
        sl = slice(t0, t0 + 256)
        s = (q[:, :, sl].float() @ kf.transpose(-1, -2)) * scale
        s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~allowed[:, :, sl], float("-inf"))
        out[:, :, sl] = (torch.softmax(s, dim=-1) @ vf).to(q.dtype)
    return out
