"""Statistics on synthetic KV with planted outliers, and the budgeted selection."""

from __future__ import annotations

import math

import torch

from sawquant.calibration.capture import AttentionCall
from sawquant.calibration.recipe import Recipe
from sawquant.calibration.select import select
from sawquant.calibration.stats import INT8, NAIVE, Candidate, StatsAccumulator, make_candidates

H_KV, G, S, D = 3, 2, 256, 64


def _synthetic_call(k_scale_head: int | None = None, outliers: bool = True) -> AttentionCall:
    """Keys with 4 planted outlier channels (x25) on every head; optionally one head scaled x40
    so its softmax is razor sharp (no rotation can save INT4 there)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, H_KV * G, S, D, generator=gen)
    k = torch.randn(1, H_KV, S, D, generator=gen)
    if outliers:
        k[..., [3, 17, 40, 41]] *= 25.0
    if k_scale_head is not None:
        k[:, k_scale_head] *= 40.0
    v = torch.randn(1, H_KV, S, D, generator=gen)
    return AttentionCall(0, q, k, v, D**-0.5, None, None, None)


def _accumulate(call: AttentionCall, candidates: list[Candidate]) -> StatsAccumulator:
    acc = StatsAccumulator(
        num_layers=1, num_kv_heads=H_KV, head_dim=D, candidates=candidates, query_samples=64
    )
    acc.new_window()
    acc(call)
    return acc


def test_planted_outlier_channels_pick_a_rotation():
    cands = make_candidates(D, [1, 16, 32, 64], [None], [None])
    acc = _accumulate(_synthetic_call(), cands)
    k = acc.sides[0]["k"]
    err = acc.attn_err(0, "k").mean(1)  # [C]
    for c, e in zip(cands, err.tolist()):
        print(f"{c.label():16s} attn err {math.sqrt(e):.4f}")
    ratio, kurt = k.outlier_ratio(), k.kurtosis()
    print("K outlier ratio", ratio.tolist(), "kurtosis", kurt.tolist())
    assert (ratio > 10).all() and (kurt > 10).all()  # planted channels seen (Gaussian: ~1.5, 3)
    assert (acc.sides[0]["v"].kurtosis() - 3).abs().max() < 0.5
    choice = select(
        [{"k": acc.attn_err(0, "k"), "v": acc.attn_err(0, "v")}],
        cands,
        Recipe(max_avg_bits=4.5),
        head_dim=D,
    )
    chosen = choice[0]["k"].candidate
    print("chosen for K:", chosen.label())
    assert chosen.block >= 16
    # Rotation must beat naive by a wide margin on these keys (measured ~4x lower error).
    assert err[cands.index(chosen)] < 0.25 * err[cands.index(NAIVE)]
    sqnr = k.sqnr_db()
    assert sqnr[cands.index(chosen)].mean() > sqnr[cands.index(NAIVE)].mean() + 6


def test_planted_pathological_head_becomes_fallback():
    cands = make_candidates(D, [1, 16, 32, 64], [None, 0], [None, 32])
    acc = _accumulate(_synthetic_call(k_scale_head=1, outliers=False), cands)
    errs = [{"k": acc.attn_err(0, "k"), "v": acc.attn_err(0, "v")}]
    best = acc.attn_err(0, "k")[:-1].min(0).values.sqrt()  # best INT4 error per head
    print("best INT4 K error per head:", best.tolist())
    assert best[1] > 0.1 > max(best[0], best[2])
    recipe = Recipe(fallback_threshold=0.1, max_fallback_fraction=0.2, max_avg_bits=6.0)
    choice = select(errs, cands, recipe, head_dim=D)[0]
    print("K fallback:", choice["k"].fallback_heads, "V fallback:", choice["v"].fallback_heads)
    assert set(choice["k"].fallback_heads) == {1}
    assert math.sqrt(choice["k"].head_err[1]) < 0.1


def _random_errs(layers: int, heads: int, cands: list[Candidate], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        layer = {}
        for side in ("k", "v"):
            e = torch.rand(len(cands), heads, generator=gen) * 0.02
            e[cands.index(INT8)] = e[0] / 289
            e[:, torch.randint(0, heads, (1,), generator=gen)] *= 50  # one bad head per side
            layer[side] = e
        out.append(layer)
    return out


def test_selection_respects_bit_budget_and_fallback_fraction():
    cands = make_candidates(D, [1, 16, 32, 64], [None, 0], [None, 32])
    errs = _random_errs(12, 4, cands)
    n_heads = 12 * 2 * 4
    for budget, fraction in ((4.5, 0.5), (4.8, 0.05), (5.0, 0.1), (6.0, 0.02), (9.0, 1.0)):
        recipe = Recipe(
            max_avg_bits=budget, max_fallback_fraction=fraction, fallback_threshold=0.05
        )
        choices = select(errs, cands, recipe, head_dim=D)
        bits = sum(c[s].bits(4, D) for c in choices for s in ("k", "v")) / n_heads
        fallbacks = sum(len(c[s].fallback_heads) for c in choices for s in ("k", "v"))
        total = sum(sum(c[s].head_err) for c in choices for s in ("k", "v"))
        print(
            f"budget {budget} frac {fraction}: avg bits {bits:.3f}, "
            f"fallbacks {fallbacks}, err {total:.4f}"
        )
        assert bits <= budget + 1e-9
        assert fallbacks <= math.floor(fraction * n_heads)
        if budget == 4.5:
            assert fallbacks == 0 and bits == 4.5  # no room for anything but INT4
        if budget == 9.0:
            assert bits > 6.0  # a generous budget is used


def test_smaller_block_within_tolerance():
    cands = make_candidates(D, [1, 16, 32, 64], [None], [None])
    e = torch.full((len(cands), 2), 1.0)
    e[cands.index(Candidate(block=16))] = 0.505
    e[cands.index(Candidate(block=64))] = 0.5
    errs = [{"k": e, "v": e}]
    loose = select(errs, cands, Recipe(block_tolerance=0.02, max_fallback_fraction=0), head_dim=D)
    strict = select(errs, cands, Recipe(block_tolerance=0.0, max_fallback_fraction=0), head_dim=D)
    assert loose[0]["k"].candidate.block == 16
    assert strict[0]["k"].candidate.block == 64


def test_fast_fake_quant_matches_the_spec():
    """The statistics' fast quantizer gives the spec's error (sawquant.quant) to within 1%."""
    from sawquant.calibration.stats import _fake_quant_fast
    from sawquant.config import SideConfig
    from sawquant.simulate import fake_quant_side

    x = torch.randn(2, 3, 200, D, generator=torch.Generator().manual_seed(4)) * 3 + 0.5
    for bits, group in ((4, None), (4, 32), (8, None)):
        spec = (fake_quant_side(x, SideConfig(bits=bits, group_size=group)) - x).square().sum()
        fast = (_fake_quant_fast(x, bits, group) - x).square().sum()
        print(f"INT{bits} g{group}: spec noise {spec:.5f}, fast noise {fast:.5f}")
        assert abs(fast / spec - 1) < 0.01


def test_objective_steers_the_budget_to_sensitive_layers():
    """Same relative errors in two layers; the loss weighting makes layer 1 ten times more
    sensitive, so the one affordable INT8 head goes there."""
    cands = make_candidates(D, [1, 32], [None], [None])
    e = torch.full((len(cands), 2), 0.01, dtype=torch.float64)
    e[cands.index(INT8)] = 0.0001
    errs = [{"k": e, "v": e}, {"k": e, "v": e}]
    objective = [{"k": e, "v": e}, {"k": 10 * e, "v": e}]
    recipe = Recipe(max_avg_bits=4.5 + 4 / 8 + 1e-6, max_fallback_fraction=1.0)  # one head
    plain = select(errs, cands, recipe, head_dim=D)
    weighted = select(errs, cands, recipe, head_dim=D, objective=objective)
    assert sum(len(c[s].fallback_heads) for c in weighted for s in "kv") == 1
    assert weighted[1]["k"].fallback_heads and not plain[1]["k"].fallback_heads
