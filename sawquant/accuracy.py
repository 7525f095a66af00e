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

__all__ = ["Recovery", "recovery", "recovery_with_ci"]


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
    n = full.shape[0]

    def rec(idx: torch.Tensor) -> float:
        ppl = [math.exp(float(x[idx].sum()) / (len(idx) * tokens_per_window))
               for x in (full, naive, config)]  # fmt: skip
        return recovery(*ppl)

    value = rec(torch.arange(n))
    if n < 2:
        return Recovery(value, value, value, n)
    gen = torch.Generator().manual_seed(seed)
    draws = sorted(rec(torch.randint(0, n, (n,), generator=gen)) for _ in range(resamples))
    low = draws[int(0.025 * (resamples - 1))]
    high = draws[int(0.975 * (resamples - 1))]
    return Recovery(value, low, high, n)
