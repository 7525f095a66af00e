"""Paged decode attention: the Triton kernel (interpreter on CPU) against its float32 twin."""

from __future__ import annotations

import pytest
import torch
from _paged_fixture import (
    build_cache,
    check_close,
    poison_float_allocations,
    torch_lowp_attention,
)

from sawquant.errors import InputError
from sawquant.kernels import decode, plans
from sawquant.kernels.decode import paged_decode_attention
from sawquant.kernels.plans import DecodePlan, DecodeTuning
from sawquant.quant import rotate, unrotate
from sawquant.quant.attention import gather_heads as _gather_heads
from sawquant.quant.decode import paged_decode_attention_ref

CASES = {
    # name: head_dim, block, page, (H_q, H_kv), dtype, lens, num_splits, window, softcap, extra
    "gqa1-page16-bf16": (64, 16, 16, (2, 2), torch.bfloat16, [1, 37, 16], 1, None, None, {}),
    "gqa3-page64-fp16-fallback": (
        64, 32, 64, (6, 2), torch.float16, [100, 5], 3, None, None,
        {"k_bits": (8, 4), "v_bits": (4, 16)},
    ),
    "gqa4-d128-softcap": (128, 128, 16, (8, 2), torch.bfloat16, [33, 64, 1], 2, None, 30.0, {}),
    "gqa8-d128-page64-window": (128, 64, 64, (8, 1), torch.float16, [130], 4, 50, None, {}),
    "d96-block32-auto-splits": (
        96, 32, 16, (6, 2), torch.bfloat16, [45, 17], None, None, None,
        {"k_bits": (4, 16), "v_bits": (8, 4)},
    ),
    "group-size-32": (64, 32, 16, (4, 2), torch.bfloat16, [40, 9], 2, None, None,
                      {"group_size": 32}),
    "no-rotation": (64, 1, 16, (4, 2), torch.float16, [20, 3], 2, 8, 20.0, {}),
    # More splits than the merge reads at once (4), the last chunk partial.
    "seven-splits-fallback": (64, 32, 16, (4, 2), torch.bfloat16, [300, 41], 7, None, None,
                              {"k_bits": (4, 8)}),
    # Version-2 transforms: centering and smoothing on K and V, rotated and not, with fallbacks.
    "transforms-rotated": (64, 32, 16, (4, 2), torch.bfloat16, [90, 7], 2, None, None,
                           {"transforms": True, "k_bits": (4, 8), "v_bits": (16, 4)}),
    "transforms-no-rotation": (64, 1, 16, (6, 2), torch.float16, [40, 3], None, 16, None,
                               {"transforms": True}),
    # head_dim % 8 != 0: INT4 rows are not 4-byte aligned, codes are read byte by byte and the
    # last 32-bit word of a row is partial.
    "d68-unaligned-rows": (68, 1, 16, (4, 2), torch.bfloat16, [37, 5], 2, None, None, {}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_decode_matches_reference(name, monkeypatch):
    d, block, page, (h_q, h_kv), dtype, lens, splits, window, softcap, extra = CASES[name]
    torch.manual_seed(0)
    k_store, v_store, table = build_cache(
        lens=lens, num_kv_heads=h_kv, head_dim=d, page_size=page, block=block, dtype=dtype,
        **extra,
    )  # fmt: skip
    q = (torch.randn(len(lens), h_q, d) * 2).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    kw = dict(softmax_scale=d**-0.5, sliding_window=window, softcap=softcap)
    ref = paged_decode_attention_ref(q, k_store, v_store, table, seq_lens, **kw)
    assert ref.dtype == dtype and ref.shape == q.shape
    lowp = torch_lowp_attention(q, k_store, v_store, table, seq_lens, scale=d**-0.5, window=window,
                       softcap=softcap)  # fmt: skip
    poison_float_allocations(monkeypatch)
    out = paged_decode_attention(q, k_store, v_store, table, seq_lens, num_splits=splits, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    check_close(out, ref.float(), lowp)


@pytest.mark.parametrize("extra", [{}, {"k_bits": (16, 4), "v_bits": (4, 8), "group_size": 16}])
def test_float32_query_error_is_small(extra):
    """With float32 q and output, only the fp16 tensor-core operands round: relative error of
    a few 1e-4 against the float32 twin."""
    k_store, v_store, table = build_cache(
        lens=[77, 200], num_kv_heads=2, head_dim=128, page_size=16, block=128, **extra
    )
    q = torch.randn(2, 8, 128) * 2
    lens = torch.tensor([77, 200], dtype=torch.int32)
    kw = dict(softmax_scale=128**-0.5, num_splits=2)
    out = paged_decode_attention(q, k_store, v_store, table, lens, **kw)
    ref = paged_decode_attention_ref(q, k_store, v_store, table, lens, **kw)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"relative error, float32 q: {rel:.2e}")
    assert rel < 2e-3


def test_reference_is_plain_attention_on_dequantized_values():
    """The twin equals attention written out by hand (dequantize, rotate q, unrotate out)."""
    k_store, v_store, table = build_cache(
        lens=[19], num_kv_heads=1, head_dim=64, page_size=16, block=32
    )
    q = torch.randn(1, 2, 64)
    lens = torch.tensor([19], dtype=torch.int32)
    ref = paged_decode_attention_ref(q, k_store, v_store, table, lens, softmax_scale=0.125)
    k = _gather_heads(k_store, table, lens)[0][0]  # [19, 64] rotated
    v = _gather_heads(v_store, table, lens)[0][0]
    qr = rotate(q[0], 32, k_store.signs)  # [2, 64]
    o = torch.softmax(qr @ k.T * 0.125, -1) @ v
    err = (ref[0] - unrotate(o, 32, None)).abs().max().item()
    print(f"max err vs hand-written attention {err:.2e}")
    assert err < 1e-5


def test_splits_agree():
    """One split and many splits agree up to the fp16 rounding of the tensor-core operands
    (P is rounded relative to each split's own running max)."""
    k_store, v_store, table = build_cache(
        lens=[150, 70], num_kv_heads=2, head_dim=64, page_size=16, block=64
    )
    q = torch.randn(2, 4, 64)
    lens = torch.tensor([150, 70], dtype=torch.int32)
    one = paged_decode_attention(q, k_store, v_store, table, lens, softmax_scale=0.125,
                                 num_splits=1)  # fmt: skip
    many = paged_decode_attention(q, k_store, v_store, table, lens, softmax_scale=0.125,
                                  num_splits=5)  # fmt: skip
    err = (one - many).abs().max().item()
    print(f"max diff 1 vs 5 splits {err:.2e}")
    assert err < 2e-3  # measured 4.8e-4


def test_launcher_rejects_bad_inputs():
    k_store, v_store, table = build_cache(
        lens=[20], num_kv_heads=2, head_dim=64, page_size=16, block=16
    )
    q = torch.randn(1, 4, 64)
    lens = torch.tensor([20], dtype=torch.int32)
    with pytest.raises(InputError, match="multiple"):
        paged_decode_attention(torch.randn(1, 3, 64), k_store, v_store, table, lens,
                               softmax_scale=1.0)  # fmt: skip
    with pytest.raises(InputError, match="block_table"):
        paged_decode_attention(q, k_store, v_store, table.long(), lens, softmax_scale=1.0)
    with pytest.raises(InputError, match="seq_lens"):
        too_long = torch.tensor([table.shape[1] * 16 + 1], dtype=torch.int32)
        paged_decode_attention(q, k_store, v_store, table, too_long, softmax_scale=1.0)
    with pytest.raises(InputError, match="head_dim"):
        paged_decode_attention(torch.randn(1, 4, 32), k_store, v_store, table, lens,
                               softmax_scale=1.0)  # fmt: skip


def test_rotation_cache_follows_the_store():
    """Cached rotation matrices belong to their store: new signs (in place or a new store)
    are picked up, never a stale matrix."""
    k_store, v_store, table = build_cache(
        lens=[30], num_kv_heads=1, head_dim=64, page_size=16, block=16
    )
    q = torch.randn(1, 2, 64)
    lens = torch.tensor([30], dtype=torch.int32)
    kw = dict(softmax_scale=0.125, num_splits=1)
    paged_decode_attention(q, k_store, v_store, table, lens, **kw)  # fills the caches
    k_store.signs[:32].neg_()  # the stored codes no longer match; both sides must agree
    out = paged_decode_attention(q, k_store, v_store, table, lens, **kw)
    ref = paged_decode_attention_ref(q, k_store, v_store, table, lens, **kw)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"relative error after changing the signs in place: {rel:.2e}")
    assert rel < 2e-3


def test_channel_order_host_matches_kernel():
    """The plan permutes the rotation matrix with channel_order; the kernel unpacks tiles
    in _channel_map's order. They must be the same permutation of 0..8W-1."""
    import triton
    import triton.language as tl

    @triton.jit
    def _map_kernel(out, BLOCK_W: tl.constexpr):
        tl.store(out + tl.arange(0, 8 * BLOCK_W), decode._channel_map(BLOCK_W))

    for block_w in (2, 8, 16):
        got = torch.zeros(8 * block_w, dtype=torch.int32)
        _map_kernel[(1,)](got, BLOCK_W=block_w)
        want = plans.channel_order(block_w)
        print(block_w, got.tolist()[:16])
        assert got.tolist() == want
        assert sorted(want) == list(range(8 * block_w))


@pytest.mark.parametrize("subnormal", [0, 1])
def test_int4_unpack_variants_match(subnormal):
    """Both INT4 unpack paths (code values, or the subnormal code * 2**-24 / 2**-20 with the
    factors folded into q, the scales and the output) give the same attention."""
    k_store, v_store, table = build_cache(
        lens=[150, 40], num_kv_heads=2, head_dim=64, page_size=16, block=32
    )
    q = torch.randn(2, 8, 64) * 2
    lens = torch.tensor([150, 40], dtype=torch.int32)
    kw = dict(softmax_scale=0.125, num_splits=2)
    tuning = DecodeTuning(subnormal_unpack=bool(subnormal))
    out = paged_decode_attention(q, k_store, v_store, table, lens, tuning=tuning, **kw)
    ref = paged_decode_attention_ref(q, k_store, v_store, table, lens, **kw)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"relative error, subnormal unpack {subnormal}: {rel:.2e}")
    assert rel < 2e-3


def _check_against_twin(monkeypatch, q, k_store, v_store, table, seq_lens, **launch):
    """The kernel (scale 0.125, NaN-poisoned workspace, ``launch`` passed on) meets the
    tolerance rule against the twin."""
    ref = paged_decode_attention_ref(q, k_store, v_store, table, seq_lens, softmax_scale=0.125)
    lowp = torch_lowp_attention(q, k_store, v_store, table, seq_lens, scale=0.125)
    poison_float_allocations(monkeypatch)
    out = paged_decode_attention(
        q, k_store, v_store, table, seq_lens, softmax_scale=0.125, **launch
    )
    check_close(out, ref.float(), lowp)


@pytest.mark.parametrize("side_ratio", [0, 2])
def test_fallback_groups_with_their_own_split_counts(side_ratio, monkeypatch):
    """INT8 / 16-bit head groups (natural channel order, BLOCK_N 64) next to an INT4 group:
    with automatic splits a lone fallback head gets more splits than the INT4 group, and the
    split slots it leaves unwritten must weigh nothing in the merge (NaN-poisoned workspace).
    side_ratio 2: the groups sized as beside the main group on a side stream (bounded by its
    splits; on the CPU they still launch one after the other).
    """
    import dataclasses

    torch.manual_seed(0)
    lens = [300, 37]
    k_store, v_store, table = build_cache(
        lens=lens, num_kv_heads=4, head_dim=64, page_size=16, block=32,
        k_bits=(4, 8, 4, 16), v_bits=(4, 4, 4, 16), dtype=torch.float16,
    )  # fmt: skip
    # A wide block table (4096 positions) lets the split rule go past the 128-token floor.
    table = torch.cat([table, table[:, :1].expand(-1, 256 - table.shape[1])], 1).contiguous()
    plan = DecodePlan.build(k_store, v_store, torch.device("cpu"))
    plan = dataclasses.replace(plan, num_sms=6, concurrent=True)  # 4 programs per "SM"
    tuning = DecodeTuning(side_split_ratio=side_ratio)
    splits = decode.split_choices(plan, k_store, v_store, 2, 2, 4096, tuning=tuning)[1]
    print(
        "groups (k_bits, v_bits, heads):",
        [(g.k_bits, g.v_bits, g.heads.tolist()) for g in plan.groups],
    )
    print("own split counts:", splits)
    assert len(set(splits)) > 1  # the test covers unequal split counts
    q = (torch.randn(2, 8, 64) * 2).to(torch.float16)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    _check_against_twin(monkeypatch, q, k_store, v_store, table, seq_lens, plan=plan,
                        tuning=tuning)  # fmt: skip


@pytest.mark.parametrize("heads", [1, 2, 4, 16])
def test_merge_head_blocks_agree(heads, monkeypatch):
    """The split merge with 1-16 query heads per program (below 16 the V un-rotation is a
    broadcast product in column chunks, at 16 a tensor-core dot) gives the twin's output,
    with V smoothing and centering, 7 splits (a partial last pass) and a fallback head."""
    torch.manual_seed(0)
    lens = [300, 41]
    k_store, v_store, table = build_cache(
        lens=lens, num_kv_heads=2, head_dim=64, page_size=16, block=32,
        k_bits=(4, 8), transforms=True,
    )  # fmt: skip
    q = (torch.randn(2, 6, 64) * 2).to(torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    _check_against_twin(
        monkeypatch, q, k_store, v_store, table, seq_lens, num_splits=7,
        tuning=DecodeTuning(merge_heads=heads),
    )  # fmt: skip


def test_merge_heads_rule():
    """Heads per merge program on a 132-SM GPU with 32 query heads: one per program up to
    batch 4, 16 (the dot) from batch 8, where 16 programs of 16 heads run."""
    rule = lambda b: plans.merge_heads(b, 32, 132, DecodeTuning())  # noqa: E731
    assert [rule(b) for b in (1, 2, 4, 8, 16, 64)] == [1, 1, 1, 16, 16, 16]
    assert plans.merge_heads(1, 32, 132, DecodeTuning(merge_heads=4)) == 4
