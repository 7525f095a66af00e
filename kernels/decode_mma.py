"""Decode attention for INT4 / INT8 heads on the tensor cores without layout conversions (Gluon).

The Triton kernel (``decode.py``) unpacks INT4 tiles into a blocked layout and lets the
compiler move them into the MMA operand layout through shared memory: on the H100/H200 that
round trip, not HBM, bounds it (ncu: shared-memory pipe 72 % busy, DRAM 29 %; RESULTS.md).
Here the layouts are written out (Gluon), so every thread LOADS the very codes its mma.sync
fragments need and unpacks them in registers: no shared memory in the loop at all.

How the fragments line up with memory (m16n8k16, fp16 operands, two values per register):
- A dot product does not care about the order of its reduction axis, nor a store about the
  order of its columns. So each of the 8 nibble slots j of a 32-bit word (channel 8w + j) is
  its own MMA over the 16 words of a row (head_dim 128).
- The MMAs are transposed, ``s^T = sum_j K_j q_j^T`` and ``acc_j^T += V_j^T P^T``. The tokens
  (16 per warp) and the 16 words take the 16-row M side, and the GQA group's query heads take
  the 8-wide N side (16 for groups of 9 to 16). A group of 4 thus costs half the MMAs and half
  the accumulator registers of the untransposed form, whose M side held the heads.
- q_j^T (q's channels 8 tau(k) + j) is computed once per program. acc_j lands in channels
  8 sigma(m) + j of the output.
- The words load in memory order, K as 16-byte and V as 8-byte vectors, in the operands' own
  thread mapping. A reshape + permute (K_OPERAND_DIMS, V_OPERAND_DIMS) relabels them as
  operand indices, which costs no instruction.
- A register pairs two words of one token (K, order tau) or one word of two tokens (V, order
  sigma). ``prmt`` + ``and`` build each pair as fp16 subnormals (code * 2**-24, or code * 2**-20
  for high nibbles), whose factors go into q and the output.
- Each of the program's warps walks its own tokens with its own online softmax (a batch
  dimension of the MMA layout), so the loop never synchronises warps. The sums of p stay per
  thread until the end, where the warps merge.
- P^T, the B operand of the value MMA, comes from the score accumulator by a register
  transpose within each warp (two shuffles), never through shared memory.
- q is rotated once per program and shared: each warp rotates two of the 8 slots and hands
  them to the others through shared memory (before, every warp rotated all 8 for itself: at
  8 x 4k that made the block-128 K rotation cost 1.28x the unrotated kernel, now 1.07x).
- Registers (ptxas, triton 3.6, sm_90a, K rotated): 128 for GQA <= 8 with no spills (150
  before the shared q rotation), built with a cap of 128 (4 programs per SM;
  ``DecodeTuning.mma_maxnreg``); 211 for GQA 9-16 (219 before).

Per-group scales (groups of 16, 32 or 64 channels: 2, 4 or 8 whole words of a row, so the 8
slots of a word share one) differ within the MMA's reduction, so such a side's codes are
dequantized in registers instead (``_dequant``: 3 instructions per register pair, not 1) and its
scales are loaded per word beside the codes; 162 registers at a cap of 168, 3 programs per SM.

INT8 sides (fallback heads, one scale per token): a row is 32 words, loaded as two halves of 16
in the same layouts; each register pair of a half unpacks (prmt + and) into 4 byte slots, fp16
subnormals code * 2**-24, so the kernel keeps its 8 slots and 8 MMAs per operand, with slot
4 h + j holding byte j of half h (``_k_chan`` / ``_v_chan``; q and the output follow). Such
builds hold 150-166 registers at a cap of 168: 3 programs per SM, as the grouped build.

Scope: each side INT4 (one scale per token, or per group of 16-64) or INT8 (per token),
head_dim 128, GQA groups of up to 16 query heads, NVIDIA GPUs (sm_80+; mma.sync). Everything
else runs the Triton kernel. The twin is
``sawquant.quant.decode.paged_decode_attention_ref``; ``decode.py`` dispatches and merges.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

__all__ = ["launch_mma_split"]

NUM_WARPS = 4  # each warp walks its own tokens: a program's tile is 4 x tokens_per_warp
# The permutes that relabel loaded words as operand indices (tests/kernels check them against
# plans.mma_word_of_k / mma_word_of_col): dims 2..5 of [W, NT, 2, 2, 2, 2] are word bits 3..0.
K_OPERAND_DIMS = gl.constexpr((0, 1, 4, 2, 3, 5))  # [W, NT, k bits 3..0]
V_OPERAND_DIMS = gl.constexpr((0, 5, 2, 3, 4, 1))  # [W, m bits 3..0, NT]


def _pair_bytes(a: str, b: str) -> str:
    """PTX shared by the unpacks: x_i = (byte i of word a, -, byte i of word b, -). prmt puts
    byte i of a in byte 0 and byte i of b in byte 2 (the selector's nibbles 1 and 3 are masked
    off by the caller)."""
    return "\n".join(f"prmt.b32 x{i}, {a}, {b}, 0x{4 + i}{4 + i}{i}{i};" for i in range(4))


# Two int32 words (a register pair of the fragment) -> 8 fp16x2 registers, one per nibble
# slot j: (slot j of word a, slot j of word b) as subnormals. prmt puts byte i of a in byte 0
# and byte i of b in byte 2; the masks keep the low (slot 2i) or high (2i + 1) nibble of each.
_PAIR_UNPACK_ASM = gl.constexpr(
    """{
.reg .b32 x0, x1, x2, x3;
"""
    + _pair_bytes("$8", "$9")
    + """
and.b32 $0, x0, 0x000f000f;
and.b32 $1, x0, 0x00f000f0;
and.b32 $2, x1, 0x000f000f;
and.b32 $3, x1, 0x00f000f0;
and.b32 $4, x2, 0x000f000f;
and.b32 $5, x2, 0x00f000f0;
and.b32 $6, x3, 0x000f000f;
and.b32 $7, x3, 0x00f000f0;
}"""
)


# INT8 sides (fallback heads, one scale per token): a register pair's two words -> 4 fp16x2
# registers, one per byte slot j: (byte j of word a, byte j of word b) as subnormals code * 2**-24
# (codes up to 255 stay exact: fp16 subnormals reach 1023 * 2**-24). Same prmt as for INT4.
_PAIR_UNPACK8_ASM = gl.constexpr(
    """{
.reg .b32 x0, x1, x2, x3;
"""
    + _pair_bytes("$4", "$5")
    + """
and.b32 $0, x0, 0x00ff00ff;
and.b32 $1, x1, 0x00ff00ff;
and.b32 $2, x2, 0x00ff00ff;
and.b32 $3, x3, 0x00ff00ff;
}"""
)


@gluon.jit
def _tanh(x):
    return 1.0 - 2.0 / (gl.exp2(2.8853900817779268 * x) + 1.0)  # 2 / ln 2


@gluon.jit
def _unpack(w):
    """int32 words in a fragment layout (register pairs along its first register basis) ->
    the 8 slot tensors, fp16 subnormals, same layout."""
    return gl.inline_asm_elementwise(
        _PAIR_UNPACK_ASM,
        "=r,=r,=r,=r,=r,=r,=r,=r,r,r",
        [w],
        dtype=(gl.float16,) * 8,
        is_pure=True,
        pack=2,
    )


@gluon.jit
def _unpack8(w):
    """int32 words of an INT8 side in a fragment layout -> the 4 byte-slot tensors, fp16
    subnormals, same layout."""
    return gl.inline_asm_elementwise(
        _PAIR_UNPACK8_ASM,
        "=r,=r,=r,=r,r,r",
        [w],
        dtype=(gl.float16,) * 4,
        is_pure=True,
        pack=2,
    )


# Per-group scales (group sizes 16-64): the codes cannot stay subnormals (their scale differs
# within the MMA's reduction, and code * 2**-24 * scale underflows), so each pair is
# dequantized to fp16 in registers: lop3 puts a nibble under an fp16 exponent whose mantissa
# unit is 1 (low nibble: 1024 + code) or 1/16 (high nibble, bits 4-7: 64 + code), the sub
# leaves the code exactly, and one fma gives code * scale + zero rounded once (an fma with
# -1024 * scale folded into the zero would round that bias: half a quantization step).
# $8, $9: the two words; $10, $11: (scale, zero) of the pair's two elements as fp16x2.
_PAIR_DEQUANT_ASM = gl.constexpr(
    """{
.reg .b32 x0, x1, x2, x3, t, mlo, mhi;
mov.b32 mlo, 0x64006400;
mov.b32 mhi, 0x54005400;
"""
    + _pair_bytes("$8", "$9")
    + """
lop3.b32 t, x0, 0x000f000f, 0x64006400, 0xea;
sub.f16x2 t, t, mlo;
fma.rn.f16x2 $0, t, $10, $11;
lop3.b32 t, x0, 0x00f000f0, 0x54005400, 0xea;
sub.f16x2 t, t, mhi;
fma.rn.f16x2 $1, t, $10, $11;
lop3.b32 t, x1, 0x000f000f, 0x64006400, 0xea;
sub.f16x2 t, t, mlo;
fma.rn.f16x2 $2, t, $10, $11;
lop3.b32 t, x1, 0x00f000f0, 0x54005400, 0xea;
sub.f16x2 t, t, mhi;
fma.rn.f16x2 $3, t, $10, $11;
lop3.b32 t, x2, 0x000f000f, 0x64006400, 0xea;
sub.f16x2 t, t, mlo;
fma.rn.f16x2 $4, t, $10, $11;
lop3.b32 t, x2, 0x00f000f0, 0x54005400, 0xea;
sub.f16x2 t, t, mhi;
fma.rn.f16x2 $5, t, $10, $11;
lop3.b32 t, x3, 0x000f000f, 0x64006400, 0xea;
sub.f16x2 t, t, mlo;
fma.rn.f16x2 $6, t, $10, $11;
lop3.b32 t, x3, 0x00f000f0, 0x54005400, 0xea;
sub.f16x2 t, t, mhi;
fma.rn.f16x2 $7, t, $10, $11;
}"""
)


@gluon.jit
def _dequant(w, scale, zero):
    """int32 words and fp16 (scale, zero) of each word's group, all in one fragment layout ->
    the 8 slot tensors dequantized to fp16 (code * scale + zero), same layout."""
    return gl.inline_asm_elementwise(
        _PAIR_DEQUANT_ASM,
        "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r",
        [w, scale, zero],
        dtype=(gl.float16,) * 8,
        is_pure=True,
        pack=2,
    )


@gluon.jit
def _tau(k):
    """Word of a row held at K-operand index k: a thread's 4 indices (2t, 2t+1, 2t+8, 2t+9)
    become the adjacent words 4t .. 4t+3."""
    return (k & 1) + 2 * ((k >> 3) & 1) + 4 * ((k >> 1) & 3)


@gluon.jit
def _sigma(n):
    """Word of a row held at V-operand column n: a thread's (g, g+8) become words 2g, 2g+1."""
    return 2 * (n & 7) + (n >> 3)


@gluon.jit
def _k_chan(slot, k, BITS: gl.constexpr):
    """Channel held by code slot ``slot`` (0-7) at K-operand index k (plans.mma_k_channel):
    INT4 nibble j of word tau(k); INT8 byte j of word 16 h + tau(k) for slot 4 h + j (a row's
    32 words are two halves of 16)."""
    if BITS == 4:
        return 8 * _tau(k) + slot
    else:
        return 64 * (slot >> 2) + 4 * _tau(k) + (slot & 3)


@gluon.jit
def _v_chan(slot, m, BITS: gl.constexpr):
    """Channel held by code slot ``slot`` at V-operand row m (plans.mma_v_channel)."""
    if BITS == 4:
        return 8 * _sigma(m) + slot
    else:
        return 64 * (slot >> 2) + 4 * _sigma(m) + (slot & 3)


@gluon.jit
def _k_operand(kw, LK: gl.constexpr):
    """K words [W, NT, word] -> [W, NT, k] with element k = word tau(k): tau's bit
    permutation (k bits 0, 1, 2, 3 -> word bits 0, 2, 3, 1) as a reshape and a permute."""
    W: gl.constexpr = kw.shape[0]
    NT: gl.constexpr = kw.shape[1]
    x = gl.permute(gl.reshape(kw, W, NT, 2, 2, 2, 2), K_OPERAND_DIMS.value)
    return gl.convert_layout(gl.reshape(x, W, NT, 16), LK, assert_trivial=True)


@gluon.jit
def _v_operand(vw, LV: gl.constexpr):
    """V words [W, NT, word] -> [W, m, NT] with row m = word sigma(m) (m bits 0, 1, 2, 3 ->
    word bits 1, 2, 3, 0), transposed: the A operand of acc^T += V^T P^T."""
    W: gl.constexpr = vw.shape[0]
    NT: gl.constexpr = vw.shape[1]
    x = gl.permute(gl.reshape(vw, W, NT, 2, 2, 2, 2), V_OPERAND_DIMS.value)
    return gl.convert_layout(gl.reshape(x, W, 16, NT), LV, assert_trivial=True)


@gluon.jit
def _dim0(n: gl.constexpr, L: gl.constexpr):
    return gl.arange(0, n, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))[:, None, None]


@gluon.jit
def _dim1(n: gl.constexpr, L: gl.constexpr):
    return gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))[None, :, None]


@gluon.jit
def _dim2(n: gl.constexpr, L: gl.constexpr):
    return gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))[None, None, :]


@gluon.jit
def _q_slot(
    Q_ROW,
    qhi,
    qlo,
    ROT,
    rot_scale,
    k_idx_r,
    c_idx_r,
    k_c,
    q_ok_c,
    SMOOTH,
    j,
    K_ROT: gl.constexpr,
    K_SMOOTH: gl.constexpr,
    KVH_OFF,
    MMA: gl.constexpr,
    DA: gl.constexpr,
    Q_SPLIT: gl.constexpr,
    ODD: gl.constexpr,
    K_BITS: gl.constexpr,
):
    """q_j^T [W, 16, NH] (C layout, fp16): q's channels _k_chan(j, k) down the rows, rotated
    (and smoothed) q in fp32 then fp16; ODD: / 16 (an odd nibble slot's subnormal codes come
    16x larger; not for per-group K, dequantized in full, nor INT8 K). Also its column sums in
    code units (for the per-token K zero-point term)."""
    zero = gl.zeros([qhi.shape[0], 16, qhi.shape[2]], gl.float32, MMA)
    if K_ROT:  # j: a slot, or [W, 1, 1] (layout of k_idx_r) a slot per warp
        # ROT's columns 16 j .. 16 j + 15 are the rotation's columns 8 tau(k) + j (permuted by
        # the launcher), read with 16-byte loads and moved into the operand layout through
        # shared memory: once per program, not in the loop.
        r = gl.load(ROT + c_idx_r * 128 + 16 * j + k_idx_r)  # [W, 16, 128], each warp a copy
        r = gl.convert_layout(r, DA)
        qj = mma_v2(r, qhi, zero)
        if Q_SPLIT:
            qj = qj + mma_v2(r, qlo, zero)
        qj = qj * rot_scale
    else:
        chan_c = _k_chan(j, k_c, K_BITS)  # [1, 16, 1] channel of each row (C layout)
        qj = gl.load(Q_ROW + chan_c, mask=q_ok_c, other=0.0).to(gl.float32) + zero
        if K_SMOOTH:
            qj = qj * gl.load(SMOOTH + KVH_OFF + chan_c)
    if ODD:
        qj = qj * 0.0625
    qh = qj.to(gl.float16)
    qsum = gl.sum(qh.to(gl.float32) * (16.0 if ODD else 1.0), 1)  # [W, NH]
    return qh, qsum


@gluon.jit
def _q_broadcast(q_rot, row, W: gl.constexpr, NH: gl.constexpr, DB: gl.constexpr):
    """Slot ``row`` of q_rot ([16, NH]) as the B operand [W, 16, NH], every warp a copy."""
    BL: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 4, 8], [W, 1, 1], [2, 1, 0])
    x = q_rot.index(row).load(gl.SliceLayout(0, BL))
    x = gl.expand_dims(x, 0) + gl.zeros([W, 16, NH], gl.float16, BL)
    return gl.convert_layout(x, DB)


# fmt: off
@gluon.jit
def _mma_split_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, BT, LENS, HEADS, KIDX, VIDX, ROT, SMOOTH, ML, ACC,
    qk_scale, k_rot_scale, softcap, window, num_splits, num_q_heads, max_len,
    stride_qb, stride_qh,
    stride_kcp, stride_kch, stride_kct,
    stride_ksp, stride_ksh, stride_kst,
    stride_vcp, stride_vch, stride_vct,
    stride_vsp, stride_vsh, stride_vst,
    stride_btb,
    GROUP: gl.constexpr, NH: gl.constexpr, PAGE: gl.constexpr, NT: gl.constexpr,
    K_ROT: gl.constexpr, K_SMOOTH: gl.constexpr, HAS_WINDOW: gl.constexpr,
    HAS_SOFTCAP: gl.constexpr, Q_SPLIT: gl.constexpr, DEPTH: gl.constexpr,
    K_WPG: gl.constexpr, V_WPG: gl.constexpr, K_BITS: gl.constexpr, V_BITS: gl.constexpr,
):
    """One (sequence, KV head, context split): writes the same partial state as the Triton
    split kernel (ML = log2-unit max and sum, ACC = unnormalised sum of p v, V's rotated basis,
    natural channel order), so the same merge follows. K_WPG / V_WPG: words (8 channels each)
    per scale group, 16 for one scale per token (codes stay subnormals, scales applied to the
    MMA results), 2-8 for groups of 16-64 (codes dequantized in registers, _dequant).
    K_BITS / V_BITS: 4, or 8 for an INT8 side (one scale per token: a row's 32 words load as
    two halves of 16, each unpacked into 4 byte slots, so the 8 slots and their MMAs stay)."""
    W: gl.constexpr = gl.num_warps()
    K_GROUPED: gl.constexpr = K_WPG < 16
    V_GROUPED: gl.constexpr = V_WPG < 16
    K_ODD: gl.constexpr = K_BITS == 4 and not K_GROUPED  # odd nibble slots come 16x larger
    MMA: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
    DA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    DB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    LK: gl.constexpr = gl.to_linear_layout(DA, [W, NT, 16])  # K operand [warp, token, k]
    LV: gl.constexpr = gl.to_linear_layout(DA, [W, 16, NT])  # V operand [warp, m, token]
    # The layouts the words are loaded in, indexed by the word itself: the operands' own
    # thread mapping, registers ordered so a thread's adjacent words are adjacent registers
    # (16-byte K and 8-byte V loads); _k_operand / _v_operand relabel them for free.
    gl.static_assert(W == 4)
    LKL: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 8, 4], [W, 1, 1], [2, 1, 0])
    LVL: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 1, 0], [0, 8, 0]],
        lane_bases=[[0, 2, 0], [0, 4, 0], [0, 0, 2], [0, 0, 4], [0, 0, 8]],
        warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[W, NT, 16])
    BLOCK_N: gl.constexpr = W * NT

    b = gl.program_id(0)
    i = gl.program_id(1)
    split = gl.program_id(2)
    kvh = gl.load(HEADS + i)
    kp = gl.load(KIDX + i).to(gl.int64)
    vp = gl.load(VIDX + i).to(gl.int64)
    length = gl.minimum(gl.load(LENS + b), max_len)
    start = 0
    if HAS_WINDOW:
        start = gl.maximum(length - window, 0)
    # Every warp's NT tokens lie in one page (the launcher asks PAGE % NT == 0): tiles start at
    # multiples of NT, a window's tokens before `start` are masked in the softmax. So a thread
    # loads one page id per operand and tile, not one per token it holds.
    base = start - start % NT
    chunk = gl.cdiv(gl.cdiv(length - base, gl.num_programs(2)), BLOCK_N) * BLOCK_N
    lo = base + split * chunk
    hi = gl.minimum(lo + chunk, length)
    bt_row = BT + b.to(gl.int64) * stride_btb

    # ---- q_j^T for the 8 slots [W, 16 word indices, NH heads], once per program (every warp
    # holds its own copy)
    k_c = _dim1(16, MMA)  # [1, 16, 1]
    g_c = _dim2(NH, MMA)  # [1, 1, NH] query head of the group
    q_ok_c = (g_c < GROUP) & (k_c < 16)
    q_row_c = Q + b.to(gl.int64) * stride_qb + (kvh * GROUP + g_c).to(gl.int64) * stride_qh
    kvh_off = kvh * 128
    qhi = gl.zeros([W, 128, NH], gl.float16, DB)
    qlo = qhi
    LR: gl.constexpr = gl.BlockedLayout([1, 8, 1], [1, 2, 16], [W, 1, 1], [1, 2, 0])
    k_idx_r = _dim1(16, LR) + 0 * _dim0(W, LR)
    c_idx_r = _dim2(128, LR)
    if K_ROT:
        LQ: gl.constexpr = gl.to_linear_layout(DB, [W, 128, NH])
        c_b = _dim1(128, LQ)
        g_b = _dim2(NH, LQ)
        q_row_b = Q + b.to(gl.int64) * stride_qb + (kvh * GROUP + g_b).to(gl.int64) * stride_qh
        qf = gl.load(q_row_b + c_b, mask=(g_b < GROUP) & (c_b < 128), other=0.0)
        qf = qf.to(gl.float32) + gl.zeros([W, 128, NH], gl.float32, LQ)
        if K_SMOOTH:
            qf = qf * gl.load(SMOOTH + kvh_off + c_b)
        qh16 = qf.to(gl.float16)
        qhi = gl.convert_layout(qh16, DB, assert_trivial=True)
        if Q_SPLIT:  # q = hi + lo in fp16 (smoothed or fp32 q): the rotation keeps ~fp32
            qlo = gl.convert_layout((qf - qh16.to(gl.float32)).to(gl.float16), DB,
                                    assert_trivial=True)
    SL: gl.constexpr = gl.SliceLayout(1, MMA)  # [W, NH]
    if K_ROT:
        # Each warp rotates two of the 8 slots (2 w and 2 w + 1) instead of all 8 for its own
        # copy, through shared memory (row t W + w: slot 2 w + t) to every warp, which reads
        # each slot whole and broadcasts it over the warp axis of the operand; the column sums
        # of q are summed across the warps.
        QS: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                   order=[2, 1, 0])
        QR: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                   order=[1, 0])
        q_by_t = gl.allocate_shared_memory(gl.float16, [2, W, 16, NH], QS)  # stored per t
        q_rot = q_by_t._reinterpret(gl.float16, [2 * W, 16, NH], QR)  # read per slot
        slot_r = 2 * _dim0(W, LR)  # [W, 1, 1]: the even slot each warp rotates
        qa, sa = _q_slot(q_row_c, qhi, qlo, ROT, k_rot_scale, k_idx_r, c_idx_r, k_c, q_ok_c,
                         SMOOTH, slot_r, K_ROT, K_SMOOTH, kvh_off, MMA, DA, Q_SPLIT, False,
                         K_BITS)
        qb, sb = _q_slot(q_row_c, qhi, qlo, ROT, k_rot_scale, k_idx_r, c_idx_r, k_c, q_ok_c,
                         SMOOTH, slot_r + 1, K_ROT, K_SMOOTH, kvh_off, MMA, DA, Q_SPLIT,
                         K_ODD, K_BITS)
        q_by_t.index(0).store(qa)
        q_by_t.index(1).store(qb)
        q_sum = gl.expand_dims(gl.sum(sa + sb, 0), 0) + gl.zeros([W, NH], gl.float32, SL)
        gl.thread_barrier()
        q0 = _q_broadcast(q_rot, 0, W, NH, DB)  # slot 0: t 0, warp 0
        q1 = _q_broadcast(q_rot, W, W, NH, DB)  # slot 1: t 1, warp 0
        q2 = _q_broadcast(q_rot, 1, W, NH, DB)
        q3 = _q_broadcast(q_rot, W + 1, W, NH, DB)
        q4 = _q_broadcast(q_rot, 2, W, NH, DB)
        q5 = _q_broadcast(q_rot, W + 2, W, NH, DB)
        q6 = _q_broadcast(q_rot, 3, W, NH, DB)
        q7 = _q_broadcast(q_rot, W + 3, W, NH, DB)
    else:
        # A runtime loop over pairs of slots through shared memory (fully unrolled, the
        # compiler hoisted all 8 slots' loads and the prologue took every register).
        QL: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                   order=[2, 1, 0])
        q_smem = gl.allocate_shared_memory(gl.float16, [8, W, 16, NH], QL)
        q_sum = gl.zeros([W, NH], gl.float32, SL)  # sum(q) in code units
        for jj in range(4):
            qa, sa = _q_slot(q_row_c, qhi, qlo, ROT, k_rot_scale, k_idx_r, c_idx_r, k_c,
                             q_ok_c, SMOOTH, 2 * jj, K_ROT, K_SMOOTH, kvh_off, MMA, DA,
                             Q_SPLIT, False, K_BITS)
            qb, sb = _q_slot(q_row_c, qhi, qlo, ROT, k_rot_scale, k_idx_r, c_idx_r, k_c,
                             q_ok_c, SMOOTH, 2 * jj + 1, K_ROT, K_SMOOTH, kvh_off, MMA, DA,
                             Q_SPLIT, K_ODD, K_BITS)
            q_smem.index(2 * jj).store(qa)
            q_smem.index(2 * jj + 1).store(qb)
            q_sum += sa + sb
        gl.thread_barrier()
        q0 = q_smem.index(0).load(DB)
        q1 = q_smem.index(1).load(DB)
        q2 = q_smem.index(2).load(DB)
        q3 = q_smem.index(3).load(DB)
        q4 = q_smem.index(4).load(DB)
        q5 = q_smem.index(5).load(DB)
        q6 = q_smem.index(6).load(DB)
        q7 = q_smem.index(7).load(DB)

    # ---- token and word indices of each operand's layout (warp w walks tokens w*NT ..)
    w_k = _dim0(W, LKL)
    n_k = _dim1(NT, LKL)
    word_k = _dim2(16, LKL)
    w_v = _dim0(W, LVL)
    n_v = _dim1(NT, LVL)
    word_v = _dim2(16, LVL)
    S2: gl.constexpr = gl.SliceLayout(2, MMA)  # [W, NT]: per-token scales of the C layout
    w_s = gl.arange(0, W, layout=gl.SliceLayout(1, S2))[:, None]
    n_s = gl.arange(0, NT, layout=gl.SliceLayout(0, S2))[None, :]
    tw_k = w_k * NT  # first token of each warp's part of a tile, in each operand's layout
    tw_v = w_v * NT
    tw_s = w_s * NT
    off_s = tw_s + n_s
    kc32 = KC.to(gl.pointer_type(gl.int32))
    vc32 = VC.to(gl.pointer_type(gl.int32))
    # Offsets of each thread's elements within a tile (int32) and of the head (code strides
    # in 32-bit words)
    ck = n_k * stride_kct + word_k
    cv = n_v * stride_vct + word_v
    cks = n_s * stride_kst
    cvs = n_s * stride_vst
    kc_head = kp * stride_kch
    vc_head = vp * stride_vch
    ks_head = kp * stride_ksh
    vs_head = vp * stride_vsh

    # ---- the first tiles' codes and scales: the loop keeps DEPTH (1 or 2) tiles in flight
    # (n: the next tile, m: the one after).
    nkw, nvw, nks, nkz, nvs, nvz = _load_tile(
            lo, hi, bt_row, kc32, vc32, KS, KZ, VS, VZ, tw_k, tw_v, tw_s,
            n_s, ck, cv, cks, cvs, kc_head, vc_head, ks_head, vs_head,
            PAGE, stride_kcp, stride_kct, stride_vcp, stride_vct, stride_ksp, stride_kst,
            stride_vsp, stride_vst, n_k, word_k, n_v, word_v, K_WPG, V_WPG)
    if K_BITS == 8:  # an INT8 row's words 16-31, loaded like words 0-15 beside them
        nkw2 = _load_words_hi(lo, hi, bt_row, kc32, tw_k, ck, kc_head, PAGE, stride_kcp,
                              stride_kct)
    if V_BITS == 8:
        nvw2 = _load_words_hi(lo, hi, bt_row, vc32, tw_v, cv, vc_head, PAGE, stride_vcp,
                              stride_vct)
    if DEPTH == 2:
        mkw, mvw, mks, mkz, mvs, mvz = _load_tile(
            lo + BLOCK_N, hi, bt_row, kc32, vc32, KS, KZ, VS, VZ, tw_k, tw_v, tw_s,
            n_s, ck, cv, cks, cvs, kc_head, vc_head, ks_head, vs_head,
            PAGE, stride_kcp, stride_kct, stride_vcp, stride_vct, stride_ksp, stride_kst,
            stride_vsp, stride_vst, n_k, word_k, n_v, word_v, K_WPG, V_WPG)
        if K_BITS == 8:
            mkw2 = _load_words_hi(lo + BLOCK_N, hi, bt_row, kc32, tw_k, ck, kc_head, PAGE,
                                  stride_kcp, stride_kct)
        if V_BITS == 8:
            mvw2 = _load_words_hi(lo + BLOCK_N, hi, bt_row, vc32, tw_v, cv, vc_head, PAGE,
                                  stride_vcp, stride_vct)

    HEADS_L: gl.constexpr = gl.SliceLayout(1, MMA)  # [W, NH] per-head softmax state
    m_i = gl.full([W, NH], float("-inf"), gl.float32, HEADS_L)
    # The sums of p and p * v_zero stay per thread ([W, NT, NH]) and are reduced once, after
    # the loop: no cross-lane sums in it.
    l_t = gl.zeros([W, NT, NH], gl.float32, MMA)
    z_t = l_t
    a0 = gl.zeros([W, 16, NH], gl.float32, MMA)
    a1 = a0
    a2 = a0
    a3 = a0
    a4 = a0
    a5 = a0
    a6 = a0
    a7 = a0
    for n0 in range(lo, hi, BLOCK_N):
        kw, ks, kz = nkw, nks, nkz
        vw, vs, vz = nvw, nvs, nvz
        if K_BITS == 8:
            kw2 = nkw2
        if V_BITS == 8:
            vw2 = nvw2
        ok_c = (n0 + off_s) < hi  # [W, NT] tokens of this tile
        if HAS_WINDOW:
            ok_c = ok_c & ((n0 + off_s) >= start)

        # ---- prefetch DEPTH tiles ahead
        if DEPTH == 2:
            nkw, nvw, nks, nkz, nvs, nvz = mkw, mvw, mks, mkz, mvs, mvz
            if K_BITS == 8:
                nkw2 = mkw2
            if V_BITS == 8:
                nvw2 = mvw2
        n_next = n0 + DEPTH * BLOCK_N
        mkw, mvw, mks, mkz, mvs, mvz = _load_tile(
            n_next, hi, bt_row, kc32, vc32, KS, KZ, VS, VZ, tw_k, tw_v, tw_s,
            n_s, ck, cv, cks, cvs, kc_head, vc_head, ks_head, vs_head,
            PAGE, stride_kcp, stride_kct, stride_vcp, stride_vct, stride_ksp, stride_kst,
            stride_vsp, stride_vst, n_k, word_k, n_v, word_v, K_WPG, V_WPG)
        if K_BITS == 8:
            mkw2 = _load_words_hi(n_next, hi, bt_row, kc32, tw_k, ck, kc_head, PAGE,
                                  stride_kcp, stride_kct)
        if V_BITS == 8:
            mvw2 = _load_words_hi(n_next, hi, bt_row, vc32, tw_v, cv, vc_head, PAGE,
                                  stride_vcp, stride_vct)
        if DEPTH == 1:
            nkw, nvw, nks, nkz, nvs, nvz = mkw, mvw, mks, mkz, mvs, mvz
            if K_BITS == 8:
                nkw2 = mkw2
            if V_BITS == 8:
                nvw2 = mvw2

        # ---- scores s^T = sum_j K_j q_j^T  [W, NT tokens, NH heads]
        if K_BITS == 8:  # slot 4 h + j: byte j of half h
            k0, k1, k2, k3 = _unpack8(_k_operand(kw, LK))
            k4, k5, k6, k7 = _unpack8(_k_operand(kw2, LK))
        elif K_GROUPED:
            k0, k1, k2, k3, k4, k5, k6, k7 = _dequant(
                _k_operand(kw, LK), _k_operand(ks, LK), _k_operand(kz, LK))
        else:
            k0, k1, k2, k3, k4, k5, k6, k7 = _unpack(_k_operand(kw, LK))
        s = gl.zeros([W, NT, NH], gl.float32, MMA)
        s = mma_v2(gl.convert_layout(k0, DA, assert_trivial=True), q0, s)
        s = mma_v2(gl.convert_layout(k1, DA, assert_trivial=True), q1, s)
        s = mma_v2(gl.convert_layout(k2, DA, assert_trivial=True), q2, s)
        s = mma_v2(gl.convert_layout(k3, DA, assert_trivial=True), q3, s)
        s = mma_v2(gl.convert_layout(k4, DA, assert_trivial=True), q4, s)
        s = mma_v2(gl.convert_layout(k5, DA, assert_trivial=True), q5, s)
        s = mma_v2(gl.convert_layout(k6, DA, assert_trivial=True), q6, s)
        s = mma_v2(gl.convert_layout(k7, DA, assert_trivial=True), q7, s)
        if not K_GROUPED:
            ks32 = ks.to(gl.float32) * 16777216.0  # the subnormals' 2**-24
            s = s * ks32[:, :, None] + kz.to(gl.float32)[:, :, None] * q_sum[:, None, :]

        # ---- online softmax per warp, log2 units, along the tokens (axis 1)
        s = s * qk_scale
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = gl.where(ok_c[:, :, None], s * 1.4426950408889634, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a warp with no token yet
        alpha = gl.exp2(m_i - m_use)
        m_i = m_new
        al = alpha[:, None, :]
        p = gl.exp2(s - m_use[:, None, :])
        l_t = l_t * al + p

        # ---- acc_j^T += V_j^T P^T  [W, 16 words, NH heads]
        if V_GROUPED:
            pv = gl.convert_layout(p.to(gl.float16), DB)
            v0, v1, v2, v3, v4, v5, v6, v7 = _dequant(
                _v_operand(vw, LV), _v_operand(vs, LV), _v_operand(vz, LV))
        else:
            z_t = z_t * al + p * vz.to(gl.float32)[:, :, None]
            pv = gl.convert_layout((p * vs.to(gl.float32)[:, :, None]).to(gl.float16), DB)
            if V_BITS == 8:
                v0, v1, v2, v3 = _unpack8(_v_operand(vw, LV))
                v4, v5, v6, v7 = _unpack8(_v_operand(vw2, LV))
            else:
                v0, v1, v2, v3, v4, v5, v6, v7 = _unpack(_v_operand(vw, LV))
        a0 = mma_v2(gl.convert_layout(v0, DA, assert_trivial=True), pv, a0 * al)
        a1 = mma_v2(gl.convert_layout(v1, DA, assert_trivial=True), pv, a1 * al)
        a2 = mma_v2(gl.convert_layout(v2, DA, assert_trivial=True), pv, a2 * al)
        a3 = mma_v2(gl.convert_layout(v3, DA, assert_trivial=True), pv, a3 * al)
        a4 = mma_v2(gl.convert_layout(v4, DA, assert_trivial=True), pv, a4 * al)
        a5 = mma_v2(gl.convert_layout(v5, DA, assert_trivial=True), pv, a5 * al)
        a6 = mma_v2(gl.convert_layout(v6, DA, assert_trivial=True), pv, a6 * al)
        a7 = mma_v2(gl.convert_layout(v7, DA, assert_trivial=True), pv, a7 * al)

    # ---- merge the warps (once per program) and store the split's partial state
    l_i = gl.sum(l_t, 1)  # [W, NH]
    z_i = gl.sum(z_t, 1)
    m_all = gl.max(m_i, 0)  # [NH]
    m_use = gl.where(m_all == float("-inf"), 0.0, m_all)
    wgt = gl.exp2(m_i - m_use[None, :])  # [W, NH]: 0 for a warp that saw no token
    l_all = gl.sum(l_i * wgt, 0)
    cols = gl.arange(0, NH, layout=gl.SliceLayout(0, HEADS_L))
    heads = kvh * GROUP + cols
    part = (b.to(gl.int64) * num_q_heads + heads) * num_splits + split
    col_ok = cols < GROUP
    gl.store(ML + 2 * part, m_all, mask=col_ok)
    gl.store(ML + 2 * part + 1, l_all, mask=col_ok)

    wz = (z_i * wgt)[:, None, :]  # V's zero-point term, added to every channel
    w3 = wgt[:, None, :]
    m_o = _dim1(16, MMA)
    g_o = _dim2(NH, MMA)
    o_ptr = ACC + ((b.to(gl.int64) * num_q_heads + kvh * GROUP + g_o) * num_splits + split) * 128
    w_o = _dim0(W, MMA)
    o_ptr = o_ptr + _v_chan(0, m_o, V_BITS) + 0 * w_o  # [W, 16, NH]: only warp 0 stores
    o_ok = (g_o < GROUP) & (m_o < 16) & (w_o == 0)
    if V_GROUPED:  # dequantized values: no factors, the zero points are in them
        _store_slot(o_ptr + 0, a0 * w3, o_ok)
        _store_slot(o_ptr + 1, a1 * w3, o_ok)
        _store_slot(o_ptr + 2, a2 * w3, o_ok)
        _store_slot(o_ptr + 3, a3 * w3, o_ok)
        _store_slot(o_ptr + 4, a4 * w3, o_ok)
        _store_slot(o_ptr + 5, a5 * w3, o_ok)
        _store_slot(o_ptr + 6, a6 * w3, o_ok)
        _store_slot(o_ptr + 7, a7 * w3, o_ok)
    else:  # subnormal codes: each slot's factor undone, V's zero-point term added
        _store_codes(o_ptr, a0, 0, w3, wz, o_ok, V_BITS)
        _store_codes(o_ptr, a1, 1, w3, wz, o_ok, V_BITS)
        _store_codes(o_ptr, a2, 2, w3, wz, o_ok, V_BITS)
        _store_codes(o_ptr, a3, 3, w3, wz, o_ok, V_BITS)
        _store_codes(o_ptr, a4, 4, w3, wz, o_ok, V_BITS)
        _store_codes(o_ptr, a5, 5, w3, wz, o_ok, V_BITS)
        _store_codes(o_ptr, a6, 6, w3, wz, o_ok, V_BITS)
        _store_codes(o_ptr, a7, 7, w3, wz, o_ok, V_BITS)
# fmt: on


@gluon.jit
def _load_tile(
    n,
    hi,
    bt_row,
    kc32,
    vc32,
    KS,
    KZ,
    VS,
    VZ,
    tw_k,
    tw_v,
    tw_s,
    n_s,
    ck,
    cv,
    cks,
    cvs,
    kc_head,
    vc_head,
    ks_head,
    vs_head,
    PAGE: gl.constexpr,
    stride_kcp,
    stride_kct,
    stride_vcp,
    stride_vct,
    stride_ksp,
    stride_kst,
    stride_vsp,
    stride_vst,
    n_k,
    word_k,
    n_v,
    word_v,
    K_WPG: gl.constexpr,
    V_WPG: gl.constexpr,
):
    """Raw K and V words (each thread its own fragment's) and the four per-token parameter
    vectors of the tile starting at token n; past hi the scales read 0, the codes page 0's.
    A warp's part of the tile lies in one page: one page id per thread and operand. A side
    with per-group scales (WPG < 16) gets them per word instead, in its words' layout: the
    scale and zero of each word's group ([W, NT, 16], relabelled with the words)."""
    t_k = n + tw_k
    t_v = n + tw_v
    t_s = n + tw_s
    pg_k = gl.load(bt_row + t_k // PAGE, mask=t_k < hi, other=0)
    pg_v = gl.load(bt_row + t_v // PAGE, mask=t_v < hi, other=0)
    pg_s = gl.load(bt_row + t_s // PAGE, mask=t_s < hi, other=0)
    # Codes unmasked: a warp's tokens at or past hi read page 0's (in bounds; the softmax
    # masks their scores, and their p is 0 against finite codes). The scales stay masked: a
    # NaN bit pattern there would survive p = 0.
    base_k = pg_k.to(gl.int64) * stride_kcp + kc_head + (t_k % PAGE) * stride_kct
    kw = gl.load(kc32 + base_k + ck)
    base_v = pg_v.to(gl.int64) * stride_vcp + vc_head + (t_v % PAGE) * stride_vct
    vw = gl.load(vc32 + base_v + cv)
    ok_s = (t_s + n_s) < hi
    pg_s = pg_s.to(gl.int64)
    in_page = t_s % PAGE
    if K_WPG < 16:  # the last dim of a group pool's scales is its groups (stride 1)
        k_g = (pg_k.to(gl.int64) * stride_ksp + ks_head + (t_k % PAGE + n_k) * stride_kst
               + word_k // K_WPG)  # fmt: skip
        ok_k = (t_k + n_k) < hi
        ks = gl.load(KS + k_g, mask=ok_k, other=0.0)
        kz = gl.load(KZ + k_g, mask=ok_k, other=0.0)
    else:
        k_s = pg_s * stride_ksp + ks_head + in_page * stride_kst + cks
        ks = gl.load(KS + k_s, mask=ok_s, other=0.0)
        kz = gl.load(KZ + k_s, mask=ok_s, other=0.0)
    if V_WPG < 16:
        v_g = (pg_v.to(gl.int64) * stride_vsp + vs_head + (t_v % PAGE + n_v) * stride_vst
               + word_v // V_WPG)  # fmt: skip
        ok_v = (t_v + n_v) < hi
        vs = gl.load(VS + v_g, mask=ok_v, other=0.0)
        vz = gl.load(VZ + v_g, mask=ok_v, other=0.0)
    else:
        v_s = pg_s * stride_vsp + vs_head + in_page * stride_vst + cvs
        vs = gl.load(VS + v_s, mask=ok_s, other=0.0)
        vz = gl.load(VZ + v_s, mask=ok_s, other=0.0)
    return kw, vw, ks, kz, vs, vz


@gluon.jit
def _load_words_hi(n, hi, bt_row, c32, tw, cw, c_head, PAGE: gl.constexpr, stride_cp, stride_ct):
    """Words 16-31 of each row of an INT8 side's tile at token n, in the layout _load_tile
    loads words 0-15 in (the same page ids, read again: L1 hits)."""
    t = n + tw
    pg = gl.load(bt_row + t // PAGE, mask=t < hi, other=0)
    base = pg.to(gl.int64) * stride_cp + c_head + (t % PAGE) * stride_ct
    return gl.load(c32 + base + cw + 16)


@gluon.jit
def _store_codes(o_ptr, a, j: gl.constexpr, w3, wz, ok, V_BITS: gl.constexpr):
    """Slot j of a per-token V side: its codes came as code * 2**-24 (odd INT4 nibble slots
    code * 2**-20); stored at its channels' offset from slot 0's (_v_chan)."""
    if V_BITS == 4:
        off: gl.constexpr = j
        factor: gl.constexpr = 1048576.0 if j % 2 else 16777216.0
    else:
        off: gl.constexpr = 64 * (j // 4) + j % 4
        factor: gl.constexpr = 16777216.0
    _store_slot(o_ptr + off, a * (w3 * factor) + wz, ok)


@gluon.jit
def _store_slot(ptr, x, ok):
    """Sum the warps' [W, 16, 16] contributions and store them from warp 0's slice."""
    tot = gl.sum(x, 0)[None, :, :]
    gl.store(ptr, tot + gl.zeros_like(x), mask=ok)


def launch_mma_split(
    q,
    kpool,
    vpool,
    group,
    heads,
    block_table,
    seq_lens,
    ml,
    acc,
    *,
    splits,
    page_size,
    k_rot,
    k_rot_scale,
    k_smooth,
    softmax_scale,
    sliding_window,
    softcap,
    max_len,
    num_q_heads,
    columns,
    tokens_per_warp=16,
    maxnreg=None,
    depth=1,
) -> None:
    """Launch the split kernel for one INT4 / INT8 head group (decode.py's launcher calls this
    for the groups ``_mma_applies`` accepts; arguments as for the Triton kernel).
    ``columns``: the MMAs' query columns (``plans.mma_columns``: 8, or 16 for GQA 9-16);
    ``maxnreg``: the register cap (``plans.mma_register_cap``). ``page_size`` must be a
    multiple of ``tokens_per_warp``."""
    if page_size % tokens_per_warp:
        raise ValueError(f"page_size {page_size} is not a multiple of {tokens_per_warp}")
    # fmt: off
    _mma_split_kernel[(q.shape[0], heads.heads.numel(), splits)](
        q, kpool.codes, kpool.scale, kpool.zero, vpool.codes, vpool.scale, vpool.zero,
        block_table, seq_lens, heads.heads, heads.k_index, heads.v_index,
        q if k_rot is None else k_rot, q if k_smooth is None else k_smooth, ml, acc,
        softmax_scale, k_rot_scale, softcap or 1.0, sliding_window or 0, ml.shape[2],
        num_q_heads, max_len,
        q.stride(0), q.stride(1),
        *(st // 4 for st in kpool.codes.stride()[:3]), *kpool.scale.stride()[:3],
        *(st // 4 for st in vpool.codes.stride()[:3]), *vpool.scale.stride()[:3],
        block_table.stride(0),
        GROUP=group, NH=columns, PAGE=page_size, NT=tokens_per_warp,
        K_ROT=k_rot is not None, K_SMOOTH=k_smooth is not None,
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None,
        Q_SPLIT=k_smooth is not None or q.dtype.itemsize == 4, DEPTH=depth,
        K_WPG=kpool.spec.groups_divisor // 8, V_WPG=vpool.spec.groups_divisor // 8,
        K_BITS=kpool.spec.bits, V_BITS=vpool.spec.bits,
        num_warps=NUM_WARPS,
        **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
    # fmt: on
