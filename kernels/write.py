"""Fused write path: rotate (block Hadamard) -> quantize -> store into paged-cache slots.

One launch per layer step writes the INT4 pools of K and V together (grid axis 1 = side). Heads
that a calibration moved to an INT8 or 16-bit fallback pool are written by one extra launch per
precision, issued only when such pools exist (the same kernel, other constexprs).

Bit-exact with its twin ``sawquant.quant.write.rotate_quantize_paged_ref`` (codes, scales,
zeros): the butterfly adds in the same stages and order as ``sawquant.quant.hadamard``, and
the quantization does the float32 operations of ``sawquant.quant.int4`` in the same order, with
IEEE division (``div_rn``) and FMA contraction disabled (a fused ``a * b + c`` rounds once, the
reference rounds twice).

Register layout: each thread owns one whole row (one token of one head, ``[R, D]`` tile), built
by joining one 16-byte load per chunk, so every butterfly stage, min/max and nibble packing stays
in its registers (no shuffles, no spills on triton 3.6 and 3.9 at head_dim <= 128); only the
packed codes change layout (through shared memory) for 16-byte coalesced stores. Rows are
head-major (pool head, then token), so stores of consecutive tokens of a head are contiguous.
That layout is for bandwidth; a decode step writes only a few rows, and then one thread doing a
whole row is the latency, so up to ``_SPREAD_ROWS`` rows a row is spread over several threads
(``SPREAD``; the same operations in the same order, the same bits).

Measured (benchmarks/RESULTS.md), 65,536 tokens of a Qwen3-8B layer: H100 145 us at block 1 (78%
of copy bandwidth), 177 us at block 128; H200 122 us (65%), 174 us. head_dim 256 compiles with
register spills.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sawquant.errors import InputError, NonFiniteKVError
from sawquant.format import SideStore
from sawquant.quant.hadamard import hadamard_scale
from sawquant.quant.paged import storable_limit
from sawquant.quant.write import INPUT_DTYPES, check_write_inputs

__all__ = ["rotate_quantize_paged"]

_ROWS_PER_WARP = 32  # one row (token, head) per thread
# H100, triton 3.6 (benchmarks/RESULTS.md): 1, 2 and 4 warps within 2% on the Qwen3-8B layer,
# 8 warps 50% slower; 2 was the fastest on the small demo layer.
_NUM_WARPS = 2
# A decode step writes a few rows (Qwen3-8B at batch 1: 8 per side). One row per thread then
# leaves the whole row's butterfly and min/max to a single thread: 12 us a layer with block-128
# rotations against 4 us without on the H200 (benchmarks/profile_step.py). Up to this many rows
# a row is spread over several threads instead: 2.6 us at 1 token (block 128, signs), and still
# 1.5x faster at 2048 rows (bench_write.py --small, benchmarks/RESULTS.md).
_SPREAD_ROWS = 2048
_SPREAD_ROWS_PER_PROGRAM = 4
_SPREAD_NUM_WARPS = 2


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _fp16_round_down(v):
    """Largest fp16 <= v (v float32), as ``sawquant.quant.int4.fp16_round_down``."""
    h = v.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True).to(tl.int32)
    # One fp16 step toward -inf: positive values lose one unit, negative ones (and -0) gain
    # one; +0 becomes the smallest negative subnormal (0x8001 = -32767 as int16).
    step = tl.where(bits > 0, bits - 1, tl.where(bits == 0, bits - 32767, bits + 1))
    bits = tl.where(h.to(tl.float32) > v, step, bits)
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _fp16_round_up(v):
    """Smallest fp16 >= v (v float32, >= 0), as ``sawquant.quant.int4.fp16_round_up``."""
    h = v.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True).to(tl.int32)
    bits = tl.where(h.to(tl.float32) < v, bits + 1, bits)
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _bf16_rne(v):
    """float32 -> bf16 rounded to nearest even (finite v), as torch's ``.to(torch.bfloat16)``.

    Done on the bits because the interpreter's own float32 -> bf16 cast truncates; on the GPU
    this equals the hardware conversion.
    """
    bits = v.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load_rows(
    x_ptrs, s_ptrs, c_ptrs, m_ptrs, mask, C0: tl.constexpr, C: tl.constexpr, VEC: tl.constexpr,
    D: tl.constexpr, HAS_SIGNS: tl.constexpr, HAS_CENTER: tl.constexpr, HAS_SMOOTH: tl.constexpr,
):  # fmt: skip
    """Chunks C0 .. C0 + C - 1 (VEC elements each) of every row, as float32 [R, C * VEC], with
    the transforms applied in the twin's order: (x - center) * inv_smooth * signs.

    x_ptrs: [R, VEC] pointers to chunk 0 of each row; s_ptrs: [R, VEC] pointers to the signs'
    chunk 0 (every row the same); c_ptrs / m_ptrs: the same for the row's KV head's center and
    inverse smoothing scales. Each chunk is its own [R, VEC] load, which every Triton
    version lays out one row per thread (a single [R, C, VEC] load is split across threads
    along C or R depending on the version); joining the chunks keeps the row in one thread's
    registers, so the butterfly and the min/max need no data exchange between threads.
    """
    if C == 1:
        if C0 * VEC < D:
            x = tl.load(x_ptrs + C0 * VEC, mask=mask, other=0.0).to(tl.float32)
            if HAS_CENTER:
                x = x - tl.load(c_ptrs + C0 * VEC, mask=mask, other=0.0)
            if HAS_SMOOTH:
                x = x * tl.load(m_ptrs + C0 * VEC, mask=mask, other=0.0)
            if HAS_SIGNS:
                x = x * tl.load(s_ptrs + C0 * VEC)
        else:  # padding up to a power of two: whole chunks, never loaded or stored
            x = tl.zeros(x_ptrs.shape, tl.float32)
    else:
        HALF: tl.constexpr = C // 2
        lo = _load_rows(
            x_ptrs, s_ptrs, c_ptrs, m_ptrs, mask, C0, HALF, VEC, D,
            HAS_SIGNS, HAS_CENTER, HAS_SMOOTH,
        )  # fmt: skip
        hi = _load_rows(
            x_ptrs, s_ptrs, c_ptrs, m_ptrs, mask, C0 + HALF, HALF, VEC, D,
            HAS_SIGNS, HAS_CENTER, HAS_SMOOTH,
        )  # fmt: skip
        x = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), [lo.shape[0], C * VEC])
    return x


@triton.jit
def _butterfly_stage(x, R: tl.constexpr, D: tl.constexpr, H: tl.constexpr):
    """One stage on x [R, D]: pair d with d + H inside aligned groups of 2H: (a, b) -> (a+b, a-b).

    Same view as the reference: [R, D/2H, 2, H], the pair axis moved last for split/join.
    """
    y = tl.permute(tl.reshape(x, [R, D // (2 * H), 2, H]), (0, 1, 3, 2))
    a, b = tl.split(y)
    y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    return tl.reshape(y, [R, D])


@triton.jit
def _butterfly(x, R: tl.constexpr, D: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform of each 2**LOG_BLOCK-chunk of the rows of x [R, D].

    Stages h = 1, 2, 4, ... in this order, as ``sawquant.quant.hadamard._butterfly`` (unrolled
    by hand: a static_range index cannot make the constexpr shapes of a reshape).
    """
    tl.static_assert(LOG_BLOCK <= 8)
    if LOG_BLOCK > 0:
        x = _butterfly_stage(x, R, D, 1)
    if LOG_BLOCK > 1:
        x = _butterfly_stage(x, R, D, 2)
    if LOG_BLOCK > 2:
        x = _butterfly_stage(x, R, D, 4)
    if LOG_BLOCK > 3:
        x = _butterfly_stage(x, R, D, 8)
    if LOG_BLOCK > 4:
        x = _butterfly_stage(x, R, D, 16)
    if LOG_BLOCK > 5:
        x = _butterfly_stage(x, R, D, 32)
    if LOG_BLOCK > 6:
        x = _butterfly_stage(x, R, D, 64)
    if LOG_BLOCK > 7:
        x = _butterfly_stage(x, R, D, 128)
    return x


@triton.jit
def _nan_min(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quant_params(lo, hi, LEVELS: tl.constexpr):
    """fp16 zero (rounded down), fp16 scale (rounded up) and float32 1/scale (0 if scale is 0)."""
    zero = _fp16_round_down(lo)
    scale = _fp16_round_up(tl.math.div_rn(hi - zero.to(tl.float32), LEVELS * 1.0))
    s32 = scale.to(tl.float32)
    inv = tl.where(s32 > 0, tl.math.div_rn(1.0, tl.where(s32 > 0, s32, 1.0)), 0.0)
    return zero, scale, inv


@triton.jit
def _write_rows(
    pid,
    # pointers
    x_ptr,  # [T, H_kv, D] (last dim contiguous)
    slot_ptr,  # [T] int64
    heads_ptr,  # [Hp] int32: KV head of each pool head
    signs_ptr,  # [D] float32 (unused unless HAS_SIGNS)
    center_ptr,  # [H_kv, D] float32 (unused unless HAS_CENTER)
    inv_smooth_ptr,  # [H_kv, D] float32 (unused unless HAS_SMOOTH)
    codes_ptr,  # [P, Hp, page, D/2 | D] uint8, or [P, Hp, page, D] 16-bit
    scale_ptr,  # [P, Hp, page, NG] fp16 (unused when BITS == 16)
    zero_ptr,  # [P, Hp, page, NG] fp16 (unused when BITS == 16)
    flag_ptr,  # [1] int32: set to flag_value when a value cannot be stored (NaN/Inf, range)
    # sizes
    flag_value,
    num_tokens,  # T
    num_rows,  # T * Hp
    num_pool_heads,  # Hp
    page_size,
    # strides (elements)
    stride_xt,
    stride_xh,
    stride_cp,  # codes: page, pool head, token (a pool may be a view into an engine's blocks)
    stride_ch,
    stride_ct,
    stride_sp,  # scale and zero: page, pool head, token
    stride_sh,
    stride_st,
    # constexpr
    D: tl.constexpr,
    D_PAD: tl.constexpr,  # next power of two >= D
    VEC: tl.constexpr,  # elements per 16-byte input chunk
    ROWS: tl.constexpr,  # rows (pool head, token) per program
    BITS: tl.constexpr,  # 4, 8 or 16
    GROUP: tl.constexpr,  # group size (D when one group per row)
    LOG_BLOCK: tl.constexpr,  # log2 of the rotation block (0: none)
    HSCALE: tl.constexpr,  # hadamard_scale(block), already a float32 value
    HAS_SIGNS: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    LIMIT: tl.constexpr,  # largest storable magnitude (fp16 range for INT pools)
    SPREAD: tl.constexpr,  # a row spread over several threads (few rows: latency), see below
):
    tl.static_assert(D % VEC == 0)
    tl.static_assert(D_PAD % GROUP == 0 or GROUP == D)
    tl.static_assert((1 << LOG_BLOCK) <= D_PAD)

    # Rows of this program: r = i * T + t (pool head i, token t). Head-major, so that a warp's
    # scale/zero/code stores of consecutive tokens of one head land in consecutive slots.
    r = pid * ROWS + tl.arange(0, ROWS)  # [R]
    i = r // num_tokens
    t = r % num_tokens
    slot = tl.load(slot_ptr + t, mask=r < num_rows, other=-1)  # [R] int64
    live = slot >= 0
    head = tl.load(heads_ptr + i, mask=live, other=0)  # tiny table, stays in L1
    src = t.to(tl.int64) * stride_xt + head.to(tl.int64) * stride_xh  # [R]
    page = slot // page_size
    tok = slot % page_size
    dst = page * stride_cp + i.to(tl.int64) * stride_ch + tok * stride_ct  # [R] row of codes
    dst_s = page * stride_sp + i.to(tl.int64) * stride_sh + tok * stride_st  # [R] of scales

    if SPREAD:
        # Few rows (a decode step: one token per sequence): one [R, D_PAD] load, which Triton
        # spreads over the threads, so each thread holds a few elements of a row and the
        # butterfly's stages run in parallel (through layout conversions). The same float32
        # operations in the same order per element as the row-per-thread layout.
        c = tl.arange(0, D_PAD)[None, :]
        ok = live[:, None] & (c < D)
        per_head = head.to(tl.int64)[:, None] * D + c
        x = tl.load(x_ptr + src[:, None] + c, mask=ok, other=0.0).to(tl.float32)
        if HAS_CENTER:
            x = x - tl.load(center_ptr + per_head, mask=ok, other=0.0)
        if HAS_SMOOTH:
            x = x * tl.load(inv_smooth_ptr + per_head, mask=ok, other=0.0)
        if HAS_SIGNS:
            x = x * tl.load(signs_ptr + c + 0 * r[:, None], mask=c < D, other=0.0)
    else:
        e = tl.arange(0, VEC)[None, :]
        per_head = head.to(tl.int64)[:, None] * D + e  # [R, VEC] offsets into [H_kv, D] tables
        x = _load_rows(
            x_ptr + src[:, None] + e, signs_ptr + e + 0 * r[:, None], center_ptr + per_head,
            inv_smooth_ptr + per_head, live[:, None], 0, D_PAD // VEC, VEC, D,
            HAS_SIGNS, HAS_CENTER, HAS_SMOOTH,
        )  # [R, D_PAD] float32, transforms and signs applied  # fmt: skip
    if LOG_BLOCK > 0:
        x = _butterfly(x, ROWS, D_PAD, LOG_BLOCK) * HSCALE
    # The storage policy of every write path (sawquant.quant.check_storable): a value that
    # cannot be stored raises. A kernel cannot raise, so it flags; the runtime checks the flag
    # once per step. Dead rows and padding were loaded as 0. INT pools check the row extremes
    # they compute anyway (NaN-propagating min/max, so NaN fails the comparison): a separate
    # pass over every element cost 1.37x the whole write (H200, 2026-12-02). Each bad row
    # stores the flag itself (masked: no traffic when none is bad, no reduction across rows).
    d = tl.arange(0, D_PAD)[None, :]
    row_mask = live[:, None]
    if D != D_PAD:
        row_mask = row_mask & (d < D)
    if BITS == 16:
        row_bad = tl.max(tl.where(tl.abs(x) <= LIMIT, 0, 1), axis=1) > 0  # [R]
        tl.store(flag_ptr + 0 * r, flag_value + 0 * r, mask=row_bad)
        if codes_ptr.dtype.element_ty == tl.bfloat16:
            x = _bf16_rne(x)
        tl.store(codes_ptr + dst[:, None] + d, x.to(codes_ptr.dtype.element_ty), row_mask)
    else:
        LEVELS: tl.constexpr = (1 << BITS) - 1
        if GROUP == D:
            # One group per row: reduce over the whole (unpadded) row.
            if D == D_PAD:
                lo = tl.reduce(x, 1, _nan_min)
                hi = tl.reduce(x, 1, _nan_max)
            else:
                lo = tl.reduce(tl.where(d < D, x, float("inf")), 1, _nan_min)
                hi = tl.reduce(tl.where(d < D, x, float("-inf")), 1, _nan_max)
            row_bad = ~(tl.maximum(-lo, hi) <= LIMIT)  # [R]
            tl.store(flag_ptr + 0 * r, flag_value + 0 * r, mask=row_bad)
            zero, scale, inv = _quant_params(lo, hi, LEVELS)  # [R]
            q = (x - zero.to(tl.float32)[:, None]) * inv[:, None]
            tl.store(scale_ptr + dst_s, scale, live)
            tl.store(zero_ptr + dst_s, zero, live)
        else:
            # Groups of GROUP elements (whole groups only, since GROUP divides D: padding never
            # shares a group with real elements).
            NG: tl.constexpr = D_PAD // GROUP
            xg = tl.reshape(x, [ROWS, NG, GROUP])
            lo = tl.reduce(xg, 2, _nan_min)
            hi = tl.reduce(xg, 2, _nan_max)
            row_bad = tl.max(tl.where(tl.maximum(-lo, hi) <= LIMIT, 0, 1), axis=1) > 0
            tl.store(flag_ptr + 0 * r, flag_value + 0 * r, mask=row_bad)
            zero, scale, inv = _quant_params(lo, hi, LEVELS)
            q = (xg - zero.to(tl.float32)[:, :, None]) * inv[:, :, None]
            q = tl.reshape(q, [ROWS, D_PAD])
            g = tl.arange(0, NG)[None, :]
            off = dst_s[:, None] + g  # [R, NG]
            tl.store(scale_ptr + off, scale, live[:, None] & (g < D // GROUP))
            tl.store(zero_ptr + off, zero, live[:, None] & (g < D // GROUP))
        # q >= 0 already (x >= lo >= zero), so only the top needs clamping.
        q = tl.minimum(tl.floor(q + 0.5), LEVELS * 1.0)
        if BITS == 8:
            tl.store(codes_ptr + dst[:, None] + d, q.to(tl.uint8), row_mask)
        else:
            # Two codes a byte, element 2j in the low nibble (exact in float32: < 256).
            lo_n, hi_n = tl.split(tl.reshape(q, [ROWS, D_PAD // 2, 2]))
            packed = (lo_n + hi_n * 16.0).to(tl.uint8)  # [R, D_PAD/2]
            j = tl.arange(0, D_PAD // 2)[None, :]
            m = live[:, None]
            if D != D_PAD:
                m = m & (j < D // 2)
            tl.store(codes_ptr + dst[:, None] + j, packed, m)


@triton.jit
def _rotate_quantize_paged_kernel(
    # pointers: job 0 (grid axis 1 == 0), job 1, shared slot mapping
    x0_ptr,
    heads0_ptr,
    signs0_ptr,
    center0_ptr,
    inv_smooth0_ptr,
    codes0_ptr,
    scale0_ptr,
    zero0_ptr,
    x1_ptr,
    heads1_ptr,
    signs1_ptr,
    center1_ptr,
    inv_smooth1_ptr,
    codes1_ptr,
    scale1_ptr,
    zero1_ptr,
    slot_ptr,
    flag_ptr,
    # sizes
    flag_value,
    num_tokens,
    num_rows0,
    num_pool_heads0,
    num_rows1,
    num_pool_heads1,
    page_size,
    # strides
    stride_x0t,
    stride_x0h,
    stride_x1t,
    stride_x1h,
    stride_c0p,
    stride_c0h,
    stride_c0t,
    stride_s0p,
    stride_s0h,
    stride_s0t,
    stride_c1p,
    stride_c1h,
    stride_c1t,
    stride_s1p,
    stride_s1h,
    stride_s1t,
    # constexpr
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    BITS: tl.constexpr,
    VEC0: tl.constexpr,
    GROUP0: tl.constexpr,
    LOG_BLOCK0: tl.constexpr,
    HSCALE0: tl.constexpr,
    HAS_SIGNS0: tl.constexpr,
    HAS_CENTER0: tl.constexpr,
    HAS_SMOOTH0: tl.constexpr,
    VEC1: tl.constexpr,
    GROUP1: tl.constexpr,
    LOG_BLOCK1: tl.constexpr,
    HSCALE1: tl.constexpr,
    HAS_SIGNS1: tl.constexpr,
    HAS_CENTER1: tl.constexpr,
    HAS_SMOOTH1: tl.constexpr,
    LIMIT: tl.constexpr,
    SPREAD: tl.constexpr,
):
    """Two write jobs (K and V pools of one precision) in one launch; see ``_write_rows``."""
    pid = tl.program_id(0)
    if tl.program_id(1) == 0:
        if pid * ROWS < num_rows0:
            _write_rows(
                pid, x0_ptr, slot_ptr, heads0_ptr, signs0_ptr, center0_ptr, inv_smooth0_ptr,
                codes0_ptr, scale0_ptr, zero0_ptr, flag_ptr, flag_value, num_tokens, num_rows0,
                num_pool_heads0, page_size, stride_x0t, stride_x0h,
                stride_c0p, stride_c0h, stride_c0t, stride_s0p, stride_s0h, stride_s0t,
                D, D_PAD, VEC0, ROWS, BITS, GROUP0, LOG_BLOCK0, HSCALE0, HAS_SIGNS0,
                HAS_CENTER0, HAS_SMOOTH0, LIMIT, SPREAD,
            )  # fmt: skip
    else:
        if pid * ROWS < num_rows1:
            _write_rows(
                pid, x1_ptr, slot_ptr, heads1_ptr, signs1_ptr, center1_ptr, inv_smooth1_ptr,
                codes1_ptr, scale1_ptr, zero1_ptr, flag_ptr, flag_value, num_tokens, num_rows1,
                num_pool_heads1, page_size, stride_x1t, stride_x1h,
                stride_c1p, stride_c1h, stride_c1t, stride_s1p, stride_s1h, stride_s1t,
                D, D_PAD, VEC1, ROWS, BITS, GROUP1, LOG_BLOCK1, HSCALE1, HAS_SIGNS1,
                HAS_CENTER1, HAS_SMOOTH1, LIMIT, SPREAD,
            )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def rotate_quantize_paged(
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    *,
    flag: torch.Tensor | None = None,
    flag_value: int = 1,
    spread: bool | None = None,
) -> None:
    """Fused Triton write of K and V of T new tokens into their page slots, in place.

    Equivalent to :func:`rotate_quantize_paged_ref` (same arguments, bit-exact codes, scales
    and zeros). One launch for the INT4 pools of K and V; one more per other precision present
    (INT8, 16-bit). Slots must be < ``num_pages * page_size`` (not checked: it would sync).

    Values that cannot be stored (NaN/Inf, beyond the pool's range) cannot raise inside a
    kernel: with ``flag`` (int32 [1] on k's device) the kernel sets ``flag[0] = flag_value``
    and the caller checks it once per step (the runtime does); without it the launcher
    synchronises and raises NonFiniteKVError as the twin does.

    ``spread`` (benchmarks and tests; None: by the number of rows): up to ``_SPREAD_ROWS``
    (token, head) rows, a row is spread over several threads, ``_SPREAD_ROWS_PER_PROGRAM``
    rows a program, for latency; above, one row per thread for bandwidth. Both give the same
    bits.
    """
    check_write_inputs(k, v, slot_mapping, k_store, v_store)
    _check_kernel_limits(k, v, k_store, v_store)
    num_tokens, _, head_dim = k.shape
    if num_tokens == 0:
        return
    own_flag = flag is None
    if own_flag:
        flag = torch.zeros(1, dtype=torch.int32, device=k.device)
    elif flag.dtype != torch.int32 or flag.numel() < 1 or flag.device != k.device:
        raise InputError(f"flag must be an int32 tensor on {k.device}, got {flag.dtype}")
    jobs: dict[int, list[dict]] = {}
    for x, store in ((k, k_store), (v, v_store)):
        for bits in sorted(store.pools):
            jobs.setdefault(bits, []).append(_job(x, store, bits))
    d_pad = triton.next_power_of_2(head_dim)
    for bits in sorted(jobs):
        pair = jobs[bits]
        j0, j1 = pair[0], pair[-1]
        num_rows = max(j["num_rows"] for j in pair)
        spread_here = num_rows <= _SPREAD_ROWS if spread is None else spread
        if spread_here:
            rows, warps = _SPREAD_ROWS_PER_PROGRAM, _SPREAD_NUM_WARPS
        else:
            rows, warps = _ROWS_PER_WARP * _NUM_WARPS, _NUM_WARPS
        grid = (triton.cdiv(num_rows, rows), len(pair))
        _rotate_quantize_paged_kernel[grid](
            j0["x"], j0["heads"], j0["signs"], j0["center"], j0["inv_smooth"], j0["codes"],
            j0["scale"], j0["zero"],
            j1["x"], j1["heads"], j1["signs"], j1["center"], j1["inv_smooth"], j1["codes"],
            j1["scale"], j1["zero"],
            slot_mapping, flag,
            flag_value, num_tokens,
            j0["num_rows"], j0["num_pool_heads"], j1["num_rows"], j1["num_pool_heads"],
            k_store.page_size,
            j0["x"].stride(0), j0["x"].stride(1), j1["x"].stride(0), j1["x"].stride(1),
            *j0["codes"].stride()[:3], *j0["scale"].stride()[:3],
            *j1["codes"].stride()[:3], *j1["scale"].stride()[:3],
            D=head_dim, D_PAD=d_pad, ROWS=rows, BITS=bits,
            VEC0=j0["vec"], GROUP0=j0["group"], LOG_BLOCK0=j0["log_block"],
            HSCALE0=j0["hscale"], HAS_SIGNS0=j0["has_signs"],
            HAS_CENTER0=j0["has_center"], HAS_SMOOTH0=j0["has_smooth"],
            VEC1=j1["vec"], GROUP1=j1["group"], LOG_BLOCK1=j1["log_block"],
            HSCALE1=j1["hscale"], HAS_SIGNS1=j1["has_signs"],
            HAS_CENTER1=j1["has_center"], HAS_SMOOTH1=j1["has_smooth"],
            LIMIT=storable_limit(bits, j0["codes"].dtype), SPREAD=spread_here,
            num_warps=warps,
            # Bit-exactness: the reference rounds every multiply and add separately.
            enable_fp_fusion=False,
        )  # fmt: skip
    if own_flag and int(flag[0]):
        raise NonFiniteKVError(
            "keys/values hold NaN/Inf or values beyond the cache's range, which the cache "
            "cannot store; the model's activations overflowed (load it in bfloat16 or float32)"
        )


@functools.lru_cache(maxsize=None)
def _hadamard_scale(block: int) -> float:
    return hadamard_scale(block)  # builds a tensor: cached off the per-step launch path


def _job(x: torch.Tensor, store: SideStore, bits: int) -> dict:
    """Kernel arguments of one (side, pool) write."""
    pool = store.pools[bits]
    spec = pool.spec
    heads = store.heads[bits]
    head_dim = x.shape[2]
    group = spec.groups_divisor
    # 16-byte loads; a chunk never straddles the end of the row (padding is whole chunks).
    vec = min(16 // x.element_size(), head_dim & -head_dim)
    return {
        "x": x,
        "heads": heads,
        "signs": store.signs if store.signs is not None else heads,
        # Absent tables: any valid pointer stands in (the constexpr flags skip the loads).
        "center": store.center if store.center is not None else heads,
        "inv_smooth": store.inv_smooth if store.inv_smooth is not None else heads,
        "has_center": store.center is not None,
        "has_smooth": store.inv_smooth is not None,
        "codes": pool.codes,
        "scale": pool.scale if pool.scale is not None else pool.codes,
        "zero": pool.zero if pool.zero is not None else pool.codes,
        "num_rows": x.shape[0] * spec.num_heads,
        "num_pool_heads": spec.num_heads,
        "vec": vec,
        "group": group,
        "log_block": store.block.bit_length() - 1,
        "hscale": _hadamard_scale(store.block),
        "has_signs": store.signs is not None,
    }


# --------------------------------------------------------------------------------------------
# Validation (launcher only; the kernel trusts its arguments)
# --------------------------------------------------------------------------------------------


def _check_kernel_limits(
    k: torch.Tensor, v: torch.Tensor, k_store: SideStore, v_store: SideStore
) -> None:
    """What the Triton kernel needs beyond the twin: contiguity, dtypes."""
    if k.shape[2] != v.shape[2]:
        raise InputError(
            f"k head_dim {k.shape[2]} != v head_dim {v.shape[2]}; the Triton writer needs one "
            f"head_dim for both sides (or use rotate_quantize_paged_ref)"
        )
    for name, x in (("k", k), ("v", v)):
        if x.stride(2) != 1:
            raise InputError(f"{name} must have a contiguous last dim; pass {name}.contiguous()")
    for side, store in (("k", k_store), ("v", v_store)):
        if store.signs is not None and store.signs.dtype != torch.float32:
            raise InputError(f"{side}_store.signs must be float32, got {store.signs.dtype}")
        for bits, pool in store.pools.items():
            # Group sizes need no check here: PoolSpec holds them to sawquant.config's rule.
            if bits != 16 and pool.codes.dtype != torch.uint8:
                raise InputError(
                    f"{side}_store.pools[{bits}].codes must be uint8, got {pool.codes.dtype}"
                )
            if bits == 16 and pool.codes.dtype not in INPUT_DTYPES:
                raise InputError(
                    f"{side}_store.pools[{bits}].codes dtype {pool.codes.dtype} is not a float "
                    f"dtype (bf16, fp16, fp32)"
                )
            if store.heads[bits].dtype != torch.int32:
                raise InputError(f"{side}_store.heads[{bits}] must be int32")
            for field in ("codes", "scale", "zero"):
                t = getattr(pool, field)
                if t is not None and t.stride(-1) != 1:
                    raise InputError(
                        f"{side}_store.pools[{bits}].{field} needs a contiguous last dim "
                        f"(pools may otherwise be strided views, e.g. into an engine's blocks)"
                    )
