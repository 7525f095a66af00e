"""Launch plans: everything the attention launchers derive from one layer's K/V stores, built
once per allocation, and the tuning knobs benchmarks may turn. No triton import: a plan is
plain tensors and numbers, built and tested anywhere.

A plan depends on the stores' layout (which heads sit in which pool, the rotation block and
signs, head_dim), never on the page count, so it survives the pools growing. Engines keep one
per layer (``sawquant.runtime.LayerKV``) and pass it to every launch: nothing is looked up by
``id()`` or rebuilt per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sawquant.format import SideStore
from sawquant.quant.hadamard import block_hadamard, hadamard_scale

__all__ = [
    "DecodePlan",
    "DecodeTuning",
    "HeadGroup",
    "MMA_GROUP_SIZES",
    "PrefillPlan",
    "channel_order",
    "merge_heads",
    "mma_k_channel",
    "mma_rotation_columns",
    "mma_v_channel",
    "mma_word_of_col",
    "mma_word_of_k",
    "next_pow2",
    "rotation_matrix",
]


def next_pow2(n: int) -> int:
    # Plain Python: triton.next_power_of_2 / cdiv go through the JIT's constexpr unwrapping,
    # which costs ~10 us of host time per call, on every decode step.
    return 1 << (int(n) - 1).bit_length()


def rotation_matrix(
    store: SideStore, device: torch.device, *, inverse: bool
) -> tuple[torch.Tensor | None, float]:
    """The store's rotation as an fp16 matrix of +-1 entries and its float scale.

    Forward (``x @ R``): ``diag(signs) @ H``; inverse (``x @ R.T``): ``H @ diag(signs)``, H the
    unnormalised Sylvester block (exact in fp16). (None, 1.0) when there is no rotation.
    """
    if store.block == 1 and store.signs is None:
        return None, 1.0
    h = block_hadamard(store.head_dim, store.block, dtype=torch.float64).to(device)
    h = h / hadamard_scale(store.block)
    if store.signs is not None:
        s = store.signs.to(device=device, dtype=torch.float64)
        h = h * s[None, :] if inverse else s[:, None] * h
    return h.round().to(torch.float16).contiguous(), hadamard_scale(store.block)


def channel_order(block_w: int) -> list[int]:
    """The channel of each column of an unpacked INT4 tile (host copy of the kernel's map:
    channels 0, 4 | 2, 6 | 1, 5 | 3, 7 of each 32-bit word)."""
    nib = (0, 4, 2, 6, 1, 5, 3, 7)
    return [8 * (c // 8) + nib[c % 8] for c in range(8 * block_w)]


def mma_word_of_k(k: int) -> int:
    """Word of a row at K-operand index k of the tensor-core decode kernel (its ``_tau``)."""
    return (k & 1) + 2 * ((k >> 3) & 1) + 4 * ((k >> 1) & 3)


def mma_word_of_col(n: int) -> int:
    """Word of a row at V-operand column n of the tensor-core decode kernel (its ``_sigma``)."""
    return 2 * (n & 7) + (n >> 3)


def mma_k_channel(slot: int, k: int, bits: int = 4) -> int:
    """Channel of K (and of q) that code slot ``slot`` (0-7) holds at K-operand index k of the
    tensor-core decode kernel (its ``_k_chan``). INT4: nibble slot j of word tau(k), channel
    8 tau(k) + j. INT8: a row's 32 words are two halves of 16, slot 4 h + j is byte j of word
    16 h + tau(k), channel 64 h + 4 tau(k) + j."""
    if bits == 4:
        return 8 * mma_word_of_k(k) + slot
    return 64 * (slot >> 2) + 4 * mma_word_of_k(k) + (slot & 3)


def mma_v_channel(slot: int, m: int, bits: int = 4) -> int:
    """Channel of V (and of the output) that code slot ``slot`` holds at V-operand row m (its
    ``_v_chan``): as :func:`mma_k_channel`, with the word order sigma."""
    if bits == 4:
        return 8 * mma_word_of_col(m) + slot
    return 64 * (slot >> 2) + 4 * mma_word_of_col(m) + (slot & 3)


def mma_rotation_columns(matrix: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """[128, 128] -> the same columns in the tensor-core kernel's order for a K side of
    ``bits``: column 16 j + k is ``matrix[:, mma_k_channel(j, k, bits)]``."""
    order = [mma_k_channel(j, k, bits) for j in range(8) for k in range(16)]
    return matrix[:, torch.tensor(order, device=matrix.device)].contiguous()


def _permuted_columns(matrix: torch.Tensor, block_w: int, *, natural: bool) -> torch.Tensor:
    """[D, D] -> [D, 8 * block_w]: column c' is ``matrix[:, chan[c']]`` (0 past D);
    ``natural``: chan[c'] = c' (only padded), for tiles in natural channel order."""
    d = matrix.shape[1]
    order = list(range(8 * block_w)) if natural else channel_order(block_w)
    chan = torch.tensor(order, device=matrix.device)
    out = torch.zeros(matrix.shape[0], 8 * block_w, dtype=matrix.dtype, device=matrix.device)
    ok = chan < d
    out[:, ok] = matrix[:, chan[ok]]
    return out


@dataclass(frozen=True)
class DecodeTuning:
    """Launch parameters of the decode kernel. The defaults are what the H100 sweeps in
    benchmarks/RESULTS.md chose; benchmarks pass their own, production never changes them."""

    # Triton kernel: tokens per tile for INT4 / INT4 and INT8 K / INT4 V groups (128 was
    # fastest at the target shapes; 64 and 256, and 8 warps at 128, were slower). Heads wider
    # than 128 halve it.
    block_n: int = 128
    # Groups with a 16-bit side or an INT8 V side: their raw tiles are 2-4x larger and the hand
    # prefetch keeps the next K and V tiles in registers; at 128 these builds spill (ptxas,
    # triton 3.9, sm_90a, d 128: 72-416 B of stack), at 64 none does.
    wide_block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # INT4 unpack through fp16 subnormals (5 instructions a word instead of 11): 1-2 % faster.
    subnormal_unpack: bool = True
    # INT4 / INT8 head groups run the tensor-core kernel (decode_mma.py) where the plan says
    # it can; False: the Triton kernel everywhere (benchmarks' A/B).
    mma: bool = True
    # Sides with per-group scales (groups of 16-64) run it too, dequantizing their codes in
    # registers; False: such groups run the Triton kernel (benchmarks' A/B).
    mma_groups: bool = True
    # INT8 sides with one scale per token (fallback heads) run it too, as two halves of byte
    # slots; False: such groups run the Triton kernel (benchmarks' A/B).
    mma_int8: bool = True
    mma_tokens_per_warp: int = 16
    # Register cap for GQA <= 8 groups (8 query columns): 128 lets 4 programs share an SM
    # instead of 3 (ptxas, triton 3.6, sm_90a: 150 registers uncapped and 16 B of prologue
    # spills at 128 before the q rotation was shared across warps; 128 and none since). H200,
    # 64x8k: 202.5 us capped against 269.2 uncapped (RESULTS.md). GQA 9-16 groups (16 columns,
    # 211-219 registers) are never capped. None: no cap.
    mma_maxnreg: int | None = 128
    # The same for builds with a per-group or an INT8 side (``MMA_WIDE_REGISTERS``): 168, so 3
    # programs per SM with no spills (at 128 they spill, but INT8 K alone with K rotated).
    mma_wide_maxnreg: int = 168
    # Tiles of codes in flight per warp (1 or 2): 1 was 2-4 % faster than 2 on the H200 at every
    # shape (150 registers against 168, 3 programs per SM either way).
    mma_depth: int = 1
    # Context tokens a tensor-core program reads at least (its q rotation and merge share are
    # a fixed cost: H200, 8x4k, 1024 tokens per program 29.6 us, 512 38.2). 0: the benchmarks'
    # forced mode, with no dispatch rule and splits of 256 tokens or more.
    mma_min_tokens: int = 1024
    # Query heads per program of the split merge (16, 8, 4, 2 or 1); None: ``merge_heads``'s
    # rule. Benchmarks' A/B only.
    merge_heads: int | None = None
    # A layer's head groups (INT4 and its fallback heads) launch on two CUDA streams, the
    # largest group on the caller's, the others on a side stream joined before the merge, so a
    # short fallback launch overlaps the INT4 one instead of following it (H200, one INT8 K
    # head: 64x16k 441.6 -> 421.8 us, 1x4k 19.7 -> 12.9; never slower; CUDA-graph replays
    # equal eager calls; RESULTS.md). CUDA only; False: one stream (benchmarks' A/B).
    concurrent_groups: bool = True
    # Splits of a group on that side stream: no fewer than the main group's (its programs no
    # longer), at most this many times as many (the merge reads the most splits of any group
    # for every query head), and its dispatch rule counts the layer's programs, not its own.
    # H200, one INT8 K head beside 7 INT4 heads, CUDA-graph us (RESULTS.md): 8x4k 45.0 -> 26.4
    # (a lone head sized as if alone took 32 Triton splits where the INT4 group took 4),
    # 64x16k 420.2 -> 414.8, 32x16k 221.8 -> 216.4; at 1 (equal splits) 64x16k took 545.9, the
    # side programs then longest; 2 and 8 were slower than 4 at 64x16k and 32x16k. 0: each
    # group sized as if it had the GPU to itself (before; A/B).
    side_split_ratio: int = 4


DEFAULT_DECODE_TUNING = DecodeTuning()


@dataclass(frozen=True)
class HeadGroup:
    """The KV heads that share one (K precision, V precision): one kernel launch."""

    k_bits: int
    v_bits: int
    heads: torch.Tensor  # [n] int32 KV heads
    k_index: torch.Tensor  # [n] int32 index of each head in its K pool
    v_index: torch.Tensor  # [n] int32 index in its V pool

    def block_n(self, head_dim: int, tuning: DecodeTuning) -> int:
        wide = (self.k_bits, self.v_bits) not in ((4, 4), (8, 4))
        if head_dim <= 128:
            return tuning.wide_block_n if wide else tuning.block_n
        return tuning.wide_block_n // 2 if wide else tuning.block_n // 2


def merge_heads(batch: int, num_q_heads: int, num_sms: int, tuning: DecodeTuning) -> int:
    """Query heads per program of the split merge: 16 (the V un-rotation is a tensor-core dot),
    or 1 when programs of 16 would be fewer than an eighth of the SMs. Such a merge is bound
    by one program's latency, which grows with the heads and splits it reads: H200, batch 1,
    16 splits, 2 programs of 16 heads 4.8 us, 32 of one 3.0; at batch 8 (4 splits, 16
    programs) 16 heads 3.0 against 3.8 (RESULTS.md). 2-8 heads per program (tuning only) were
    slower than both."""
    if tuning.merge_heads:
        return tuning.merge_heads
    return 16 if batch * -(-num_q_heads // 16) >= max(1, num_sms // 8) else 1


def _pow2_splits(want: int, max_context: int) -> int:
    """The largest power of two <= want, 128 and one split per 128 context tokens (H200, 1x4k:
    32 splits of 128 tokens 11.9 us, 16 of 256 12.7; RESULTS.md)."""
    cap = max(1, max_context // 128)
    return 1 << (min(want, cap, 128).bit_length() - 1)


# ptxas registers of the tensor-core kernel by (query columns, tiles in flight), uncapped
# (triton 3.6, sm_90a), measured before q's rotation was shared across warps (it brought
# (8, 1) to 128 and (16, 1) to 211: the programs per SM, which these set and which set the
# split count, are the same either way, at the default cap of 128).
MMA_REGISTERS = {(8, 1): 150, (8, 2): 168, (16, 1): 219, (16, 2): 218}
# The same for "wide" builds, with a per-group or an INT8 side (benchmarks/
# compile_mma_offline.py, K rotated), the most of any such build at the wide cap of 168:
# groups of 16-64 on both sides 162 (175 uncapped; at 152, 16-24 B of spills; at 128, 112 B:
# their scales are held per word); INT8 K 150, INT8 V 155, both 163, INT8 K + grouped V 166;
# so 3 programs per SM. 16 columns, uncapped: grouped 227, INT8 K 217, both INT8 235.
MMA_WIDE_REGISTERS = {8: 166, 16: 235}


# Group sizes the tensor-core kernel reads besides one scale per token (head_dim 128): a
# group is 2, 4 or 8 of a row's 16 words, so all 8 nibble slots of a word share its scale.
MMA_GROUP_SIZES = (16, 32, 64)


def mma_columns(group: int) -> int:
    """Query columns of the tensor-core kernel's MMAs for a GQA group (8 or 16)."""
    return 8 if group <= 8 else 16


def mma_register_cap(group: int, tuning: DecodeTuning, wide: bool = False) -> int | None:
    """The register cap the tensor-core kernel is built with: the tuning's for 8-column
    builds (``mma_wide_maxnreg`` where a side has per-group scales or INT8 codes); 16-column
    builds (GQA 9-16, 211-235 registers) are never capped."""
    if mma_columns(group) != 8 or tuning.mma_maxnreg is None:
        return None
    return tuning.mma_wide_maxnreg if wide else tuning.mma_maxnreg


def mma_programs_per_sm(group: int, tuning: DecodeTuning, wide: bool = False) -> int:
    """Programs of the tensor-core kernel one SM holds (64k registers, 128 threads each)."""
    columns = mma_columns(group)
    regs = MMA_WIDE_REGISTERS[columns] if wide else MMA_REGISTERS[(columns, tuning.mma_depth)]
    cap = mma_register_cap(group, tuning, wide)
    if cap is not None:
        regs = min(regs, cap)
    return max(1, 65536 // (-(-regs // 8) * 8 * 128))


@dataclass(frozen=True)
class DecodePlan:
    """Head groups, rotation matrices in the kernels' channel orders, and device facts."""

    head_dim: int
    block_w: int  # 32-bit words (8 INT4 codes) per row, padded to a power of two
    groups: tuple[HeadGroup, ...]
    k_rot: torch.Tensor | None  # [D, 8 BLOCK_W] fp16: q rotation, columns in INT4 tile order
    k_rot_natural: torch.Tensor | None  # the same, natural order (INT8 / 16-bit K groups)
    k_rot_scale: float
    v_unrot: torch.Tensor | None  # [D, D] fp16: H diag(signs) for the output un-rotation
    v_rot_scale: float
    num_sms: int  # programs per wave: splits are sized from it
    use_asm: bool  # inline PTX unpack (NVIDIA GPUs; the interpreter cannot run it)
    # The tensor-core kernel (decode_mma.py) can serve this layer's INT4 / INT8 heads: an
    # NVIDIA GPU with mma.sync (sm_80+) and head_dim 128. Its q rotation, columns permuted.
    mma_capable: bool = False
    mma_rot: torch.Tensor | None = None
    mma_rot8: torch.Tensor | None = None  # the same for INT8 K heads (byte slots)
    main_group: int = 0  # the group with the most heads: the others may run beside it
    concurrent: bool = False  # a CUDA device and more than one group: two streams possible

    @classmethod
    def build(cls, k_store: SideStore, v_store: SideStore, device: torch.device) -> DecodePlan:
        d = k_store.head_dim
        block_w = next_pow2(max(-(-d // 8), 2))
        k_where, v_where = k_store.pool_of(), v_store.pool_of()
        by_bits: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for h, ((kb, ki), (vb, vi)) in enumerate(zip(k_where, v_where)):
            by_bits.setdefault((kb, vb), []).append((h, ki, vi))
        groups = []
        for (kb, vb), rows in sorted(by_bits.items()):
            t = torch.tensor(rows, dtype=torch.int32).T.contiguous().to(device)
            groups.append(HeadGroup(kb, vb, t[0], t[1], t[2]))
        hk, k_scale = rotation_matrix(k_store, device, inverse=False)
        hv, v_scale = rotation_matrix(v_store, device, inverse=True)
        cuda = device.type == "cuda"
        nvidia = cuda and torch.version.hip is None
        mma = nvidia and d == 128 and torch.cuda.get_device_capability(device)[0] >= 8
        return cls(
            head_dim=d,
            block_w=block_w,
            groups=tuple(groups),
            main_group=max(range(len(groups)), key=lambda i: groups[i].heads.numel()),
            concurrent=cuda and len(groups) > 1,
            k_rot=None if hk is None else _permuted_columns(hk, block_w, natural=False),
            k_rot_natural=None if hk is None else _permuted_columns(hk, block_w, natural=True),
            k_rot_scale=k_scale,
            v_unrot=hv,
            v_rot_scale=v_scale,
            num_sms=torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4,
            use_asm=nvidia,
            mma_capable=mma,
            mma_rot=mma_rotation_columns(hk) if mma and hk is not None else None,
            mma_rot8=(
                mma_rotation_columns(hk, 8)
                if mma and hk is not None and 8 in k_store.pools
                else None
            ),
        )

    def splits(self, batch: int, num_kv_heads: int, max_context: int) -> int:
        """Context splits per (sequence, KV head) of one launch: about 4 programs per SM (2 are
        resident at a time: the kernel's registers allow 2 per SM), a power of two, and no split
        shorter than 128 tokens. From the H100 sweeps in benchmarks/RESULTS.md: 32x16k -> 2,
        8x32k -> 8; from the H200's, 1x4k -> 32. ``num_kv_heads`` are the heads of ONE launch,
        so a lone fallback head at batch 64 gets 8 splits where the INT4 group gets 1."""
        want = max(1, (4 * self.num_sms) // max(batch * num_kv_heads, 1))
        return _pow2_splits(want, max_context)

    def mma_splits(
        self, batch: int, num_kv_heads: int, max_context: int, programs_per_sm: int,
        min_tokens: int,
    ) -> int:  # fmt: skip
        """Splits for the tensor-core kernel: as many programs as the SMs hold at once (one
        wave: the kernel is bound by instruction issue, so an SM wants all the programs it can
        hold, and a second wave costs a whole one), none shorter than ``min_tokens`` (256 when
        0). At 4 programs per SM on the H200 (132 SMs, 1024 tokens): 32x16k -> 2, 64x8k -> 1,
        8x32k -> 8, 8x4k -> 4; each the sweep's best or within 2 % of it (RESULTS.md)."""
        pairs = max(batch * num_kv_heads, 1)
        slots = max(self.num_sms, 1) * programs_per_sm
        cap = max(1, min(128, max_context // max(min_tokens, 256)))
        return max(1, min(slots // pairs, cap))


@dataclass(frozen=True)
class PrefillPlan:
    """The inverse rotations the chunked-prefill gather applies to each side."""

    k_unrot: torch.Tensor | None  # [D, D] fp16: H diag(signs), or None without rotation
    k_rot_scale: float
    v_unrot: torch.Tensor | None
    v_rot_scale: float

    @classmethod
    def build(cls, k_store: SideStore, v_store: SideStore, device: torch.device) -> PrefillPlan:
        hk, k_scale = rotation_matrix(k_store, device, inverse=True)
        hv, v_scale = rotation_matrix(v_store, device, inverse=True)
        return cls(k_unrot=hk, k_rot_scale=k_scale, v_unrot=hv, v_rot_scale=v_scale)
