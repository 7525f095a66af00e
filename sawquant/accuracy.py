"""How much of naive INT4's loss a config wins back, with a confidence interval over windows.

Recovery is ``(ppl_naive - ppl_config) / (ppl_naive - ppl_full)`` on the same held-out windows.
A figure from one set of windows is not a claim: the interval comes from resampling the windows
(a percentile bootstrap, seeded), so a text where the number moves a lot from window to window
shows a wide interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Recovery", "ppl_increase_with_ci", "recovery", "recovery_with_ci"]


def recovery(ppl_full: float, ppl_naive: float, ppl_config: float) -> float:
    """Share of naive INT4's perplexity loss that a config wins back: 1 = all of it, 0 = none.

    When naive INT4 loses nothing (difference below 1e-6 relative) there is nothing to recover:
    1.0 unless the config is worse than naive, then 0.0.
    """
    loss = ppl_naive - ppl_full
    if loss <= 1e-6 * ppl_full:
        return 1.0 if ppl_config <= ppl_naive + 1e-6 * ppl_full else 0.0
    return (ppl_naive - ppl_config) / loss


@dataclass(frozen=True)
class Recovery:
    """A recovery figure and its 95% interval over windows (fractions, not percent)."""

    value: float
    low: float
    high: float
    windows: int

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "windows": self.windows}

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% (95% CI {100 * self.low:.1f}-{100 * self.high:.1f}%)"


def _bootstrap(stat, n: int, resamples: int, seed: int) -> tuple[float, float, float]:
    """``stat`` of all ``n`` windows and its 95% percentile-bootstrap interval (windows drawn
    with replacement, seeded)."""
    value = stat(torch.arange(n))
    if n < 2:
        return value, value, value
    gen = torch.Generator().manual_seed(seed)
    draws = sorted(stat(torch.randint(0, n, (n,), generator=gen)) for _ in range(resamples))
    return value, draws[int(0.025 * (resamples - 1))], draws[int(0.975 * (resamples - 1))]


def _ppl(nll_sums: torch.Tensor, idx: torch.Tensor, tokens_per_window: int) -> float:
    return math.exp(float(nll_sums[idx].sum()) / (len(idx) * tokens_per_window))


def recovery_with_ci(
    full: torch.Tensor,
    naive: torch.Tensor,
    config: torch.Tensor,
    tokens_per_window: int,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> Recovery:
    """Recovery from per-window summed NLLs ([N] each, the same windows), with a bootstrap
    interval: windows are drawn with replacement and the perplexities recomputed."""

    def rec(idx: torch.Tensor) -> float:
        return recovery(*(_ppl(x, idx, tokens_per_window) for x in (full, naive, config)))

    value, low, high = _bootstrap(rec, full.shape[0], resamples, seed)
    return Recovery(value, low, high, full.shape[0])


def ppl_increase_with_ci(
    full: torch.Tensor,
    other: torch.Tensor,
    tokens_per_window: int,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, list[float]]:
    """Perplexity increase (percent) of ``other`` over ``full`` from per-window summed NLLs,
    and its 95% bootstrap interval over windows ``[low, high]``."""

    def inc(idx: torch.Tensor) -> float:
        gap = float(other[idx].sum() - full[idx].sum()) / (len(idx) * tokens_per_window)
        return (math.exp(gap) - 1) * 100

    value, low, high = _bootstrap(inc, full.shape[0], resamples, seed)
    return value, [low, high]
