"""The tensor-core decode kernel's algebra and dispatch, on CPU.

The Gluon kernel (decode_mma.py) needs an NVIDIA GPU: the GPU checks run it against the
twin (benchmarks/gpu_check.py, bench_decode_mma.py). Here a torch emulation of it, written
from its docstring's decomposition (per-nibble-slot products, word orders tau / sigma, fp16
subnormal codes with their factors folded into q and the output, the zero-point terms), stands
in for the launch inside the real launcher, so the permuted rotation, the partial-state
contract with the merge, the split arithmetic and the dispatch rules are all checked against
the float32 twin; and the kernel's own index maps are checked against the host's.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _paged_fixture import (
    build_cache,
    check_close,
    poison_float_allocations,
    torch_lowp_attention,
)

from sawquant.kernels import decode, decode_mma, plans
from sawquant.kernels.decode import paged_decode_attention
from sawquant.kernels.plans import DecodePlan, DecodeTuning
from sawquant.quant.decode import paged_decode_attention_ref

LOG2E = 1.4426950408889634
BLOCK_N = decode_mma.NUM_WARPS * 16  # tokens a program's warps take per step


def _slot_values(words: torch.Tensor, j: int) -> torch.Tensor:
    """Nibble slot j of int32 words as the kernel's prmt / and unpack leaves it: the fp16
    subnormal code * 2**-24 (even slots, low nibble of a byte) or code * 2**-20 (odd)."""
    code = ((words.long() & 0xFFFFFFFF) >> (4 * j)) & 15
    return code.float() * (2.0**-24 if j % 2 == 0 else 2.0**-20)


def _byte_values(words: torch.Tensor, j: int) -> torch.Tensor:
    """Byte slot j of int32 words of an INT8 side as the kernel's prmt / and leaves it: the
    fp16 subnormal code * 2**-24."""
    code = ((words.long() & 0xFFFFFFFF) >> (8 * j)) & 255
    return code.float() * 2.0**-24


def _code_slot(words: torch.Tensor, bits: int, order: torch.Tensor, j: int) -> torch.Tensor:
    """Slot j of a side's words [T, 16 or 32] at operand index i (word order ``order``): an
    INT4 nibble of word order[i], or for INT8 (slot 4 h + j') byte j' of word 16 h + order[i]."""
    if bits == 4:
        return _slot_values(words[:, order], j)
    return _byte_values(words[:, 16 * (j >> 2) + order], j & 3)


def _dequant_values(words, pool, pages, head, off, j) -> torch.Tensor:
    """Nibble slot j of int32 words [T, 16] of a per-group pool as the kernel's lop3 / sub /
    fma leaves it: code * scale + zero of each word's group, rounded once to fp16."""
    code = ((words.long() & 0xFFFFFFFF) >> (4 * j)) & 15
    group = torch.arange(16) // (pool.spec.groups_divisor // 8)  # the group of each word
    scale = pool.scale[pages, head, off][:, group].double()
    zero = pool.zero[pages, head, off][:, group].double()
    return (code.double() * scale + zero).half().float()


def _emulated_split(q, kpool, vpool, group, heads, block_table, seq_lens, ml, acc, *,
                    splits, page_size, k_rot, k_rot_scale, k_smooth, softmax_scale,
                    sliding_window, softcap, max_len, num_q_heads, **_tuning):  # fmt: skip
    """What one launch of the kernel writes into ML / ACC, program by program."""
    tau = torch.tensor([plans.mma_word_of_k(k) for k in range(16)])
    sigma = torch.tensor([plans.mma_word_of_col(n) for n in range(16)])
    q_split = k_smooth is not None or q.dtype == torch.float32
    k_grouped = kpool.spec.groups_divisor < 128
    v_grouped = vpool.spec.groups_divisor < 128
    kb, vb = kpool.spec.bits, vpool.spec.bits
    k_chan = [torch.tensor([plans.mma_k_channel(j, k, kb) for k in range(16)]) for j in range(8)]
    v_chan = [torch.tensor([plans.mma_v_channel(j, m, vb) for m in range(16)]) for j in range(8)]
    for b in range(q.shape[0]):
        length = min(int(seq_lens[b]), max_len)
        start = max(length - sliding_window, 0) if sliding_window else 0
        base = start - start % 16  # tiles start at multiples of a warp's 16 tokens
        chunk = math.ceil(math.ceil((length - base) / splits) / BLOCK_N) * BLOCK_N
        for i in range(heads.heads.numel()):
            kvh, kp, vp = (int(t[i]) for t in (heads.heads, heads.k_index, heads.v_index))
            rows = slice(kvh * group, (kvh + 1) * group)
            qf = q[b, rows].float()
            if k_smooth is not None:
                qf = qf * k_smooth[kvh].float()
            q_hi = qf.half().float()
            q_lo = (qf - q_hi).half().float() if q_split else torch.zeros_like(qf)
            q_slots, q_sum = [], torch.zeros(group)
            for j in range(8):
                if k_rot is not None:
                    r = k_rot[:, 16 * j : 16 * j + 16].float()
                    qj = (q_hi @ r + q_lo @ r) * k_rot_scale
                else:
                    qj = qf[:, k_chan[j]]
                odd = kb == 4 and j % 2 and not k_grouped  # codes 16x larger
                qj = (qj / 16 if odd else qj).half().float()
                q_slots.append(qj)
                q_sum += qj.sum(1) * (16 if odd else 1)
            for split in range(splits):
                lo = base + split * chunk
                hi = min(lo + chunk, length)
                lo = max(lo, start)  # the kernel masks a window's tokens before start
                part = (b, rows, split)
                if lo >= hi:  # a program with no token: weight 0 in the merge
                    ml[part] = torch.tensor([float("-inf"), 0.0])
                    acc[part] = 0.0
                    continue
                pos = torch.arange(lo, hi)
                pages = block_table[b, pos // page_size].long()
                off = pos % page_size
                kw = kpool.codes[pages, kp, off].contiguous().view(torch.int32)  # [T, 16]
                vw = vpool.codes[pages, vp, off].contiguous().view(torch.int32)
                if k_grouped:
                    s = sum(q_slots[j] @ _dequant_values(kw, kpool, pages, kp, off, j)[:, tau].T
                            for j in range(8)) * softmax_scale  # fmt: skip
                else:
                    ks, kz = (t[pages, kp, off, 0].float() for t in (kpool.scale, kpool.zero))
                    s = sum(q_slots[j] @ _code_slot(kw, kb, tau, j).T for j in range(8))
                    s = (s * ks * 2.0**24 + kz * q_sum[:, None]) * softmax_scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                s = s * LOG2E
                m = s.max(1).values
                p = torch.exp2(s - m[:, None])
                out = torch.empty(group, 128)
                ml[part] = torch.stack([m, p.sum(1)], 1)
                if v_grouped:
                    pv = p.half().float()
                    for j in range(8):
                        vj = _dequant_values(vw, vpool, pages, vp, off, j)[:, sigma]
                        out[:, 8 * sigma + j] = pv @ vj
                    acc[part] = out
                    continue
                vs, vz = (t[pages, vp, off, 0].float() for t in (vpool.scale, vpool.zero))
                pv = (p * vs).half().float()
                for j in range(8):
                    a = pv @ _code_slot(vw, vb, sigma, j)  # [G, 16 columns]
                    out[:, v_chan[j]] = a * (2.0**20 if vb == 4 and j % 2 else 2.0**24)
                acc[part] = out + (p * vz).sum(1)[:, None]


def _emulating_plan(k_store, v_store) -> DecodePlan:
    plan = DecodePlan.build(k_store, v_store, torch.device("cpu"))
    nat = plan.k_rot_natural
    rot, rot8 = (
        (None, None) if nat is None else (plans.mma_rotation_columns(nat, b) for b in (4, 8))
    )
    return dataclasses.replace(plan, mma_capable=True, mma_rot=rot, mma_rot8=rot8)


CASES = {
    # name: block, (H_q, H_kv), dtype, lens, splits, window, softcap, extra
    "rotated-gqa4-bf16": (128, (8, 2), torch.bfloat16, [130, 37], 2, None, None, {}),
    "block32-gqa8-fp16-window-softcap": (32, (8, 1), torch.float16, [200], 3, 70, 30.0, {}),
    "no-rotation-fp16": (1, (4, 2), torch.float16, [90, 5], 1, None, None, {}),
    "float32-query-many-splits": (128, (4, 1), torch.float32, [150], 5, None, None, {}),
    # INT8 sides (fallback heads, per-token scales): K, V or both, beside INT4 groups.
    "int8-kv-fp16-window-softcap": (32, (8, 2), torch.float16, [200, 70], 3, 70, 30.0,
                                    {"k_bits": (8, 4), "v_bits": (8, 8)}),
    "int8-k-unrotated-v8": (1, (4, 2), torch.bfloat16, [90, 5], 2, None, None,
                            {"k_bits": (8, 8), "v_bits": (4, 8)}),
    "int8-k-beside-grouped-v": (128, (8, 2), torch.bfloat16, [130, 37], 2, None, None,
                                {"k_bits": (8, 4), "group_size": (None, 32)}),
    # Centering / smoothing (smoothed q rides as fp16 hi + lo), and an INT8 K head beside a
    # BF16 V head that stays with the Triton kernel in the same call.
    # Per-group scales: both sides, or K only / V only (the other per token).
    "groups32-rotated-gqa4": (128, (8, 2), torch.bfloat16, [130, 37], 2, None, None,
                              {"group_size": 32}),
    "groups16-k-softcap-fp16": (64, (4, 1), torch.float16, [150], 3, None, 20.0,
                                {"group_size": (16, None)}),
    "groups64-v-window": (1, (4, 2), torch.bfloat16, [90, 40], 1, 50, None,
                          {"group_size": (None, 64)}),
    "transforms-with-fallbacks": (
        64, (6, 3), torch.bfloat16, [100, 20], 2, None, None,
        {"transforms": True, "k_bits": (4, 8, 4), "v_bits": (4, 4, 16)},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_mma_kernel_matches_reference(name, monkeypatch):
    block, (h_q, h_kv), dtype, lens, splits, window, softcap, extra = CASES[name]
    torch.manual_seed(0)
    k_store, v_store, table = build_cache(
        lens=lens, num_kv_heads=h_kv, head_dim=128, page_size=16, block=block, dtype=dtype,
        **extra,
    )  # fmt: skip
    q = (torch.randn(len(lens), h_q, 128) * 2).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    kw = dict(softmax_scale=128**-0.5, sliding_window=window, softcap=softcap)
    ref = paged_decode_attention_ref(q, k_store, v_store, table, seq_lens, **kw)
    lowp = torch_lowp_attention(q, k_store, v_store, table, seq_lens, scale=128**-0.5,
                                window=window, softcap=softcap)  # fmt: skip
    monkeypatch.setattr(decode, "launch_mma_split", _emulated_split)
    poison_float_allocations(monkeypatch)
    before = dict(decode.LAUNCHES)
    plan = _emulating_plan(k_store, v_store)
    out = paged_decode_attention(
        q, k_store, v_store, table, seq_lens, num_splits=splits, plan=plan,
        tuning=DecodeTuning(mma_min_tokens=0), **kw,
    )  # fmt: skip
    mma = decode.LAUNCHES["mma"] - before.get("mma", 0)
    triton_launches = decode.LAUNCHES["triton"] - before.get("triton", 0)
    print(f"launches: mma {mma}, triton {triton_launches}")
    # every INT4 / INT8 group took the tensor-core path, and only 16-bit sides did not
    expected = sum({g.k_bits, g.v_bits} <= {4, 8} for g in plan.groups)
    assert mma == expected >= 1
    assert triton_launches == len(plan.groups) - expected
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"relative error vs the twin: {rel:.2e}")
    if dtype != torch.float32:  # float32 torch is exact: the rule does not apply (fp16 MMAs)
        check_close(out, ref.float(), lowp)
    assert torch.isfinite(out).all()
    # fp16 operands (measured 1e-3 .. 2e-3 in float32) plus one rounding of the output
    assert rel < 2.5e-3 + torch.finfo(dtype).eps / 2


def test_kernel_index_maps_match_the_host():
    """The kernel's tau / sigma are the host's maps; both are bijections of the 16 words, and
    the permuted rotation holds every column of the rotation exactly once."""
    ks = list(range(16))
    assert [decode_mma._tau.fn(k) for k in ks] == [plans.mma_word_of_k(k) for k in ks]
    assert [decode_mma._sigma.fn(n) for n in ks] == [plans.mma_word_of_col(n) for n in ks]
    assert sorted(plans.mma_word_of_k(k) for k in ks) == ks
    assert sorted(plans.mma_word_of_col(n) for n in ks) == ks
    # A thread holds K indices 2t, 2t+1, 2t+8, 2t+9: they must be 4 adjacent words.
    for t in range(4):
        words = [plans.mma_word_of_k(k) for k in (2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)]
        assert words == list(range(4 * t, 4 * t + 4))
    m = torch.arange(128 * 128, dtype=torch.float32).reshape(128, 128)
    cols = plans.mma_rotation_columns(m)
    assert sorted(cols[0].long().tolist()) == list(range(128))
    assert torch.equal(cols[:, 16 * 3 + 5], m[:, 8 * plans.mma_word_of_k(5) + 3])
    # The 8 code slots of either width cover each of the 128 channels once, on both sides.
    for bits in (4, 8):
        for channel in (plans.mma_k_channel, plans.mma_v_channel):
            got = sorted(channel(j, i, bits) for j in range(8) for i in ks)
            assert got == list(range(128)), (bits, channel.__name__)
    cols8 = plans.mma_rotation_columns(m, 8)  # slot 5 = byte 1 of the second half
    assert torch.equal(cols8[:, 16 * 5 + 3], m[:, 64 + 4 * plans.mma_word_of_k(3) + 1])


def test_operand_relabels_realise_the_word_orders():
    """The kernel loads words in memory order and relabels them as operand indices with one
    reshape + permute each (decode_mma.K_OPERAND_DIMS / V_OPERAND_DIMS): the result must be
    K's [token, k] = word tau(k) and V's [m, token] = word sigma(m), the maps the host and
    the emulation use."""
    nt = 16
    token = torch.arange(nt)[:, None]
    words = 100 * token + torch.arange(16)[None, :]  # [NT, word]: token and word of each
    x = words.reshape(1, nt, 2, 2, 2, 2)
    k_op = x.permute(*decode_mma.K_OPERAND_DIMS.value).reshape(1, nt, 16)[0]
    v_op = x.permute(*decode_mma.V_OPERAND_DIMS.value).reshape(1, 16, nt)[0]
    tau = torch.tensor([plans.mma_word_of_k(k) for k in range(16)])
    sigma = torch.tensor([plans.mma_word_of_col(m) for m in range(16)])
    assert torch.equal(k_op, 100 * token + tau[None, :])
    assert torch.equal(v_op, 100 * token.T + sigma[:, None])


def test_cpu_plans_use_the_triton_kernel():
    """No tensor cores on CPU: the plan says so and every launch is the Triton kernel's."""
    k_store, v_store, table = build_cache(
        lens=[40], num_kv_heads=2, head_dim=128, page_size=16, block=128
    )
    plan = DecodePlan.build(k_store, v_store, torch.device("cpu"))
    assert not plan.mma_capable and plan.mma_rot is None
    before = dict(decode.LAUNCHES)
    paged_decode_attention(
        torch.randn(1, 4, 128), k_store, v_store, table, torch.tensor([40], dtype=torch.int32),
        softmax_scale=0.1, num_splits=1,
    )  # fmt: skip
    assert decode.LAUNCHES["triton"] - before.get("triton", 0) == 1
    assert decode.LAUNCHES["mma"] == before.get("mma", 0)


def test_dispatch_rules(monkeypatch):
    """The tensor-core kernel takes INT4 / INT4 groups with per-token scales and GQA <= 16,
    and only for long enough programs (mma_min_tokens); the rest go to the Triton kernel."""
    monkeypatch.setattr(decode, "launch_mma_split", _emulated_split)

    def launches(tuning=DecodeTuning(mma_min_tokens=0), *, h_q=4, lens=(40,), splits=None,
                 page_size=16, **extra):  # fmt: skip
        k_store, v_store, table = build_cache(
            lens=list(lens),
            num_kv_heads=1,
            head_dim=128,
            page_size=page_size,
            block=128,
            **extra,
        )
        before = dict(decode.LAUNCHES)
        paged_decode_attention(
            torch.randn(len(lens), h_q, 128, dtype=torch.bfloat16), k_store, v_store, table,
            torch.tensor(list(lens), dtype=torch.int32), softmax_scale=0.1,
            num_splits=splits, plan=_emulating_plan(k_store, v_store), tuning=tuning,
        )  # fmt: skip
        return {k: v - before.get(k, 0) for k, v in decode.LAUNCHES.items() if v != before.get(k)}

    assert launches() == {"mma": 1}
    assert launches(h_q=32) == {"triton": 1}  # GQA 32: more query rows than the MMA tile
    assert launches(group_size=32) == {"mma": 1}  # per-group scales, dequantized in registers
    assert launches(DecodeTuning(mma_min_tokens=0, mma_groups=False), group_size=32) == {
        "triton": 1
    }
    assert launches(k_bits=(8,)) == {"mma": 1}  # INT8 K, two halves of byte slots
    assert launches(v_bits=(8,)) == {"mma": 1}
    assert launches(DecodeTuning(mma_min_tokens=0, mma_int8=False), k_bits=(8,)) == {"triton": 1}
    assert launches(k_bits=(8,), group_size=32) == {"triton": 1}  # a grouped INT8 side
    assert launches(k_bits=(16,)) == {"triton": 1}
    assert launches(page_size=8) == {"triton": 1}  # a warp's 16 tokens span two pages
    assert launches(DecodeTuning(mma=False)) == {"triton": 1}
    assert launches(DecodeTuning()) == {"triton": 1}  # 40 tokens < mma_min_tokens
    long = (1100, 1100)
    assert launches(DecodeTuning(), lens=long, splits=1) == {"mma": 1}
    assert launches(DecodeTuning(), lens=long, splits=2) == {"triton": 1}  # 550 per split
    # 1 program for the CPU plan's 4 "SMs": fewer than half of them, a latency-bound launch
    assert launches(DecodeTuning(), lens=(1100,), splits=1) == {"triton": 1}
    assert launches(DecodeTuning(), lens=(4100, 4100)) == {"mma": 1}  # 4 splits of 1028


def test_side_groups_are_sized_against_the_main_group():
    """On two streams a fallback group gets no fewer splits than the main group and at most
    side_split_ratio (4) times as many, and its dispatch rule counts the layer's programs. Sized as
    if alone (ratio 0, or one stream), a lone INT8 head at 8x4k ran 32 Triton splits beside
    the INT4 group's 4 (132 SMs)."""
    k_store, v_store, _ = build_cache(lens=[16], num_kv_heads=8, head_dim=128, page_size=16,
                                      block=128, k_bits=(8,) + (4,) * 7)  # fmt: skip
    plan = dataclasses.replace(_emulating_plan(k_store, v_store), num_sms=132, concurrent=True)
    assert [(g.k_bits, g.heads.numel()) for g in plan.groups] == [(4, 7), (8, 1)]

    def choices(batch, context, plan=plan, num_splits=None, **tuning):
        tune = DecodeTuning(**tuning)
        return decode.split_choices(plan, k_store, v_store, batch, 4, context,
                                    num_splits=num_splits, tuning=tune)  # fmt: skip

    assert choices(8, 4096) == ([True, True], [4, 4])
    assert choices(8, 4096, side_split_ratio=0) == ([True, False], [4, 32])
    assert choices(8, 4096, concurrent_groups=False) == ([True, False], [4, 32])
    assert choices(8, 4096, plan=dataclasses.replace(plan, concurrent=False)) == (
        [True, False], [4, 32]
    )  # fmt: skip
    assert choices(64, 16384) == ([True, True], [1, 4])  # at most 4x the main group's
    assert choices(64, 16384, side_split_ratio=0) == ([True, True], [1, 6])
    assert choices(64, 16384, side_split_ratio=1) == ([True, True], [1, 1])
    assert choices(8, 32768) == ([True, True], [9, 32])  # its own sizing, inside the bounds
    assert choices(1, 4096) == ([False, False], [32, 32])  # latency-bound: the Triton kernel
    assert choices(8, 4096, num_splits=3) == ([True, True], [3, 3])  # the caller's splits
    k_store, v_store, _ = build_cache(lens=[16], num_kv_heads=8, head_dim=128, page_size=16,
                                      block=128, k_bits=(16,) + (4,) * 7)  # fmt: skip
    plan = dataclasses.replace(_emulating_plan(k_store, v_store), num_sms=132, concurrent=True)
    # a BF16 head (Triton kernel): 64 splits alone, clamped to 36, then a power of two
    assert choices(8, 32768, plan=plan) == ([True, False], [9, 32])
    assert choices(8, 32768, plan=plan, side_split_ratio=0) == ([True, False], [9, 64])
    assert choices(64, 16384, plan=plan) == ([True, False], [1, 4])


def test_mma_splits_fill_one_wave():
    """Splits fill the SMs' resident program slots once, with programs of >= min_tokens; the
    register estimate gives 4 programs per SM for GQA <= 8 at the default cap, 2 for 9-16."""
    assert plans.mma_programs_per_sm(4, DecodeTuning()) == 4
    assert plans.mma_programs_per_sm(8, DecodeTuning(mma_maxnreg=None)) == 3
    assert plans.mma_programs_per_sm(16, DecodeTuning()) == 2
    assert plans.mma_programs_per_sm(4, DecodeTuning(), wide=True) == 3  # 150-166 registers
    assert plans.mma_programs_per_sm(12, DecodeTuning(), wide=True) == 2
    assert plans.mma_programs_per_sm(4, DecodeTuning(mma_wide_maxnreg=128), wide=True) == 4
    assert plans.mma_register_cap(4, DecodeTuning(), wide=True) == 168
    assert plans.mma_register_cap(12, DecodeTuning(), wide=True) is None
    plan = dataclasses.replace(_emulating_plan(*build_cache(lens=[16], num_kv_heads=1,
                               head_dim=128, page_size=16, block=1)[:2]), num_sms=132)  # fmt: skip
    got = {(b, n): plan.mma_splits(b, 8, n, 4, 1024)
           for b, n in ((32, 16384), (64, 8192), (8, 32768), (8, 4096), (1, 4096))}  # fmt: skip
    assert got == {(32, 16384): 2, (64, 8192): 1, (8, 32768): 8, (8, 4096): 4, (1, 4096): 4}
    assert plan.mma_splits(256, 8, 8192, 4, 1024) == 1  # more pairs than slots: no split
    assert plan.mma_splits(1, 1, 1 << 20, 4, 1024) == 128  # the merge's cap
    assert plan.mma_splits(1, 8, 4096, 4, 0) == 16  # forced: 256-token splits
