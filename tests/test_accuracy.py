"""Recovery and perplexity increase with bootstrap intervals over windows."""

from __future__ import annotations

import math

import torch

from sawquant.accuracy import ppl_increase_with_ci, recovery, recovery_with_ci


def _nll_sums(mean: float, n: int = 12, tokens: int = 100, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (mean + 0.2 * torch.randn(n, generator=gen)) * tokens


def test_values_are_the_all_window_figures_and_the_intervals_bracket_them():
    full, naive, config = _nll_sums(2.0), _nll_sums(2.3, seed=1), _nll_sums(2.05, seed=2)
    ppl = [math.exp(float(x.sum()) / (12 * 100)) for x in (full, naive, config)]
    rec = recovery_with_ci(full, naive, config, 100)
    assert rec.value == recovery(*ppl)
    assert rec.low <= rec.value <= rec.high and rec.low < rec.high and rec.windows == 12
    inc, (low, high) = ppl_increase_with_ci(full, config, 100)
    assert math.isclose(inc, (ppl[2] / ppl[0] - 1) * 100, rel_tol=1e-9)
    assert low <= inc <= high and low < high
    assert ppl_increase_with_ci(full, config, 100) == (inc, [low, high])  # seeded


def test_one_window_has_no_spread():
    one = _nll_sums(2.0, n=1)
    rec = recovery_with_ci(one, one + 30, one + 10, 100)
    assert rec.low == rec.value == rec.high
