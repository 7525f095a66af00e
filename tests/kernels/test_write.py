"""The fused write kernel equals its torch twin bit for bit (codes, scales, zeros, fallback pools).

On a machine without CUDA the Triton kernel runs in the interpreter (tests/kernels/conftest.py),
so shapes stay small.
"""

from __future__ import annotations

import pytest
import torch
from _builders import copy_side, poisoned_side

from sawquant.errors import ConfigError, InputError
from sawquant.format import SideStore
from sawquant.kernels.write import rotate_quantize_paged
from sawquant.quant import paged_gather_ref, rotate
from sawquant.quant.write import rotate_quantize_paged_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- fixtures ------------------------------------------------------------------------------


def _store(*, heads: int, head_dim: int, **kw) -> SideStore:
    """A side whose pools are filled with random bytes, so untouched slots are recognisable."""
    return poisoned_side(num_kv_heads=heads, head_dim=head_dim, device=DEVICE, **kw)


_clone = copy_side


def _slots(num_tokens: int, page_size: int, num_pages: int, gen: torch.Generator) -> torch.Tensor:
    """Slots of T tokens of 2 sequences through a random (permuted) block table; ~1/6 are -1."""
    table = torch.randperm(num_pages, generator=gen).view(2, num_pages // 2)  # [B, max_pages]
    capacity = (num_pages // 2) * page_size
    pick = torch.randperm(2 * capacity, generator=gen)[:num_tokens]  # distinct (seq, position)
    seq, pos = pick // capacity, pick % capacity
    slots = table[seq, pos // page_size] * page_size + pos % page_size
    slots[torch.rand(num_tokens, generator=gen) < 1 / 6] = -1
    return slots.to(DEVICE)


def _inputs(num_tokens: int, heads: int, head_dim: int, dtype, gen: torch.Generator):
    """Outlier-heavy K/V: a few hot channels, rows of very different scales, constant rows."""
    x = torch.randn(2, num_tokens, heads, head_dim, generator=gen)
    hot = torch.randperm(head_dim, generator=gen)[:3]
    x[..., hot] *= 40.0
    x *= torch.exp(2.0 * torch.randn(2, num_tokens, heads, 1, generator=gen))
    x[:, ::7, 0] = 1.5  # constant rows: scale 0 for block 1
    x[:, 1::9, -1] = 0.0
    x = x.to(dtype).to(DEVICE)
    return x[0], x[1]


def _assert_same(a: SideStore, b: SideStore) -> None:
    for bits in a.pools:
        for field in ("codes", "scale", "zero"):
            x, y = getattr(a.pools[bits], field), getattr(b.pools[bits], field)
            if x is None:
                continue
            diff = (x.view(torch.uint8) != y.view(torch.uint8)).sum().item()
            print(f"pool {bits} {field}: {diff} differing bytes")
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), f"pool {bits} {field}"


def _run_both(k, v, slots, k_store, v_store, spread=None):
    k_ref, v_ref = _clone(k_store), _clone(v_store)
    before = (_clone(k_store), _clone(v_store))
    rotate_quantize_paged(k, v, slots, k_store, v_store, spread=spread)
    rotate_quantize_paged_ref(k, v, slots, k_ref, v_ref)
    _assert_same(k_store, k_ref)
    _assert_same(v_store, v_ref)
    return before


# ---- bit-exact INT4 ------------------------------------------------------------------------

CASES = [
    # head_dim, page, k block, k sign seed, v block, group, T, dtype
    (64, 16, 1, None, 1, None, 17, torch.bfloat16),
    (64, 16, 16, 3, 64, None, 217, torch.bfloat16),
    (64, 64, 32, None, 1, 32, 17, torch.float32),
    (64, 16, 64, 5, 32, 32, 1, torch.bfloat16),
    (128, 64, 128, 7, 64, None, 217, torch.bfloat16),
    (128, 16, 64, None, 128, 32, 17, torch.float32),
    (128, 64, 1, 9, 16, None, 1, torch.float16),
    (96, 16, 32, 11, 32, 32, 217, torch.bfloat16),
    (96, 64, 32, None, 16, None, 17, torch.float32),
]


@pytest.mark.parametrize("head_dim,page,k_block,k_seed,v_block,group,T,dtype", CASES)
def test_int4_bit_exact(head_dim, page, k_block, k_seed, v_block, group, T, dtype):
    gen = torch.Generator().manual_seed(head_dim * 1000 + T + k_block)
    heads, num_pages = 3, 2 * (-(-T // page) + 1)
    common = dict(heads=heads, head_dim=head_dim, group=group, page_size=page, num_pages=num_pages)
    k_store = _store(block=k_block, seed=k_seed, **common)
    v_store = _store(block=v_block, seed=None, **common)
    k, v = _inputs(T, heads, head_dim, dtype, gen)
    slots = _slots(T, page, num_pages, gen)
    before_k, _ = _run_both(k, v, slots, k_store, v_store)

    # Slots not in slot_mapping (and the -1 tokens) are untouched: every byte of the poison.
    written = torch.zeros(num_pages * page, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    kept = ~written.view(num_pages, 1, page, 1)
    for field in ("codes", "scale", "zero"):
        now, old = getattr(k_store.pools[4], field), getattr(before_k.pools[4], field)
        assert torch.equal(torch.where(kept, now, 0), torch.where(kept, old, 0)), field
        changed = (now != old).any(dim=-1).any(dim=1).view(-1)  # [slots]
        assert not changed[~written].any()
    print(f"written slots {int(written.sum())} of {written.numel()}")


@pytest.mark.parametrize("spread", [True, False])
@pytest.mark.parametrize("case", [1, 4, 7])
def test_both_row_layouts_bit_exact(case, spread):
    """A row spread over several threads (few rows: the decode-step layout) and one row per
    thread (many rows) store the same bits as the twin, whichever the row count would pick."""
    head_dim, page, k_block, k_seed, v_block, group, T, dtype = CASES[case]
    gen = torch.Generator().manual_seed(head_dim * 1000 + T + k_block)  # storable inputs
    heads, num_pages = 3, 2 * (-(-T // page) + 1)
    common = dict(heads=heads, head_dim=head_dim, group=group, page_size=page, num_pages=num_pages)
    k_store = _store(block=k_block, seed=k_seed, **common)
    v_store = _store(block=v_block, seed=None, **common)
    k, v = _inputs(T, heads, head_dim, dtype, gen)
    _run_both(k, v, _slots(T, page, num_pages, gen), k_store, v_store, spread=spread)


def test_ref_quantizes_the_rotation():
    """The twin stores rotate(x) within half a quantization step (sanity of the spec itself)."""
    gen = torch.Generator().manual_seed(1)
    heads, head_dim, page, num_pages, T = 2, 64, 16, 4, 23
    store = _store(
        heads=heads, head_dim=head_dim, block=32, seed=2, group=None, page_size=page,
        num_pages=num_pages,
    )  # fmt: skip
    other = _clone(store)
    k, v = _inputs(T, heads, head_dim, torch.float32, gen)
    table = torch.randperm(num_pages, generator=gen).view(1, -1).to(torch.int32).to(DEVICE)
    pos = torch.arange(T, device=DEVICE)
    slots = table[0, pos // page].long() * page + pos % page
    rotate_quantize_paged_ref(k, v, slots, store, other)
    got = paged_gather_ref(store.pools[4], table, torch.tensor([T]))[0]  # [H, T, D]
    want = rotate(k, 32, store.signs).transpose(0, 1)
    step = store.pools[4].scale[table[0, pos // page].long(), :, pos % page].float()  # [T, H, 1]
    err = (got - want).abs() / step.transpose(0, 1).clamp_min(1e-30)
    print(f"max error / scale = {err.max().item():.4f}")
    assert err.max() <= 0.5 + 1e-3


# ---- fallback pools ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k_bits,v_bits,group,pool_dtype",
    [
        ((4, 8, 16), (16, 4, 4), None, torch.bfloat16),
        ((8, 4, 8), (4, 4, 16), 32, torch.float16),
        ((16, 16, 16), (8, 8, 8), None, torch.bfloat16),
    ],
)
def test_mixed_pools_bit_exact(k_bits, v_bits, group, pool_dtype):
    gen = torch.Generator().manual_seed(sum(k_bits) + sum(v_bits))
    head_dim, page, num_pages, T = 64, 16, 6, 33
    common = dict(heads=3, head_dim=head_dim, group=group, page_size=page, num_pages=num_pages)
    k_store = _store(block=32, seed=4, head_bits=k_bits, dtype=pool_dtype, **common)
    v_store = _store(block=16, seed=None, head_bits=v_bits, dtype=pool_dtype, **common)
    k, v = _inputs(T, 3, head_dim, torch.bfloat16, gen)
    _run_both(k, v, _slots(T, page, num_pages, gen), k_store, v_store)


@pytest.mark.parametrize("spread", [True, False])
@pytest.mark.parametrize("k_bits", [(4, 4, 4), (8, 4, 16)])
def test_centering_and_smoothing_bit_exact(k_bits, spread):
    """Version-2 transforms: (x - center) * inv_smooth before the signs and the butterfly, in
    the kernel as in the twin, down to the last bit (keys with a planted per-channel bias)."""
    gen = torch.Generator().manual_seed(11)
    head_dim, page, num_pages, T, heads = 64, 16, 6, 29, 3
    center = torch.randn(heads, head_dim, generator=gen) * 4
    center[:, 5] += 80.0  # a massive per-channel key bias, the Qwen2 kind
    smooth = torch.rand(heads, head_dim, generator=gen) * 3 + 0.25
    common = dict(heads=heads, head_dim=head_dim, page_size=page, num_pages=num_pages, group=None)
    k_store = _store(block=32, seed=4, head_bits=k_bits, center=center, smooth=smooth, **common)
    v_store = _store(block=16, seed=None, center=center[:, :].flip(1), **common)
    k, v = _inputs(T, heads, head_dim, torch.bfloat16, gen)
    k = k + center.to(torch.bfloat16)
    _run_both(k, v, _slots(T, page, num_pages, gen), k_store, v_store, spread=spread)


def test_strided_views_of_a_fused_qkv():
    """k and v as views of one [T, H_q + 2 H_kv, D] projection output (token stride 12 * D)."""
    gen = torch.Generator().manual_seed(5)
    head_dim, page, num_pages, T = 64, 16, 4, 23
    qkv = (torch.randn(T, 6 + 2 * 3, head_dim, generator=gen) * 4).to(torch.bfloat16).to(DEVICE)
    k, v = qkv[:, 6:9], qkv[:, 9:]
    common = dict(heads=3, head_dim=head_dim, group=None, page_size=page, num_pages=num_pages)
    k_store, v_store = _store(block=64, seed=1, **common), _store(block=32, seed=None, **common)
    _run_both(k, v, _slots(T, page, num_pages, gen), k_store, v_store)


def test_no_tokens_is_a_no_op():
    common = dict(heads=2, head_dim=64, group=None, page_size=16, num_pages=2)
    k_store, v_store = _store(block=16, seed=None, **common), _store(block=1, seed=None, **common)
    before = _clone(k_store)
    empty = torch.zeros(0, 2, 64, device=DEVICE)
    rotate_quantize_paged(
        empty, empty, torch.zeros(0, dtype=torch.long, device=DEVICE), k_store, v_store
    )
    _assert_same(k_store, before)


# ---- launcher errors -----------------------------------------------------------------------


def _error_case(**change):
    common = dict(heads=2, head_dim=64, group=None, page_size=16, num_pages=2)
    args = {
        "k": torch.randn(3, 2, 64, device=DEVICE),
        "v": torch.randn(3, 2, 64, device=DEVICE),
        "slot_mapping": torch.tensor([0, 5, -1], device=DEVICE),
        "k_store": _store(block=16, seed=None, **common),
        "v_store": _store(block=16, seed=None, **common),
    }
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,match",
    [
        ({"k": torch.randn(3, 128)}, r"k must be \[T, H_kv, D\]"),
        ({"v": torch.randn(3, 2, 64).to(torch.float64)}, "v dtype torch.float64"),
        ({"k": torch.randn(3, 4, 64)}, "k has 4 heads of dim 64 but its store holds 2"),
        ({"v": torch.randn(4, 2, 64)}, "k has 3 tokens but v has 4"),
        ({"slot_mapping": torch.tensor([0, 5, -1], dtype=torch.int32)}, "slot_mapping must be"),
        ({"slot_mapping": torch.tensor([0, 5])}, "slot_mapping must be"),
        ({"k": torch.randn(3, 64, 2).transpose(1, 2)}, "contiguous last dim"),
        ({"slot_mapping": torch.tensor([0, 5, -1], device="meta")}, "slot_mapping is on meta"),
    ],
)
def test_launcher_errors(change, match):
    change = {key: (t if t.device.type == "meta" else t.to(DEVICE)) for key, t in change.items()}
    with pytest.raises(InputError, match=match):
        rotate_quantize_paged(**_error_case(**change))


def test_launcher_rejects_bad_stores():
    common = dict(heads=2, head_dim=96, page_size=16, num_pages=2)
    x = torch.randn(3, 2, 96, device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    # One group rule for config, stores, twins and kernels: 48 is refused when the store is
    # made, not at the first GPU write (it used to pass the config, then fail in the writer).
    with pytest.raises(ConfigError, match="group size is 48 for head_dim 96"):
        _store(block=32, seed=None, group=48, **common)

    good = _store(block=32, seed=None, group=32, **common)
    bad_block = _store(block=32, seed=None, group=None, **common)
    bad_block.block = 64  # does not divide 96
    with pytest.raises(InputError, match="rotation block 64"):
        rotate_quantize_paged(x, x, slots, bad_block, _clone(good))

    other_page = _store(block=32, seed=None, group=None, heads=2, head_dim=96, page_size=32,
                        num_pages=1)  # fmt: skip
    with pytest.raises(InputError, match="share one page size"):
        rotate_quantize_paged(x, x, slots, good, other_page)


# ---- values the cache cannot store (one policy for twin and kernel) ------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.0e6], ids=["nan", "inf", "range"])
@pytest.mark.parametrize("bits", [4, 16])
def test_unstorable_values_raise_in_the_twin_and_flag_in_the_kernel(bad, bits):
    """BF16 fallback pools used to store NaN/Inf silently (then every decode was NaN), and the
    kernel stored garbage by design. Now the twin raises, the kernel sets the caller's flag,
    and the kernel without a flag raises like the twin."""
    from sawquant.errors import NonFiniteKVError

    if bad == 1.0e6 and bits == 16:
        bad = float("inf")  # a bf16 pool holds 1e6: only Inf is out of its range
    common = dict(heads=2, head_dim=32, block=16, seed=None, group=None, page_size=16)
    store = _store(head_bits=(bits, 4), num_pages=2, **common)
    x = torch.randn(5, 2, 32, device=DEVICE)
    x[3, 0, 7] = bad  # head 0: the pool of `bits`
    slots = torch.arange(5, device=DEVICE)
    with pytest.raises(NonFiniteKVError, match="cannot store"):
        rotate_quantize_paged_ref(x, x.clone(), slots, _clone(store), _clone(store))
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    rotate_quantize_paged(
        x, x.clone(), slots, _clone(store), _clone(store), flag=flag, flag_value=7
    )
    print("flag after a bad write:", flag.tolist())
    assert flag.tolist() == [7]
    with pytest.raises(NonFiniteKVError, match="cannot store"):
        rotate_quantize_paged(x, x.clone(), slots, _clone(store), _clone(store))
    flag.zero_()
    x[3, 0, 7] = 1.0
    rotate_quantize_paged(
        x, x.clone(), slots, _clone(store), _clone(store), flag=flag, flag_value=7
    )
    assert flag.tolist() == [0]  # a clean write leaves it alone
