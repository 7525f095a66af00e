"""Paged decode attention over the quantized KV cache: one new query token per sequence.

One program serves every query head of a GQA group from ONE read of its KV head's pages
(flash-decoding: the context is also split across programs, and a second kernel merges the
splits by log-sum-exp). The query is rotated in the kernel with the K store's rotation; the
output is un-rotated with the V store's rotation in the merge (the rotation is linear, so once
at the end is enough).

Tiles are full width, [BLOCK_N tokens, BLOCK_D channels], in a PERMUTED channel order: INT4
rows are read as 32-bit words (8 codes) and unpacked by a few lines of inline PTX into fp16
pairs exactly as they fall out of the bit tricks (channels 0, 4 | 2, 6 | 1, 5 | 3, 7 of each
word), with no shuffles back into natural order. A dot product does not care about the order of
its reduction axis, so q is rotated straight into that order (the launcher permutes the
rotation matrix's columns) and the output is stored through the same channel map. With
``k = code * scale + zero`` per token, ``q . k = scale * (q . code) + zero * sum(q)`` and
``P @ V = (P * scale) @ code + sum(P * zero)``: the tensor cores see only exact code values.

Both matrix products are transposed, ``s^T = K q^T`` and ``acc^T += V^T P^T``, so their M side
is 128 (tokens, channels) and Hopper's wgmma runs them; the GQA group (4 heads for Qwen3-8B,
padded to 16) is the narrow N side. Per-group scales of INT4 heads are read in the same
permuted order. Fallback heads are launched as their own head groups, each with its own split
count, so a lone fallback head still fills the GPU. On NVIDIA GPUs INT8 heads (one scale per
token) run the tensor-core kernel like INT4 ones (decode_mma.py; H200, 64x16k, one INT8 K head:
1.15x the plain INT4 layer, 1.32x in this kernel). Here 16-bit (and grouped INT8) heads are
read in NATURAL channel order (16-byte loads along each row; q and the output follow that
side's order) and dot in their storage dtype on the GPU.

Everything derived from the layer's stores (head groups, rotation matrices in channel order,
SM count) comes in a ``DecodePlan`` built once per layer; launch parameters come in a
``DecodeTuning`` (defaults from the sweeps). The twin, ``sawquant.quant.decode``, is the spec.
"""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from sawquant.format import SideStore
from sawquant.kernels.common import rotate_rows
from sawquant.kernels.plans import (
    DEFAULT_DECODE_TUNING,
    MMA_GROUP_SIZES,
    DecodePlan,
    DecodeTuning,
    merge_heads,
    mma_columns,
    mma_programs_per_sm,
    mma_register_cap,
    next_pow2,
)
from sawquant.quant.decode import check_decode_inputs

try:  # Gluon (explicit layouts) ships with triton >= 3.5; without it the Triton kernel serves
    from sawquant.kernels.decode_mma import launch_mma_split
except ImportError as _err:  # pragma: no cover - the supported tritons all have it
    launch_mma_split = None
    _MMA_MISSING = f"{type(_err).__name__}: {_err}"

__all__ = [
    "LAUNCHES",
    "DecodePlan",
    "DecodeTuning",
    "merge_splits",
    "paged_decode_attention",
    "split_choices",
]

# Split-kernel launches by kernel ("mma": the tensor-core kernel, "triton": the Triton one), so
# benchmarks and GPU checks can show which path really ran.
LAUNCHES: Counter = Counter()
_warned_mma = False
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}  # per device: the fallback groups' stream


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no libdevice (runs in the interpreter).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _codes_f16(c):
    """uint8 codes (0..255) to fp16 without the slow int->float converter: the bit pattern
    0x6400 | c is the fp16 number 1024 + c, and subtracting 1024 is exact."""
    return ((c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0).to(tl.float16)


# INT4 codes are read as 32-bit words (8 nibbles = channels 8w .. 8w+7) and unpacked to 8 fp16
# slot tensors [BLOCK_N, BLOCK_W] with 11 instructions per word (lop3 + the 0x6400 trick on
# fp16 pairs: 1024 + code, minus 1024), then joined to one [BLOCK_N, 8 * BLOCK_W] tile whose
# column c' holds channel chan[c'] (_channel_map). Used where scales are per group (the codes
# are dequantized in registers there).
_UNPACK_ASM = tl.constexpr(
    """{
.reg .b32 w8, a0, a1, b0, b1, m, c;
shr.u32 w8, $8, 8;
lop3.b32 a0, $8, 0x000f000f, 0x64006400, 0xea;
lop3.b32 a1, w8, 0x000f000f, 0x64006400, 0xea;
lop3.b32 b0, $8, 0x00f000f0, 0x64006400, 0xea;
lop3.b32 b1, w8, 0x00f000f0, 0x64006400, 0xea;
mov.b32 m, 0x64006400;
sub.f16x2 a0, a0, m;
sub.f16x2 a1, a1, m;
mov.b32 m, 0x2c002c00;
mov.b32 c, 0xd400d400;
fma.rn.f16x2 b0, b0, m, c;
fma.rn.f16x2 b1, b1, m, c;
mov.b32 {$0, $1}, a0;
mov.b32 {$2, $3}, a1;
mov.b32 {$4, $5}, b0;
mov.b32 {$6, $7}, b1;
}"""
)


# Subnormal variant (the default with per-token scales): the masked nibble bits ARE an fp16
# number, code * 2**-24 (low nibble) or code * 2**-20 (high nibble): 5 instructions per word;
# the factors fold into q (1/16 on odd channels), the K scale (2**24) and the stored output.
# The tensor cores keep fp16 subnormals (checked on the H100 against the float32 twin).
_UNPACK_SUBNORMAL_ASM = tl.constexpr(
    """{
.reg .b32 w8, a0, a1, b0, b1;
shr.u32 w8, $8, 8;
and.b32 a0, $8, 0x000f000f;
and.b32 a1, w8, 0x000f000f;
and.b32 b0, $8, 0x00f000f0;
and.b32 b1, w8, 0x00f000f0;
mov.b32 {$0, $1}, a0;
mov.b32 {$2, $3}, a1;
mov.b32 {$4, $5}, b0;
mov.b32 {$6, $7}, b1;
}"""
)


@triton.jit
def _bits_f16(x):
    """Low 16 bits of an int32 tensor reinterpreted as fp16."""
    return x.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _interleave8(x0, x1, x2, x3, x4, x5, x6, x7):
    """8 tensors [..., W] -> [..., W, 2, 2, 2]; flattened, a fixed slot order per word."""
    a = tl.join(tl.join(x0, x1), tl.join(x2, x3))
    b = tl.join(tl.join(x4, x5), tl.join(x6, x7))
    return tl.join(a, b)  # [..., W, 2, 2, 2]


@triton.jit
def _nibble_slots(w, USE_ASM: tl.constexpr, SUBN: tl.constexpr):
    """int32 words [BLOCK_N, BLOCK_W] -> [BLOCK_N, 8 BLOCK_W] fp16 tile in _channel_map order:
    code values, or with SUBN the subnormals code * 2**-24 (even channels) / 2**-20 (odd)."""
    if SUBN and USE_ASM:
        s0, s1, s2, s3, s4, s5, s6, s7 = tl.inline_asm_elementwise(
            _UNPACK_SUBNORMAL_ASM,
            "=h,=h,=h,=h,=h,=h,=h,=h,r",
            [w],
            dtype=(tl.float16,) * 8,
            is_pure=True,
            pack=1,
        )
    elif SUBN:
        s0 = _bits_f16(w & 15)
        s1 = _bits_f16((w >> 16) & 15)
        s2 = _bits_f16((w >> 8) & 15)
        s3 = _bits_f16((w >> 24) & 15)
        s4 = _bits_f16(w & 0xF0)
        s5 = _bits_f16((w >> 16) & 0xF0)
        s6 = _bits_f16((w >> 8) & 0xF0)
        s7 = _bits_f16((w >> 24) & 0xF0)
    elif USE_ASM:
        s0, s1, s2, s3, s4, s5, s6, s7 = tl.inline_asm_elementwise(
            _UNPACK_ASM,
            "=h,=h,=h,=h,=h,=h,=h,=h,r",
            [w],
            dtype=(tl.float16,) * 8,
            is_pure=True,
            pack=1,
        )
    else:  # the Triton interpreter has no inline assembly: same values, plain shifts
        s0 = _codes_f16(w & 15)
        s1 = _codes_f16((w >> 16) & 15)
        s2 = _codes_f16((w >> 8) & 15)
        s3 = _codes_f16((w >> 24) & 15)
        s4 = _codes_f16((w >> 4) & 15)
        s5 = _codes_f16((w >> 20) & 15)
        s6 = _codes_f16((w >> 12) & 15)
        s7 = _codes_f16((w >> 28) & 15)
    # Slot order s0, s1 (one fp16x2 register of the asm), s2, s3, ...: the pairs stay packed.
    x = _interleave8(s0, s4, s2, s6, s1, s5, s3, s7)  # [BLOCK_N, BLOCK_W, 2, 2, 2]
    return x.reshape([x.shape[0], x.shape[1] * 8])


@triton.jit
def _channel_map(BLOCK_W: tl.constexpr):
    """[8 * BLOCK_W] int32: the channel held by each column of an unpacked tile."""
    w8 = tl.arange(0, BLOCK_W) * 8
    x = _interleave8(w8, w8 + 1, w8 + 2, w8 + 3, w8 + 4, w8 + 5, w8 + 6, w8 + 7)
    return x.reshape([8 * BLOCK_W])


@triton.jit
def _load_tile_raw(
    ptr, tok, chan, words, tok_ok, HEAD_DIM: tl.constexpr, BITS: tl.constexpr, WORDS: tl.constexpr
):
    """Raw codes of a tile: INT4 as int32 words [BLOCK_N, BLOCK_W]; INT8 / 16-bit as
    [BLOCK_N, BLOCK_D] elements already in the permuted channel order."""
    if BITS == 4:
        if WORDS:  # rows start 4-byte aligned (so HEAD_DIM % 8 == 0): one 32-bit load a word
            w_ok = tok_ok[:, None] & (words < HEAD_DIM // 8)[None, :]
            p32 = ptr.to(tl.pointer_type(tl.int32))
            raw = tl.load(p32 + (tok // 4)[:, None] + words[None, :], mask=w_ok, other=0)
        else:  # byte by byte; the last word of a row may be partial (HEAD_DIM % 8 == 2, 4, 6)
            byte = ptr + tok[:, None] + 4 * words[None, :]
            b_idx = 4 * words[None, :]
            raw = tl.zeros(byte.shape, tl.int32)
            for j in tl.static_range(4):
                ok = tok_ok[:, None] & (b_idx + j < HEAD_DIM // 2)
                raw |= tl.load(byte + j, mask=ok, other=0).to(tl.int32) << (8 * j)
    else:
        if chan.shape[0] == HEAD_DIM:  # no column mask: 16-byte loads along natural rows
            c_ok = tok_ok[:, None]
        else:
            c_ok = tok_ok[:, None] & (chan < HEAD_DIM)[None, :]
        raw = tl.load(ptr + tok[:, None] + chan[None, :], mask=c_ok, other=0)
    return raw


@triton.jit
def _tile_values(
    raw, BITS: tl.constexpr, USE_ASM: tl.constexpr, SUBN: tl.constexpr, DOT16: tl.constexpr
):
    """Raw tile -> [BLOCK_N, BLOCK_D]: fp16 code values (INT4/INT8) or the stored floats (in
    their own 16-bit dtype with DOT16, else float32)."""
    if BITS == 4:
        return _nibble_slots(raw, USE_ASM, SUBN)
    elif BITS == 8:
        return _codes_f16(raw)
    elif DOT16:
        return raw
    else:
        return raw.to(tl.float32)


@triton.jit
def _v_tile(
    raw,
    sc,
    zr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_ASM: tl.constexpr,
    SUBN: tl.constexpr,
    DOT16: tl.constexpr,
):
    """V tile values; per-group INT tiles are dequantized here (per-token scales are folded
    into P by the caller instead)."""
    vt = _tile_values(raw, BITS, USE_ASM, SUBN, DOT16)
    if BITS != 16 and GS != HEAD_DIM:
        vt = _group_dequant(vt, sc, zr, GS)
    return vt


@triton.jit
def _group_dequant(vals, sc, zr, GS: tl.constexpr):
    """[BLOCK_N, BLOCK_D] code values and [BLOCK_N, BLOCK_D // GS] scales / zeros -> fp16
    values. A tile column's group is its column // GS: the tile order permutes channels only
    within a word of 8, and groups are whole words."""
    n: tl.constexpr = vals.shape[0]
    d: tl.constexpr = vals.shape[1]
    v3 = tl.reshape(vals.to(tl.float32), [n, d // GS, GS])
    v3 = v3 * sc.to(tl.float32)[:, :, None] + zr.to(tl.float32)[:, :, None]
    return tl.reshape(v3, [n, d]).to(tl.float16)


@triton.jit
def _load_params(
    S,
    Z,
    tok,
    chan,
    tok_ok,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Scale and zero of a tile: [BLOCK_N] per token, [BLOCK_N, BLOCK_D // GS] per group
    (fp16). Per group they were loaded broadcast over the tile's [BLOCK_N, BLOCK_D] once:
    with the prefetched tile's, 4 such tensors in registers spilled (H200, Qwen3-8B layer,
    groups of 32: 23.8 ms at 32 x 16k, 120x per-token scales; RESULTS.md)."""
    if BITS == 16:
        sc = tl.zeros([BLOCK_N], tl.float16)
        zr = sc
    elif GS == HEAD_DIM:
        sc = tl.load(S + tok, mask=tok_ok, other=0.0)
        zr = tl.load(Z + tok, mask=tok_ok, other=0.0)
    else:
        ng: tl.constexpr = chan.shape[0] // GS
        grp = tl.arange(0, ng)
        g_off = tok[:, None] + grp[None, :]
        g_ok = tok_ok[:, None] & (grp < HEAD_DIM // GS)[None, :]
        sc = tl.load(S + g_off, mask=g_ok, other=0.0)
        zr = tl.load(Z + g_off, mask=g_ok, other=0.0)
    return sc, zr


# fmt: off
@triton.jit
def _decode_split_kernel(
    # pointers
    Q, KC, KS, KZ, VC, VS, VZ, BT, LENS, HEADS, KIDX, VIDX, HK, KSM, ML, ACC,
    # sizes
    qk_scale, k_rot_scale, softcap, window, num_splits, num_q_heads, max_len,
    # strides (elements; the last dim of every tensor is contiguous)
    stride_qb, stride_qh,
    stride_kcp, stride_kch, stride_kct,
    stride_ksp, stride_ksh, stride_kst,
    stride_vcp, stride_vch, stride_vct,
    stride_vsp, stride_vsh, stride_vst,
    stride_btb,
    # constexpr
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_W: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GS: tl.constexpr, V_GS: tl.constexpr,
    K_ROT: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    K_WORDS: tl.constexpr, V_WORDS: tl.constexpr, USE_ASM: tl.constexpr,
    K_SUBN: tl.constexpr, V_SUBN: tl.constexpr,
    K_NAT: tl.constexpr, V_NAT: tl.constexpr, K_DOT16: tl.constexpr, V_DOT16: tl.constexpr,
    K_SMOOTH: tl.constexpr,
):
    """One (sequence, KV head, context split): partial softmax state of the GQA group's heads.

    Writes ML[b, h, split] = (running max in log2 units, sum of exp2) and ACC[b, h, split, :]
    = the unnormalised weighted sum of V, still in V's rotated basis (natural channel order).
    The context is cut into as many chunks as the grid has splits (tl.num_programs(2));
    ``num_splits`` is the split axis of ML / ACC, which may be larger (other head groups).
    K_NAT / V_NAT: that side's tiles are in natural channel order (INT8 and 16-bit pools: each
    thread reads contiguous 16-byte runs of a row) instead of the INT4 unpack order; K_DOT16 /
    V_DOT16: a 16-bit side's dots run in its storage dtype (fp16/bf16) instead of float32.
    """
    tl.static_assert(BLOCK_G >= 16)
    tl.static_assert(8 * BLOCK_W >= HEAD_DIM)
    b = tl.program_id(0)
    i = tl.program_id(1)
    split = tl.program_id(2)
    kvh = tl.load(HEADS + i)
    kp = tl.load(KIDX + i).to(tl.int64)
    vp = tl.load(VIDX + i).to(tl.int64)

    length = tl.minimum(tl.load(LENS + b), max_len)  # never read past the block table
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(length - window, 0)
    chunk = tl.cdiv(tl.cdiv(length - start, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, length)

    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < GROUP
    heads = kvh * GROUP + rows  # [BLOCK_G] query heads
    chan = _channel_map(BLOCK_W)  # [BLOCK_D] channel of each tile column
    if K_NAT:
        k_chan = tl.arange(0, 8 * BLOCK_W)
    else:
        k_chan = chan
    if V_NAT:
        v_chan = tl.arange(0, 8 * BLOCK_W)
    else:
        v_chan = chan
    words = tl.arange(0, BLOCK_W)
    q_row = Q + b.to(tl.int64) * stride_qb + heads.to(tl.int64)[:, None] * stride_qh

    # Rotated q in the permuted order: q' = q @ (diag(signs) H)[:, chan]  [BLOCK_G, BLOCK_D];
    # HK holds that matrix with its columns already permuted by the launcher ([D, BLOCK_D]).
    if K_ROT:
        d = tl.arange(0, 8 * BLOCK_W)
        d_ok = d < HEAD_DIM
        q = tl.load(q_row + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q = q.to(tl.float32)
        if K_SMOOTH:  # keys were stored divided by smooth: q takes it (q . k unchanged)
            q = q * tl.load(KSM + kvh * HEAD_DIM + d, mask=d_ok, other=0.0)[None, :]
        qp = rotate_rows(q, HK, k_rot_scale, d * (8 * BLOCK_W), d, d_ok[:, None])
    else:
        qp = tl.load(
            q_row + k_chan[None, :], mask=row_ok[:, None] & (k_chan < HEAD_DIM)[None, :], other=0.0
        )
        qp = qp.to(tl.float32)
        if K_SMOOTH:
            qp = qp * tl.load(
                KSM + kvh * HEAD_DIM + k_chan, mask=k_chan < HEAD_DIM, other=0.0
            )[None, :]
    # Codes are exact in fp16, so the dots see the rotated q rounded once; 16-bit heads dot in
    # float32 (tf32 on the GPU; bf16 dots are wrong in the interpreter).
    odd = (chan % 2)[None, :] == 1  # [1, BLOCK_D] high-nibble channels
    if K_SUBN:  # odd channels' codes come 16x larger (code * 2**-20): q takes the 1/16
        qp = tl.where(odd, qp * 0.0625, qp)
    if K_BITS != 16:
        qp = qp.to(tl.float16)
    elif K_DOT16:
        qp = qp.to(KC.dtype.element_ty)
    if K_SUBN:  # sum(q) in code units, of the very values the dots use
        q_sum = tl.sum(tl.where(odd, qp.to(tl.float32) * 16.0, qp.to(tl.float32)), 1)
    else:
        q_sum = tl.sum(qp.to(tl.float32), 1)  # [BLOCK_G]
    q_t = tl.trans(qp)  # [BLOCK_D, BLOCK_G]: the B operand of the score MMA

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    z_i = tl.zeros([BLOCK_G], tl.float32)  # sum_n p_n * zero_n: V's zero-point term, per row
    acc = tl.zeros([8 * BLOCK_W, BLOCK_G], tl.float32)  # transposed output: [BLOCK_D, BLOCK_G]
    bt_row = BT + b.to(tl.int64) * stride_btb

    # Software prefetch, by hand: the codes of tile n+1 and the page ids of tile n+2 are in
    # flight while tile n is computed (the page-id -> codes dependency would otherwise expose
    # two memory latencies per tile; on the H100, leaving it to Triton's pipeliner was 3-18 %
    # slower, RESULTS.md).
    pos = lo + tl.arange(0, BLOCK_N)
    tok_ok = pos < hi
    page = tl.load(bt_row + pos // PAGE, mask=tok_ok, other=0).to(tl.int64)
    k_tok = page * stride_kcp + kp * stride_kch + (pos % PAGE) * stride_kct
    v_tok = page * stride_vcp + vp * stride_vch + (pos % PAGE) * stride_vct
    ks_tok = page * stride_ksp + kp * stride_ksh + (pos % PAGE) * stride_kst
    vs_tok = page * stride_vsp + vp * stride_vsh + (pos % PAGE) * stride_vst
    nk = _load_tile_raw(KC, k_tok, k_chan, words, tok_ok, HEAD_DIM, K_BITS, K_WORDS)
    nv = _load_tile_raw(VC, v_tok, v_chan, words, tok_ok, HEAD_DIM, V_BITS, V_WORDS)
    nk_s, nk_z = _load_params(KS, KZ, ks_tok, k_chan, tok_ok, K_BITS, K_GS, HEAD_DIM, BLOCK_N)
    nv_s, nv_z = _load_params(VS, VZ, vs_tok, v_chan, tok_ok, V_BITS, V_GS, HEAD_DIM, BLOCK_N)
    pos2 = pos + BLOCK_N
    page2 = tl.load(bt_row + pos2 // PAGE, mask=pos2 < hi, other=0).to(tl.int64)

    for n0 in range(lo, hi, BLOCK_N):
        k_raw, k_s, k_z = nk, nk_s, nk_z
        v_raw, v_s, v_z = nv, nv_s, nv_z
        pos = n0 + tl.arange(0, BLOCK_N)
        tok_ok = pos < hi

        # ---- prefetch tile n0 + BLOCK_N (page ids already here) and page ids of n0 + 2 BLOCK_N
        pos1 = pos + BLOCK_N
        ok1 = pos1 < hi
        off1 = pos1 % PAGE
        k_tok = page2 * stride_kcp + kp * stride_kch + off1 * stride_kct
        v_tok = page2 * stride_vcp + vp * stride_vch + off1 * stride_vct
        ks_tok = page2 * stride_ksp + kp * stride_ksh + off1 * stride_kst
        vs_tok = page2 * stride_vsp + vp * stride_vsh + off1 * stride_vst
        nk = _load_tile_raw(KC, k_tok, k_chan, words, ok1, HEAD_DIM, K_BITS, K_WORDS)
        nk_s, nk_z = _load_params(KS, KZ, ks_tok, k_chan, ok1, K_BITS, K_GS, HEAD_DIM, BLOCK_N)
        nv = _load_tile_raw(VC, v_tok, v_chan, words, ok1, HEAD_DIM, V_BITS, V_WORDS)
        nv_s, nv_z = _load_params(VS, VZ, vs_tok, v_chan, ok1, V_BITS, V_GS, HEAD_DIM, BLOCK_N)
        pos2 = pos + 2 * BLOCK_N
        page2 = tl.load(bt_row + pos2 // PAGE, mask=pos2 < hi, other=0).to(tl.int64)

        # ---- scores, transposed: s^T = K q'^T  [BLOCK_N, BLOCK_G]. Both MMAs of the loop have
        # M = 128 (tokens, then channels), so Hopper's wgmma runs them; the GQA group (4 heads,
        # padded to 16) is the narrow N side.
        kt = _tile_values(k_raw, K_BITS, USE_ASM, K_SUBN, K_DOT16)  # [BLOCK_N, BLOCK_D]
        if K_BITS != 16 and K_GS != HEAD_DIM:  # per-group scales: dequantize in registers
            kt = _group_dequant(kt, k_s, k_z, K_GS)
        s = tl.dot(kt, q_t)
        if K_BITS != 16 and K_GS == HEAD_DIM:
            ks32 = k_s.to(tl.float32) * (16777216.0 if K_SUBN else 1.0)  # 2**24
            s = s * ks32[:, None] + k_z.to(tl.float32)[:, None] * q_sum[None, :]

        # ---- online softmax in float32, log2 units, along the token axis 0
        s = s * qk_scale
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(tok_ok[:, None], s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])  # [BLOCK_N, BLOCK_G]
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha[None, :]
        z_i = z_i * alpha
        m_i = m_new

        # ---- acc^T += V^T P^T  [BLOCK_D, BLOCK_G]; per-token V scales go into P
        vt = _v_tile(v_raw, v_s, v_z, V_BITS, V_GS, HEAD_DIM, USE_ASM, V_SUBN, V_DOT16)
        if V_BITS == 16 and V_DOT16:
            acc += tl.dot(tl.trans(vt), p.to(vt.dtype))
        elif V_BITS == 16:
            acc += tl.dot(tl.trans(vt), p)
        elif V_GS == HEAD_DIM:
            pv = (p * v_s.to(tl.float32)[:, None]).to(tl.float16)
            acc += tl.dot(tl.trans(vt), pv)
            z_i += tl.sum(p * v_z.to(tl.float32)[:, None], 0)
        else:
            acc += tl.dot(tl.trans(vt), p.to(tl.float16))

    # Partial state of this split; an empty split leaves m = -inf, l = 0 (weight 0 in the merge).
    part = (b.to(tl.int64) * num_q_heads + heads) * num_splits + split  # [BLOCK_G]
    tl.store(ML + 2 * part, m_i, mask=row_ok)
    tl.store(ML + 2 * part + 1, l_i, mask=row_ok)
    if V_SUBN:  # subnormal V codes: even channels came as code * 2**-24, odd as code * 2**-20
        acc = acc * tl.where(chan % 2 == 1, 1048576.0, 16777216.0)[:, None]
    acc = acc + z_i[None, :]
    a_ptr = ACC + part[None, :] * HEAD_DIM + v_chan[:, None]
    tl.store(a_ptr, acc, mask=row_ok[None, :] & (v_chan < HEAD_DIM)[:, None])
# fmt: on


# fmt: off
@triton.jit
def _decode_combine_kernel(
    ML, ACC, HV, VSM, VCE, OUT,
    v_rot_scale, num_splits, num_q_heads,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, V_ROT: tl.constexpr,
    GROUP: tl.constexpr, V_SMOOTH: tl.constexpr, V_CENTER: tl.constexpr, S_BLOCK: tl.constexpr,
    ROT_CHUNK: tl.constexpr,
):
    """Merge the splits of BLOCK_H query heads by log-sum-exp, un-rotate, undo the V
    transforms (``* smooth + center`` of each head's KV head: exact, the weights sum to 1),
    write q.dtype.

    BLOCK_H is 16 where the batch gives enough programs (the un-rotation is then a tensor-core
    dot), else as few as 1 head per program (the un-rotation is then a broadcast product,
    ROT_CHUNK output columns at a time): at batch 1 the merge's latency, not its work, is the
    cost, and 32 programs of one head finish sooner than 2 of 16.
    """
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_q_heads
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    base = (b.to(tl.int64) * num_q_heads + heads) * num_splits  # [BLOCK_H]

    # One pass, S_BLOCK splits at a time, the running maximum rescaled as in the online
    # softmax: the m, l and acc loads of a pass do not wait on each other (a first pass for the
    # maximum would be a second dependent round trip, which at batch 1 is most of the cost).
    s_idx = tl.arange(0, S_BLOCK)
    m_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, S_BLOCK):
        sj = s0 + s_idx
        part = base[:, None] + sj[None, :]  # [BLOCK_H, S_BLOCK]
        ok = h_ok[:, None] & (sj < num_splits)[None, :]
        m = tl.load(ML + 2 * part, mask=ok, other=float("-inf"))
        lv = tl.load(ML + 2 * part + 1, mask=ok, other=0.0)
        a = tl.load(
            ACC + part[:, :, None] * HEAD_DIM + d[None, None, :],
            mask=ok[:, :, None] & d_ok[None, None, :],
            other=0.0,
        )  # [BLOCK_H, S_BLOCK, BLOCK_D]
        # m = -inf: an empty split, or a slot no program wrote (a head group with fewer
        # splits; the launcher set its m to -inf): weight 0, and its l and acc (never written,
        # possibly NaN) are zeroed rather than multiplied.
        live = m > float("-inf")
        m_new = tl.maximum(m_max, tl.max(m, 1))
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # no live split yet: any finite
        alpha = tl.exp2(m_max - m_ref)  # 0 while m_max is -inf
        w = tl.where(live, tl.exp2(m - m_ref[:, None]), 0.0)
        l_sum = l_sum * alpha + tl.sum(w * tl.where(live, lv, 0.0), 1)
        a = tl.where(live[:, :, None], a, 0.0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * a, 1)
        m_max = m_new
    o = acc / tl.where(h_ok & (l_sum > 0), l_sum, 1.0)[:, None]
    kv = (heads // GROUP).to(tl.int64)  # [BLOCK_H]
    out_row = OUT + b.to(tl.int64) * stride_ob + heads.to(tl.int64) * stride_oh  # [BLOCK_H]
    if V_ROT and BLOCK_H < 16:
        # Un-rotate o @ R.T = o @ (H diag(signs)) (HV), ROT_CHUNK output columns at a time in
        # float32 FMAs, each chunk stored as it is done.
        for c0 in tl.static_range(0, BLOCK_D, ROT_CHUNK):
            cols = c0 + tl.arange(0, ROT_CHUNK)
            c_ok = cols < HEAD_DIM
            hv = tl.load(
                HV + d[:, None] * HEAD_DIM + cols[None, :],
                mask=d_ok[:, None] & c_ok[None, :],
                other=0.0,
            ).to(tl.float32)  # [BLOCK_D, ROT_CHUNK]
            oc = tl.sum(o[:, :, None] * hv[None, :, :], 1) * v_rot_scale  # [BLOCK_H, ROT_CHUNK]
            _store_output(oc, out_row, kv, cols, h_ok[:, None] & c_ok[None, :], VSM, VCE,
                          HEAD_DIM, V_SMOOTH, V_CENTER)
    else:
        if V_ROT:  # o @ R.T = (o @ (H diag(signs))) with H symmetric; HV holds H diag(signs)
            o = rotate_rows(o, HV, v_rot_scale, d * HEAD_DIM, d, d_ok[:, None] & d_ok[None, :])
        _store_output(o, out_row, kv, d, h_ok[:, None] & d_ok[None, :], VSM, VCE,
                      HEAD_DIM, V_SMOOTH, V_CENTER)


@triton.jit
def _store_output(o, out_row, kv, cols, mask, VSM, VCE, HEAD_DIM: tl.constexpr,
                  V_SMOOTH: tl.constexpr, V_CENTER: tl.constexpr):
    """o [BLOCK_H, C] (columns ``cols`` of the output rows) ``* smooth + center``, stored."""
    kv_off = kv[:, None] * HEAD_DIM + cols[None, :]
    if V_SMOOTH:
        o = o * tl.load(VSM + kv_off, mask=mask, other=0.0)
    if V_CENTER:
        o = o + tl.load(VCE + kv_off, mask=mask, other=0.0)
    tl.store(out_row[:, None] + cols[None, :], o.to(out_row.dtype.element_ty), mask=mask)
# fmt: on


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _dot16(codes: torch.Tensor, use_asm: bool) -> bool:
    """A 16-bit pool's dots run in its storage dtype (fp16 / bf16 tensor cores, as SDPA does)
    on the GPU; float32 elsewhere (the interpreter's bf16 dots are not exact) and for fp32."""
    return use_asm and codes.dtype in (torch.float16, torch.bfloat16)


def _word_aligned(codes: torch.Tensor) -> bool:
    """Every INT4 row of ``codes`` starts on a 4-byte boundary (32-bit word loads)."""
    return codes.data_ptr() % 4 == 0 and all(s % 4 == 0 for s in codes.stride()[:3])


def _wide(g, k_store: SideStore, v_store: SideStore) -> bool:
    """A side of head group ``g`` has per-group scales or INT8 codes (the tensor-core kernel's
    wide build: more registers, fewer programs per SM)."""
    pools = (k_store.pools[g.k_bits], v_store.pools[g.v_bits])
    return any(p.spec.bits == 8 or p.spec.groups_divisor != p.spec.head_dim for p in pools)


def _mma_applies(plan: DecodePlan, tuning, g, k_store, v_store, group: int, d: int) -> bool:
    """This head group (INT4 or INT8 on each side) runs the tensor-core kernel (decode_mma.py)."""
    global _warned_mma
    bits = (g.k_bits, g.v_bits)
    if not (plan.mma_capable and set(bits) <= {4, 8} and group <= 16):
        return False
    if 8 in bits and not tuning.mma_int8:
        return False
    if k_store.page_size % tuning.mma_tokens_per_warp:
        return False  # a warp's tokens must share a page
    kpool, vpool = k_store.pools[g.k_bits], v_store.pools[g.v_bits]
    # Per-group scales: the kernel dequantizes such an INT4 side's codes in registers (groups
    # of 2-8 words); other sizes, scales not contiguous by group, or a grouped INT8 side go to
    # the Triton kernel.
    for pool in (kpool, vpool):
        if pool.spec.groups_divisor != d and not (
            pool.spec.bits == 4 and tuning.mma_groups
            and pool.spec.groups_divisor in MMA_GROUP_SIZES and pool.scale.stride(-1) == 1
        ):  # fmt: skip
            return False
    if not (_word_aligned(kpool.codes) and _word_aligned(vpool.codes)):
        return False
    if launch_mma_split is None:
        if not _warned_mma:
            _warned_mma = True
            warnings.warn(
                f"sawquant: the tensor-core INT4 decode kernel is unavailable ({_MMA_MISSING}); "
                "decoding with the slower Triton kernel. Install triton>=3.6 for it.",
                stacklevel=3,
            )
        return False
    return True


def split_choices(
    plan: DecodePlan,
    k_store: SideStore,
    v_store: SideStore,
    batch: int,
    group: int,
    max_len: int,
    *,
    num_splits: int | None = None,
    tuning: DecodeTuning = DEFAULT_DECODE_TUNING,
) -> tuple[list[bool], list[int]]:
    """Per head group of ``plan``: whether it runs the tensor-core kernel, and its context
    splits (``max_len``: the block table's positions). What the launcher does, for benchmarks
    and tests to read without launching. The main group is sized first; the others, when they
    run beside it on the side stream, within ``tuning.side_split_ratio`` of its splits."""
    d = k_store.head_dim
    side = tuning.concurrent_groups and plan.concurrent and tuning.side_split_ratio > 0
    main = plan.main_group
    mma, splits = [False] * len(plan.groups), [1] * len(plan.groups)
    for i in sorted(range(len(plan.groups)), key=lambda i: i != main):  # the main group first
        g = plan.groups[i]
        n = g.heads.numel()
        # Beside the main group: no fewer splits than it (its programs no longer than the main
        # group's), at most side_split_ratio times as many (the merge reads the most splits of
        # any group for every query head); others: the main group's programs, running at the
        # same time, so the launch is not latency-bound on its own.
        bounds, others = None, 0
        if side and i != main:
            bounds = (splits[main], tuning.side_split_ratio * splits[main])
            others = batch * plan.groups[main].heads.numel() * splits[main]
        m = tuning.mma and _mma_applies(plan, tuning, g, k_store, v_store, group, d)
        if num_splits:
            s = num_splits
        elif m:
            per_sm = mma_programs_per_sm(group, tuning, _wide(g, k_store, v_store))
            s = plan.mma_splits(batch, n, max_len, per_sm, tuning.mma_min_tokens)
        else:
            s = plan.splits(batch, n, max_len)
        s = _within(s, bounds, num_splits)
        # Short programs, or fewer programs than half the SMs (a latency-bound launch, such as
        # 1x4k): the Triton kernel wins (H200: 15.9 against 17.9 us at 1x4k, RESULTS.md).
        if (
            m
            and tuning.mma_min_tokens
            and (max_len < tuning.mma_min_tokens * s or 2 * (batch * n * s + others) < plan.num_sms)
        ):
            m = False
            s = num_splits or plan.splits(batch, n, max_len)
        mma[i] = m
        splits[i] = int(max(1, _within(s, bounds, num_splits, pow2=not m)))
    return mma, splits


def _within(
    s: int, bounds: tuple[int, int] | None, num_splits: int | None, pow2: bool = False
) -> int:
    """Split count s clamped to a side group's bounds (a caller's num_splits is kept); pow2:
    then rounded down to a power of two, not below the lower bound. The Triton kernel's splits
    are powers of two (plan.splits): clamped to 36 at 8x32k a BF16 head took 168.6 us, at 32
    144.0 (H200, RESULTS.md)."""
    if bounds is None or num_splits:
        return s
    s = min(max(s, bounds[0]), bounds[1])
    p2 = 1 << (s.bit_length() - 1)
    return p2 if pow2 and p2 >= bounds[0] else s


def paged_decode_attention(
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
    plan: DecodePlan | None = None,
    tuning: DecodeTuning = DEFAULT_DECODE_TUNING,
) -> torch.Tensor:
    """Decode attention over the paged quantized cache (Triton).

    Equivalent to its twin ``sawquant.quant.decode.paged_decode_attention_ref``: q [B, H_q, D]
    (not rotated), block_table [B, max_pages] int32, seq_lens [B] int32 (the current token
    included). Query head h reads KV head ``h // (H_q // H_kv)``; ``sliding_window`` keeps the
    last that many positions; ``softcap`` maps logits s to ``softcap * tanh(s / softcap)``.
    Returns [B, H_q, D] in q.dtype, in the original (un-rotated) basis. ``plan`` is the layer's
    :class:`DecodePlan` (built here when None: engines keep one per layer); ``tuning`` the
    launch parameters (benchmarks only).
    """
    check_decode_inputs(
        q, k_store, v_store, block_table, seq_lens, sliding_window=sliding_window, softcap=softcap
    )
    b, h_q, d = q.shape
    if b == 0:
        return torch.empty_like(q)
    device = q.device
    if plan is None:
        plan = DecodePlan.build(k_store, v_store, device)
    group = h_q // k_store.num_kv_heads
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_table = block_table.contiguous()
    max_len = block_table.shape[1] * k_store.page_size
    mma, splits = split_choices(
        plan, k_store, v_store, b, group, max_len, num_splits=num_splits, tuning=tuning
    )
    total_splits = max(splits)

    ml = torch.empty(b, h_q, total_splits, 2, dtype=torch.float32, device=device)
    if min(splits) < total_splits:  # slots some group leaves unwritten: m = -inf, weight 0
        ml.fill_(float("-inf"))
    acc = torch.empty(b, h_q, total_splits, d, dtype=torch.float32, device=device)
    out = torch.empty_like(q)
    block_g = max(16, next_pow2(group))
    side = None
    if tuning.concurrent_groups and plan.concurrent and device.type == "cuda":
        main = torch.cuda.current_stream(device)
        side = _side_stream(device)
        side.wait_stream(main)  # q, the stores and ml / acc are ready (graph capture too)
    for i, (g, g_splits, g_mma) in enumerate(zip(plan.groups, splits, mma)):
        on_side = side is not None and i != plan.main_group
        with torch.cuda.stream(side) if on_side else nullcontext():
            _launch_group(
                q, k_store, v_store, block_table, seq_lens, ml, acc, plan, tuning, g, g_splits,
                g_mma, group, block_g, max_len, total_splits, softmax_scale, sliding_window,
                softcap,
            )  # fmt: skip
    if side is not None:
        main.wait_stream(side)
    return merge_splits(ml, acc, out, plan, v_store, group, tuning)


def _launch_group(
    q, k_store, v_store, block_table, seq_lens, ml, acc, plan, tuning, g, g_splits, g_mma,
    group, block_g, max_len, total_splits, softmax_scale, sliding_window, softcap,
) -> None:  # fmt: skip
    """The split kernel of one head group: the tensor-core kernel or the Triton one."""
    b, h_q, d = q.shape
    k_nat, v_nat = g.k_bits != 4, g.v_bits != 4
    kpool, vpool = k_store.pools[g.k_bits], v_store.pools[g.v_bits]
    if g_mma:
        LAUNCHES["mma"] += 1
        launch_mma_split(
            q, kpool, vpool, group, g, block_table, seq_lens, ml, acc,
            splits=g_splits, page_size=k_store.page_size,
            k_rot=plan.mma_rot8 if g.k_bits == 8 else plan.mma_rot,
            k_rot_scale=plan.k_rot_scale, k_smooth=k_store.smooth,
            softmax_scale=softmax_scale, sliding_window=sliding_window, softcap=softcap,
            max_len=max_len, num_q_heads=h_q, tokens_per_warp=tuning.mma_tokens_per_warp,
            columns=mma_columns(group),
            maxnreg=mma_register_cap(group, tuning, _wide(g, k_store, v_store)),
            depth=tuning.mma_depth,
        )  # fmt: skip
        return
    LAUNCHES["triton"] += 1
    # A 16-bit pool has no scale/zero: its codes stand in as (unused) pointers.
    ks = kpool.scale if kpool.scale is not None else kpool.codes
    kz = kpool.zero if kpool.zero is not None else kpool.codes
    vs = vpool.scale if vpool.scale is not None else vpool.codes
    vz = vpool.zero if vpool.zero is not None else vpool.codes
    # The q rotation with its columns in this group's K channel order ([D, 8 BLOCK_W]).
    rot = plan.k_rot_natural if k_nat else plan.k_rot
    subn = tuning.subnormal_unpack
    # fmt: off
    _decode_split_kernel[(b, g.heads.numel(), g_splits)](
        q, kpool.codes, ks, kz, vpool.codes, vs, vz,
        block_table, seq_lens, g.heads, g.k_index, g.v_index, q if rot is None else rot,
        q if k_store.smooth is None else k_store.smooth, ml, acc,
        softmax_scale, plan.k_rot_scale, softcap or 1.0, sliding_window or 0, total_splits,
        h_q, max_len,
        q.stride(0), q.stride(1),
        *kpool.codes.stride()[:3], *ks.stride()[:3],
        *vpool.codes.stride()[:3], *vs.stride()[:3],
        block_table.stride(0),
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=d, PAGE=k_store.page_size,
        K_BITS=g.k_bits, V_BITS=g.v_bits,
        K_GS=kpool.spec.groups_divisor, V_GS=vpool.spec.groups_divisor,
        K_ROT=rot is not None, HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=softcap is not None,
        BLOCK_W=plan.block_w, K_WORDS=_word_aligned(kpool.codes),
        V_WORDS=_word_aligned(vpool.codes), USE_ASM=plan.use_asm,
        K_SUBN=subn and g.k_bits == 4 and kpool.spec.groups_divisor == d,
        V_SUBN=subn and g.v_bits == 4 and vpool.spec.groups_divisor == d,
        K_NAT=k_nat, V_NAT=v_nat,
        K_DOT16=_dot16(kpool.codes, plan.use_asm),
        V_DOT16=_dot16(vpool.codes, plan.use_asm),
        K_SMOOTH=k_store.smooth is not None,
        BLOCK_N=g.block_n(d, tuning), num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
    )
    # fmt: on


def merge_splits(
    ml: torch.Tensor,
    acc: torch.Tensor,
    out: torch.Tensor,
    plan: DecodePlan,
    v_store: SideStore,
    group: int,
    tuning: DecodeTuning = DEFAULT_DECODE_TUNING,
) -> torch.Tensor:
    """The second kernel of a decode: merge the split kernels' partial states ``ml``
    [B, H_q, S, 2] and ``acc`` [B, H_q, S, D] into ``out`` [B, H_q, D] (un-rotated, V
    transforms undone). Separate so that benchmarks can time it alone."""
    b, h_q, total_splits, d = acc.shape
    block_h = merge_heads(b, h_q, plan.num_sms, tuning)
    block_d = next_pow2(max(d, 32))
    tile = max(1, 8192 // (block_h * block_d))  # elements of a merge tile: 64 per thread
    # fmt: off
    _decode_combine_kernel[(b, -(-h_q // block_h))](
        ml, acc, out if plan.v_unrot is None else plan.v_unrot,
        out if v_store.smooth is None else v_store.smooth,
        out if v_store.center is None else v_store.center, out, plan.v_rot_scale,
        total_splits, h_q,
        out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_H=block_h, V_ROT=plan.v_unrot is not None,
        GROUP=group, V_SMOOTH=v_store.smooth is not None, V_CENTER=v_store.center is not None,
        S_BLOCK=min(tile, next_pow2(total_splits)), ROT_CHUNK=min(tile, block_d), num_warps=4,
    )
    # fmt: on
    return out
