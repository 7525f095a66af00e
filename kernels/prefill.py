"""Chunked-prefill attention: T new queries over the quantized cache plus their own chunk.

The cached positions (< cached_lens) are read from the quantized pages by one Triton kernel
that dequantizes and un-rotates them back to the original basis, in q.dtype, straight into a
contiguous K/V buffer already laid out per query head (GQA groups repeated) with room for the
chunk behind them; the chunk's own full-precision K/V are copied in, and torch's
``scaled_dot_product_attention`` (flash / memory-efficient kernels) does the attention with the
causal offset. Softcapped logits have no SDPA kernel: that case runs explicit attention math,
blocked over the queries to bound memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.nn.functional import scaled_dot_product_attention

from sawquant.errors import InputError
from sawquant.format import SideStore
from sawquant.kernels.decode import (
    _attention_fp32,
    _gather_heads,
    _load_halves,
    _next_pow2,
    _rotate_rows,
    _rotation_matrix,
)
from sawquant.quant import unrotate

__all__ = ["paged_prefill_attention", "paged_prefill_attention_ref"]


def _allowed(
    cached: int, t: int, total: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """[T, total] bool: query t (absolute cached + t) sees cached keys j < cached and the chunk
    key at column total - T + t' when t' <= t, minus keys more than the window back."""
    q_pos = cached + torch.arange(t, device=device)[:, None]  # [T, 1]
    col = torch.arange(total, device=device)[None, :]
    pad = total - t  # columns [cached, pad) are padding
    k_pos = torch.where(col >= pad, col - pad + cached, col)
    ok = (k_pos <= q_pos) & ((col < cached) | (col >= pad))
    if sliding_window is not None:
        ok &= q_pos - k_pos < sliding_window
    return ok


def paged_prefill_attention_ref(
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
) -> torch.Tensor:
    """Equivalent to float32 causal attention over [dequantized cache, chunk] per sequence.

    q: [B, H_q, T, D]; k, v: [B, H_kv, T, D] (the chunk, full precision, not rotated);
    cached_lens: [B] int32 tokens already in the pages. Returns [B, H_q, T, D] in q.dtype.
    """
    b, h_q, t, _ = q.shape
    group = h_q // k.shape[1]
    keys = _gather_heads(k_store, block_table, cached_lens)  # B x [H_kv, C, D] rotated
    values = _gather_heads(v_store, block_table, cached_lens)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i, cached in enumerate(cached_lens.tolist()):
        kk = torch.cat([unrotate(keys[i], k_store.block, k_store.signs), k[i].float()], dim=1)
        vv = torch.cat([unrotate(values[i], v_store.block, v_store.signs), v[i].float()], dim=1)
        allowed = _allowed(cached, t, cached + t, sliding_window, q.device)
        out[i] = _attention_fp32(
            q[i],
            kk.repeat_interleave(group, dim=0),
            vv.repeat_interleave(group, dim=0),
            allowed,
            softmax_scale=softmax_scale,
            softcap=softcap,
        )
    return out.to(q.dtype)


# fmt: off
@triton.jit
def _gather_dequant_kernel(
    C, S, Z, BT, LENS, HEADS, H, OUT,
    buf_len, rot_scale,
    stride_cp, stride_ch, stride_ct,
    stride_sp, stride_sh, stride_st,
    stride_btb, stride_ob, stride_oh, stride_ot,
    HEAD_DIM: tl.constexpr, BLOCK_DH: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    BITS: tl.constexpr, GS: tl.constexpr, ROT: tl.constexpr,
    REPEAT: tl.constexpr,
):
    """Tokens [n0, n0 + BLOCK_N) of one pool head: dequantize, un-rotate, write REPEAT copies.

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
        x = _rotate_rows(x_even, H, rot_scale, (2 * cols) * HEAD_DIM, d, h_mask)
        x += _rotate_rows(x_odd, H, rot_scale, (2 * cols + 1) * HEAD_DIM, d, h_mask)
        x = x.to(OUT.dtype.element_ty)
        for r in tl.static_range(REPEAT):
            ptr = row + (kvh * REPEAT + r).to(tl.int64) * stride_oh + d[None, :]
            tl.store(ptr, x, mask=keep[:, None] & d_ok[None, :])
    else:
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
) -> None:
    """Fill buf[:, :, :width] ([B, H_q, width + T, D]) from the pages, in the original basis."""
    b, _, _, d = buf.shape
    block_n = 32
    block_dh = _next_pow2(max(d // 2, 16))
    hmat, rot_scale = _rotation_matrix(store, buf.device, inverse=True)
    for bits, pool in store.pools.items():
        heads = store.heads[bits]
        s = pool.scale if pool.scale is not None else pool.codes
        z = pool.zero if pool.zero is not None else pool.codes
        grid = (b, heads.numel(), -(-width // block_n))
        # fmt: off
        _gather_dequant_kernel[grid](
            pool.codes, s, z, block_table, cached_lens, heads, buf if hmat is None else hmat, buf,
            width, rot_scale,
            *pool.codes.stride()[:3], *s.stride()[:3],
            block_table.stride(0), buf.stride(0), buf.stride(1), buf.stride(2),
            HEAD_DIM=d, BLOCK_DH=block_dh, PAGE=store.page_size, BLOCK_N=block_n,
            BITS=bits, GS=pool.spec.groups_divisor, ROT=hmat is not None, REPEAT=repeat,
            num_warps=4,
        )
        # fmt: on


def _check_inputs(q, k, v, k_store, v_store, block_table, cached_lens) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise InputError(
            f"q must be [B, H_q, T, D] and k, v [B, H_kv, T, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h_q, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        raise InputError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in B, T or D")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InputError(f"q dtype {q.dtype} is not supported; pass fp16, bf16 or fp32")
    h_kv = k.shape[1]
    for name, st in (("k_store", k_store), ("v_store", v_store)):
        if st.num_kv_heads != h_kv or st.head_dim != d:
            raise InputError(
                f"{name} holds {st.num_kv_heads} heads of {st.head_dim}, "
                f"the chunk {h_kv} of {d}; pass this layer's stores"
            )
        for pool in st.pools.values():
            if pool.codes.device != q.device:
                raise InputError(f"{name} lives on {pool.codes.device}, q on {q.device}")
    if k_store.page_size != v_store.page_size:
        raise InputError("k_store and v_store have different page sizes; pass one layer's")
    if h_q % h_kv:
        raise InputError(f"{h_q} query heads are not a multiple of {h_kv} KV heads (GQA)")
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype != torch.int32:
        raise InputError(
            f"block_table must be int32 [{b}, max_pages], got "
            f"{block_table.dtype} {tuple(block_table.shape)}"
        )
    if cached_lens.shape != (b,) or cached_lens.dtype != torch.int32:
        raise InputError(
            f"cached_lens must be int32 [{b}], got {cached_lens.dtype} {tuple(cached_lens.shape)}"
        )
    if block_table.device != q.device or cached_lens.device != q.device:
        raise InputError("block_table and cached_lens must be on q's device")


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
) -> torch.Tensor:
    """Chunked-prefill attention over the paged quantized cache (Triton gather + SDPA).

    Equivalent to :func:`paged_prefill_attention_ref`: q [B, H_q, T, D]; k, v [B, H_kv, T, D]
    the chunk's own K/V (not rotated); cached_lens [B] int32. Query t of sequence b sees the
    cached positions < cached_lens[b] and chunk positions <= t (within ``sliding_window`` of
    it when given). Returns [B, H_q, T, D] in q.dtype.
    """
    _check_inputs(q, k, v, k_store, v_store, block_table, cached_lens)
    if sliding_window is not None and sliding_window < 1:
        raise InputError(f"sliding_window must be >= 1, got {sliding_window}; or pass None")
    if softcap is not None and softcap <= 0:
        raise InputError(f"softcap must be > 0, got {softcap}; or pass None")
    b, h_q, t, d = q.shape
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
    for buf, store, chunk in ((keys, k_store, k), (values, v_store, v)):
        if width:
            _dequant_into(buf, store, block_table, cached_lens, width, group)
        buf[:, :, width:] = chunk.to(q.dtype).repeat_interleave(group, dim=1)

    if softcap is None and sliding_window is None and min(lens, default=0) == width:
        # Equal cached lengths: the mask is the causal one aligned to the bottom right, which
        # torch serves with its flash / memory-efficient kernels without building a mask.
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(t, width + t)
        return scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=softmax_scale)
    masks = [_allowed(c, t, width + t, sliding_window, q.device) for c in lens]
    allowed = torch.stack(masks)[:, None]  # [B, 1, T, width + T]
    if softcap is None:
        return scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=softmax_scale)
    out = torch.empty_like(q)
    kf, vf = keys.float(), values.float()
    for t0 in range(0, t, 256):  # explicit math, 256 queries at a time
        sl = slice(t0, t0 + 256)
        s = (q[:, :, sl].float() @ kf.transpose(-1, -2)) * softmax_scale
        s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~allowed[:, :, sl], float("-inf"))
        out[:, :, sl] = (torch.softmax(s, dim=-1) @ vf).to(q.dtype)
    return out
