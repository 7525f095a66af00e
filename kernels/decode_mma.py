"""Decode attention for INT4 / INT4 heads on the tensor cores without layout conversions (Gluon).

The Triton kernel (``decode.py``) unpacks INT4 tiles into a blocked layout and lets the
compiler move them into the MMA operand layout through shared memory: on the H100/H200 that
round trip, not HBM, bounds it (ncu: shared-memory pipe 72 % busy, DRAM 29 %; RESULTS.md).
Here the layouts are written out (Gluon), so every thread LOADS the very codes its mma.sync
fragments need and unpacks them in registers: no shared memory in the loop at all.

How the fragments line up with memory (m16n8k16, fp16 operands, two values per register):
- A dot product does not care about the order of its reduction axis, nor a store about the
  order of its columns. So each of the 8 nibble slots j of a 32-bit word (channel 8w + j) is
  its own MMA over the 16 words of a row (head_dim 128): ``s = sum_j q_j K_j^T`` and
  ``acc_j += P V_j``. q_j (q's channels 8w + j, in a word order chosen to match) is computed
  once per program; acc_j lands in channels 8w + j of the output.
- K_j is the B operand [16 words, tokens]: a thread holds 4 words of a token; the word order
  tau puts them side by side in memory. V_j is the B operand [tokens, 16 words]: a thread
  holds 2 words of 4 tokens (order sigma). A register pairs two words of one token (K) or one
  word of two tokens (V); ``prmt`` + ``and`` build each pair as fp16 subnormals
  (code * 2**-24, code * 2**-20 for high nibbles), whose factors go into q and the output.
- Each of the program's warps walks its own tokens with its own online softmax (a batch
  dimension of the MMA layout), so the loop never synchronises warps; they merge at the end.
- The score accumulator is also the A operand of P V (same registers, no conversion).

Scope: both sides INT4 with per-token scales, head_dim 128, GQA groups of up to 16 query
heads, NVIDIA GPUs (sm_80+; mma.sync). Everything else runs the Triton kernel. The twin is
``sawquant.quant.decode.paged_decode_attention_ref``; ``decode.py`` dispatches and merges.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

__all__ = ["launch_mma_split"]

NUM_WARPS = 4  # each warp walks its own tokens: a program's tile is 4 x tokens_per_warp

# Two int32 words (a register pair of the fragment) -> 8 fp16x2 registers, one per nibble
# slot j: (slot j of word a, slot j of word b) as subnormals. prmt puts byte i of a in byte 0
# and byte i of b in byte 2; the masks keep the low (slot 2i) or high (2i + 1) nibble of each.
_PAIR_UNPACK_ASM = gl.constexpr(
    """{
.reg .b32 x0, x1, x2, x3;
prmt.b32 x0, $8, $9, 0x4400;
prmt.b32 x1, $8, $9, 0x5511;
prmt.b32 x2, $8, $9, 0x6622;
prmt.b32 x3, $8, $9, 0x7733;
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
def _tau(k):
    """Word of a row held at K-operand index k: a thread's 4 indices (2t, 2t+1, 2t+8, 2t+9)
    become the adjacent words 4t .. 4t+3."""
    return (k & 1) + 2 * ((k >> 3) & 1) + 4 * ((k >> 1) & 3)


@gluon.jit
def _sigma(n):
    """Word of a row held at V-operand column n: a thread's (g, g+8) become words 2g, 2g+1."""
    return 2 * (n & 7) + (n >> 3)


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
    g_c,
    k_c,
    q_ok_c,
    SMOOTH,
    j,
    GROUP: gl.constexpr,
    K_ROT: gl.constexpr,
    K_SMOOTH: gl.constexpr,
    KVH_OFF,
    MMA: gl.constexpr,
    DA: gl.constexpr,
    DB: gl.constexpr,
    Q_SPLIT: gl.constexpr,
    ODD: gl.constexpr,
):
    """q_j [W, 16, 16] (C layout, fp16): q's channels 8 tau(k) + j, rotated (and smoothed) q
    in fp32 then fp16, odd slots / 16 (their codes come 16x larger). Also its row sums in code
    units (for the K zero-point term)."""
    chan_c = 8 * _tau(k_c) + j  # [1, 1, 16] channel of each column (C layout)
    if K_ROT:
        # ROT's columns 16 j .. 16 j + 15 are the rotation's columns 8 tau(k) + j (permuted by
        # the launcher), read with 16-byte loads and moved into the operand layout through
        # shared memory: once per program, not in the loop.
        r = gl.load(ROT + c_idx_r * 128 + 16 * j + k_idx_r)  # [W, 128, 16], each warp a copy
        r = gl.convert_layout(r, DB)
        zero = gl.zeros([qhi.shape[0], 16, 16], gl.float32, MMA)
        qj = mma_v2(qhi, r, zero)
        if Q_SPLIT:
            qj = qj + mma_v2(qlo, r, zero)
        qj = qj * rot_scale
    else:
        qj = gl.load(Q_ROW + chan_c, mask=q_ok_c, other=0.0).to(gl.float32)
        qj = qj + gl.zeros([qhi.shape[0], 16, 16], gl.float32, MMA)
        if K_SMOOTH:
            qj = qj * gl.load(SMOOTH + KVH_OFF + chan_c)
    if ODD:
        qj = qj * 0.0625
    qh = qj.to(gl.float16)
    qsum = gl.sum(qh.to(gl.float32) * (16.0 if ODD else 1.0), 2)  # [W, 16]
    return qh, qsum


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
    GROUP: gl.constexpr, PAGE: gl.constexpr, NT: gl.constexpr,
    K_ROT: gl.constexpr, K_SMOOTH: gl.constexpr, HAS_WINDOW: gl.constexpr,
    HAS_SOFTCAP: gl.constexpr, Q_SPLIT: gl.constexpr, DEPTH: gl.constexpr,
):
    """One (sequence, KV head, context split): writes the same partial state as the Triton
    split kernel (ML = log2-unit max and sum, ACC = unnormalised sum of p v, V's rotated basis,
    natural channel order), so the same merge follows."""
    W: gl.constexpr = gl.num_warps()
    MMA: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
    DA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    DB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    LK: gl.constexpr = gl.to_linear_layout(DB, [W, 16, NT])  # K words [warp, word, token]
    LV: gl.constexpr = gl.to_linear_layout(DB, [W, NT, 16])  # V words [warp, token, word]
    LR: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 16, 2], [W, 1, 1], [2, 1, 0])
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

    # ---- q_j for the 8 slots, once per program (every warp holds its own copy)
    g_c = _dim1(16, MMA)  # [1, 16, 1] query row of the group
    k_c = _dim2(16, MMA)  # [1, 1, 16]
    q_ok_c = (g_c < GROUP) & (k_c < 16)
    q_row_c = Q + b.to(gl.int64) * stride_qb + (kvh * GROUP + g_c).to(gl.int64) * stride_qh
    kvh_off = kvh * 128
    qhi = gl.zeros([W, 16, 128], gl.float16, DA)
    qlo = qhi
    k_idx_r = _dim2(16, LR) + 0 * _dim0(W, LR)
    c_idx_r = _dim1(128, LR)
    if K_ROT:
        LA: gl.constexpr = gl.to_linear_layout(DA, [W, 16, 128])
        g_a = _dim1(16, LA)
        c_a = _dim2(128, LA)
        q_row_a = Q + b.to(gl.int64) * stride_qb + (kvh * GROUP + g_a).to(gl.int64) * stride_qh
        qf = gl.load(q_row_a + c_a, mask=(g_a < GROUP) & (c_a < 128), other=0.0)
        qf = qf.to(gl.float32) + gl.zeros([W, 16, 128], gl.float32, LA)
        if K_SMOOTH:
            qf = qf * gl.load(SMOOTH + kvh_off + c_a)
        qh16 = qf.to(gl.float16)
        qhi = gl.convert_layout(qh16, DA, assert_trivial=True)
        if Q_SPLIT:  # q = hi + lo in fp16 (smoothed or fp32 q): the rotation keeps ~fp32
            qlo = gl.convert_layout((qf - qh16.to(gl.float32)).to(gl.float16), DA,
                                    assert_trivial=True)
    # A runtime loop over pairs of slots through shared memory: fully unrolled, the compiler
    # hoisted all 8 slots' rotation loads and the prologue took every register (ptxas: 255 and
    # spills, against 186 for the loop); one slot at a time, 8 dependent L2 round trips.
    QL: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                               order=[2, 1, 0])
    q_smem = gl.allocate_shared_memory(gl.float16, [8, W, 16, 16], QL)
    q_sum = gl.zeros([W, 16], gl.float32, gl.SliceLayout(2, MMA))  # sum(q) in code units
    for jj in range(4):
        qa, sa = _q_slot(q_row_c, qhi, qlo, ROT, k_rot_scale, k_idx_r, c_idx_r, g_c, k_c, q_ok_c,
                         SMOOTH, 2 * jj, GROUP, K_ROT, K_SMOOTH, kvh_off, MMA, DA, DB, Q_SPLIT,
                         False)
        qb, sb = _q_slot(q_row_c, qhi, qlo, ROT, k_rot_scale, k_idx_r, c_idx_r, g_c, k_c, q_ok_c,
                         SMOOTH, 2 * jj + 1, GROUP, K_ROT, K_SMOOTH, kvh_off, MMA, DA, DB,
                         Q_SPLIT, True)
        q_smem.index(2 * jj).store(qa)
        q_smem.index(2 * jj + 1).store(qb)
        q_sum += sa + sb
    gl.thread_barrier()
    q0 = q_smem.index(0).load(DA)
    q1 = q_smem.index(1).load(DA)
    q2 = q_smem.index(2).load(DA)
    q3 = q_smem.index(3).load(DA)
    q4 = q_smem.index(4).load(DA)
    q5 = q_smem.index(5).load(DA)
    q6 = q_smem.index(6).load(DA)
    q7 = q_smem.index(7).load(DA)

    # ---- token and word indices of each operand's layout (warp w walks tokens w*NT ..)
    w_k = _dim0(W, LK)
    word_k = _tau(_dim1(16, LK))  # [1, 16, 1]
    n_k = _dim2(NT, LK)
    w_v = _dim0(W, LV)
    n_v = _dim1(NT, LV)
    word_v = _sigma(_dim2(16, LV))  # [1, 1, 16]
    S2: gl.constexpr = gl.SliceLayout(1, MMA)  # [W, NT]: per-token scales of the C layout
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
    # (n: the next tile, m: the one after). Measured on the H200 (RESULTS.md): depth 2 beats 1
    # by 2-4 %; 3 tiles, or page ids loaded an iteration ahead of their codes, were slower.
    nkw, nvw, nks, nkz, nvs, nvz = _load_tile(
            lo, hi, bt_row, kc32, vc32, KS, KZ, VS, VZ, tw_k, tw_v, tw_s,
            n_k, n_v, n_s, word_k, word_v, ck, cv, cks, cvs, kc_head, vc_head, ks_head, vs_head,
            PAGE, stride_kcp, stride_kct, stride_vcp, stride_vct, stride_ksp, stride_kst,
            stride_vsp, stride_vst)
    if DEPTH == 2:
        mkw, mvw, mks, mkz, mvs, mvz = _load_tile(
            lo + BLOCK_N, hi, bt_row, kc32, vc32, KS, KZ, VS, VZ, tw_k, tw_v, tw_s,
            n_k, n_v, n_s, word_k, word_v, ck, cv, cks, cvs, kc_head, vc_head, ks_head, vs_head,
            PAGE, stride_kcp, stride_kct, stride_vcp, stride_vct, stride_ksp, stride_kst,
            stride_vsp, stride_vst)

    ROWS: gl.constexpr = gl.SliceLayout(2, MMA)  # [W, 16] per-row softmax state
    m_i = gl.full([W, 16], float("-inf"), gl.float32, ROWS)
    l_i = gl.zeros([W, 16], gl.float32, ROWS)
    z_i = gl.zeros([W, 16], gl.float32, ROWS)
    a0 = gl.zeros([W, 16, 16], gl.float32, MMA)
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
        ok_c = (n0 + off_s) < hi  # [W, NT] tokens of this tile
        if HAS_WINDOW:
            ok_c = ok_c & ((n0 + off_s) >= start)

        # ---- prefetch DEPTH tiles ahead
        if DEPTH == 2:
            nkw, nvw, nks, nkz, nvs, nvz = mkw, mvw, mks, mkz, mvs, mvz
        n_next = n0 + DEPTH * BLOCK_N
        mkw, mvw, mks, mkz, mvs, mvz = _load_tile(
            n_next, hi, bt_row, kc32, vc32, KS, KZ, VS, VZ, tw_k, tw_v, tw_s,
            n_k, n_v, n_s, word_k, word_v, ck, cv, cks, cvs, kc_head, vc_head, ks_head, vs_head,
            PAGE, stride_kcp, stride_kct, stride_vcp, stride_vct, stride_ksp, stride_kst,
            stride_vsp, stride_vst)
        if DEPTH == 1:
            nkw, nvw, nks, nkz, nvs, nvz = mkw, mvw, mks, mkz, mvs, mvz

        # ---- scores s = sum_j q_j K_j^T  [W, 16 rows, NT tokens]
        k0, k1, k2, k3, k4, k5, k6, k7 = _unpack(kw)
        s = gl.zeros([W, 16, NT], gl.float32, MMA)
        s = mma_v2(q0, gl.convert_layout(k0, DB, assert_trivial=True), s)
        s = mma_v2(q1, gl.convert_layout(k1, DB, assert_trivial=True), s)
        s = mma_v2(q2, gl.convert_layout(k2, DB, assert_trivial=True), s)
        s = mma_v2(q3, gl.convert_layout(k3, DB, assert_trivial=True), s)
        s = mma_v2(q4, gl.convert_layout(k4, DB, assert_trivial=True), s)
        s = mma_v2(q5, gl.convert_layout(k5, DB, assert_trivial=True), s)
        s = mma_v2(q6, gl.convert_layout(k6, DB, assert_trivial=True), s)
        s = mma_v2(q7, gl.convert_layout(k7, DB, assert_trivial=True), s)
        ks32 = ks.to(gl.float32) * 16777216.0  # the subnormals' 2**-24
        s = s * ks32[:, None, :] + kz.to(gl.float32)[:, None, :] * q_sum[:, :, None]

        # ---- online softmax per warp, log2 units, along the tokens (axis 2)
        s = s * qk_scale
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = gl.where(ok_c[:, None, :], s * 1.4426950408889634, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 2))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a warp with no token yet
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s - m_use[:, :, None])
        l_i = l_i * alpha + gl.sum(p, 2)
        z_i = z_i * alpha + gl.sum(p * vz.to(gl.float32)[:, None, :], 2)
        m_i = m_new
        al = alpha[:, :, None]
        pv = gl.convert_layout(
            (p * vs.to(gl.float32)[:, None, :]).to(gl.float16),
            gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2), assert_trivial=True)

        # ---- acc_j += P V_j  [W, 16 rows, 16 words]
        v0, v1, v2, v3, v4, v5, v6, v7 = _unpack(vw)
        a0 = mma_v2(pv, gl.convert_layout(v0, DB, assert_trivial=True), a0 * al)
        a1 = mma_v2(pv, gl.convert_layout(v1, DB, assert_trivial=True), a1 * al)
        a2 = mma_v2(pv, gl.convert_layout(v2, DB, assert_trivial=True), a2 * al)
        a3 = mma_v2(pv, gl.convert_layout(v3, DB, assert_trivial=True), a3 * al)
        a4 = mma_v2(pv, gl.convert_layout(v4, DB, assert_trivial=True), a4 * al)
        a5 = mma_v2(pv, gl.convert_layout(v5, DB, assert_trivial=True), a5 * al)
        a6 = mma_v2(pv, gl.convert_layout(v6, DB, assert_trivial=True), a6 * al)
        a7 = mma_v2(pv, gl.convert_layout(v7, DB, assert_trivial=True), a7 * al)

    # ---- merge the warps (once per program) and store the split's partial state
    m_all = gl.max(m_i, 0)  # [16]
    m_use = gl.where(m_all == float("-inf"), 0.0, m_all)
    wgt = gl.exp2(m_i - m_use[None, :])  # [W, 16]: 0 for a warp that saw no token
    l_all = gl.sum(l_i * wgt, 0)
    rows = gl.arange(0, 16, layout=gl.SliceLayout(0, ROWS))
    heads = kvh * GROUP + rows
    part = (b.to(gl.int64) * num_q_heads + heads) * num_splits + split
    row_ok = rows < GROUP
    gl.store(ML + 2 * part, m_all, mask=row_ok)
    gl.store(ML + 2 * part + 1, l_all, mask=row_ok)

    wz = (z_i * wgt)[:, :, None]  # V's zero-point term, added to every channel
    w3 = wgt[:, :, None]
    g_o = _dim1(16, MMA)
    n_o = _dim2(16, MMA)
    o_ptr = ACC + ((b.to(gl.int64) * num_q_heads + kvh * GROUP + g_o) * num_splits + split) * 128
    w_o = _dim0(W, MMA)
    o_ptr = o_ptr + 8 * _sigma(n_o) + 0 * w_o  # [W, 16, 16]: only warp 0 stores
    o_ok = (g_o < GROUP) & (n_o < 16) & (w_o == 0)
    # Even slots' codes came as code * 2**-24, odd ones as code * 2**-20.
    _store_slot(o_ptr + 0, a0 * (w3 * 16777216.0) + wz, o_ok)
    _store_slot(o_ptr + 1, a1 * (w3 * 1048576.0) + wz, o_ok)
    _store_slot(o_ptr + 2, a2 * (w3 * 16777216.0) + wz, o_ok)
    _store_slot(o_ptr + 3, a3 * (w3 * 1048576.0) + wz, o_ok)
    _store_slot(o_ptr + 4, a4 * (w3 * 16777216.0) + wz, o_ok)
    _store_slot(o_ptr + 5, a5 * (w3 * 1048576.0) + wz, o_ok)
    _store_slot(o_ptr + 6, a6 * (w3 * 16777216.0) + wz, o_ok)
    _store_slot(o_ptr + 7, a7 * (w3 * 1048576.0) + wz, o_ok)
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
    n_k,
    n_v,
    n_s,
    word_k,
    word_v,
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
):
    """Raw K and V words (each thread its own fragment's) and the four per-token parameter
    vectors of the tile starting at token n; tokens at or past hi read as 0. A warp's part of
    the tile lies in one page: one page id per thread and operand (the same for a warp)."""
    t_k = n + tw_k
    t_v = n + tw_v
    t_s = n + tw_s
    pg_k = gl.load(bt_row + t_k // PAGE, mask=t_k < hi, other=0)
    pg_v = gl.load(bt_row + t_v // PAGE, mask=t_v < hi, other=0)
    pg_s = gl.load(bt_row + t_s // PAGE, mask=t_s < hi, other=0)
    base_k = pg_k.to(gl.int64) * stride_kcp + kc_head + (t_k % PAGE) * stride_kct
    kw = gl.load(kc32 + base_k + ck, mask=((t_k + n_k) < hi) & (word_k < 16), other=0)
    base_v = pg_v.to(gl.int64) * stride_vcp + vc_head + (t_v % PAGE) * stride_vct
    vw = gl.load(vc32 + base_v + cv, mask=((t_v + n_v) < hi) & (word_v < 16), other=0)
    ok_s = (t_s + n_s) < hi
    pg_s = pg_s.to(gl.int64)
    in_page = t_s % PAGE
    k_s = pg_s * stride_ksp + ks_head + in_page * stride_kst + cks
    v_s = pg_s * stride_vsp + vs_head + in_page * stride_vst + cvs
    ks = gl.load(KS + k_s, mask=ok_s, other=0.0)
    kz = gl.load(KZ + k_s, mask=ok_s, other=0.0)
    vs = gl.load(VS + v_s, mask=ok_s, other=0.0)
    vz = gl.load(VZ + v_s, mask=ok_s, other=0.0)
    return kw, vw, ks, kz, vs, vz


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
    tokens_per_warp=16,
    maxnreg=None,
    depth=2,
) -> None:
    """Launch the split kernel for one INT4 / INT4 head group (decode.py's launcher calls this
    for the groups ``_mma_applies`` accepts; arguments as for the Triton kernel).
    ``page_size`` must be a multiple of ``tokens_per_warp``."""
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
        GROUP=group, PAGE=page_size, NT=tokens_per_warp,
        K_ROT=k_rot is not None, K_SMOOTH=k_smooth is not None,
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None,
        Q_SPLIT=k_smooth is not None or q.dtype.itemsize == 4, DEPTH=depth, num_warps=NUM_WARPS,
        **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
    # fmt: on
