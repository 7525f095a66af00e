"""Choose, per layer and side, the quantizer with the lowest attention-output error under a budget.

Inputs are the measured ``attn_err[c, h]`` (relative squared attention-output error of candidate
c on KV head h, see ``stats``; inf for candidates that were pruned or are not allowed). The
choice runs in three steps:

1. Rotation: for every group size, the (block, sign seed) with the lowest mean error over the
   heads, each head taking its best exact transform (none, centering, centering + smoothing)
   under that rotation: transforms are free, and a head prefers the simpler one unless the
   other is better by more than ``block_tolerance``. Among the rotations within
   ``block_tolerance`` of the best, the smallest block (then no signs).
2. Fallbacks: heads whose INT4 error stays above ``fallback_threshold`` (relative, not squared)
   become INT8, or BF16 when even the measured INT8 error is above it; worst heads first, within
   ``max_fallback_fraction`` of all heads and the bit budget.
3. Budget: while bits remain under ``max_avg_bits``, apply the upgrade with the largest error
   reduction per extra bit: a smaller group size for a layer side, one head to INT8/BF16, or a
   whole side to INT8/BF16 (a first-class choice: a layer whose every head breaks is one
   decision, not H).

The objective is the sum over layers and sides of the mean head error, so every layer's
attention output counts alike. INT8 heads use the error measured for INT8 without rotation (an
upper bound: a rotation only makes INT8 better); BF16 heads count as error-free. The budget is
never exceeded; a budget below what INT4 itself costs is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sawquant.calibration.recipe import Recipe
from sawquant.calibration.stats import INT8, NAIVE, Candidate
from sawquant.config import bits_per_element
from sawquant.errors import ConfigError

__all__ = ["SideChoice", "select"]


@dataclass
class SideChoice:
    """What one layer side uses, with the errors that justified it (relative squared)."""

    candidate: Candidate  # the INT4 quantizer (rotation, signs, group) of the side
    fallback_heads: dict[int, int] = field(default_factory=dict)
    # Per head (center, smooth): the exact transforms the head uses under that rotation.
    head_transforms: list[tuple[bool, bool]] = field(default_factory=list)
    whole: int | None = None  # 8 or 16: the whole side falls back (no rotation, no transforms)
    head_err: list[float] = field(default_factory=list)  # per head, after the choice
    naive_err: list[float] = field(default_factory=list)  # per head, naive INT4
    int4_err: list[float] = field(default_factory=list)  # per head, chosen INT4 (no fallback)
    head_obj: list[float] = field(default_factory=list)  # per head objective after the choice
    naive_obj: list[float] = field(default_factory=list)  # per head objective, naive INT4

    def bits(self, num_heads: int, head_dim: int) -> float:
        if self.whole is not None:
            return num_heads * bits_per_element(self.whole, None, head_dim)
        per = [self.fallback_heads.get(h, 4) for h in range(num_heads)]
        return sum(bits_per_element(b, self.candidate.group_size, head_dim) for b in per)


@dataclass(frozen=True)
class _Option:
    """One group size's choice: the rotation and each head's candidate (its transform)."""

    group: int | None
    head_cand: tuple[int, ...]  # candidate index per head


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 1e30


class _Side:
    """Mutable selection state of one layer side."""

    def __init__(
        self,
        err: torch.Tensor,
        obj: torch.Tensor,
        candidates: list[Candidate],
        recipe: Recipe,
        head_dim: int,
    ):
        self.err = err.double()  # [C, H] relative squared error: thresholds and reports
        self.obj = obj.double()  # [C, H] what the choice minimises (loss estimate or err)
        self.cands = candidates
        self.head_dim = head_dim
        self.num_heads = err.shape[1]
        i8 = candidates.index(INT8) if INT8 in candidates else None
        naive = candidates.index(NAIVE)
        # Without a measured INT8 error: the step is 17x smaller, the noise power 289x.
        self.int8 = {
            "err": self.err[i8] if i8 is not None else self.err[naive] / 289,
            "obj": self.obj[i8] if i8 is not None else self.obj[naive] / 289,
        }
        # One option per group size, cheapest (largest group) first.
        groups = sorted(
            {c.group_size for c in candidates if c.bits == 4}, key=lambda g: -(g or head_dim)
        )
        tol = recipe.block_tolerance
        options = [self._best(g, tol) for g in groups]
        self.options = [o for o in options if o is not None]
        self.opt = 0
        self.fallback: dict[int, int] = {}
        self.whole: int | None = None

    def _best(self, group: int | None, tol: float) -> _Option | None:
        by_rotation: dict[tuple, list[int]] = {}
        for i, c in enumerate(self.cands):
            if c.bits == 4 and c.group_size == group:
                by_rotation.setdefault((c.block, c.sign_seed), []).append(i)
        scored = []
        for (block, seed), idx in by_rotation.items():
            # Simplest transform first: a head moves to a fancier one only if clearly better.
            idx = sorted(idx, key=lambda i: (self.cands[i].center, self.cands[i].smooth))
            head_cand = []
            for h in range(self.num_heads):
                best = min(idx, key=lambda i: _finite(float(self.obj[i, h])))
                floor = _finite(float(self.obj[best, h]))
                simple = next(i for i in idx if _finite(float(self.obj[i, h])) <= floor * (1 + tol))
                head_cand.append(simple)
            score = sum(_finite(float(self.obj[c, h])) for h, c in enumerate(head_cand))
            scored.append((score / self.num_heads, block, seed, tuple(head_cand)))
        scored = [s for s in scored if s[0] < 1e29]
        if not scored:
            return None
        best = min(s[0] for s in scored)
        ok = [s for s in scored if s[0] <= best * (1 + tol) + 1e-12]
        _, _, _, head_cand = min(ok, key=lambda s: (s[1], s[2] is not None, s[0]))
        return _Option(group, head_cand)

    # -- errors and costs ----------------------------------------------------------------------
    def head_err(
        self,
        h: int,
        opt: int | None = None,
        bits: int | None = None,
        table: str = "obj",
        whole: int | None | bool = False,
    ) -> float:
        opt = self.opt if opt is None else opt
        whole = self.whole if whole is False else whole
        if whole is not None:
            return 0.0 if whole == 16 else float(self.int8[table][h])
        bits = self.fallback.get(h, 4) if bits is None else bits
        e4 = float(getattr(self, table)[self.options[opt].head_cand[h], h])
        if bits == 16:
            return 0.0
        if bits == 8:
            return min(float(self.int8[table][h]), e4)
        return e4

    def total_err(self, opt: int | None = None, whole: int | None | bool = False) -> float:
        return (
            sum(self.head_err(h, opt, whole=whole) for h in range(self.num_heads)) / self.num_heads
        )

    def group(self, opt: int | None = None) -> int:
        g = self.options[self.opt if opt is None else opt].group
        return g or self.head_dim

    def head_bits(self, bits: int, opt: int | None = None) -> float:
        return bits_per_element(bits, self.group(opt), self.head_dim)

    def cost(self, opt: int | None = None, whole: int | None | bool = False) -> float:
        whole = self.whole if whole is False else whole
        if whole is not None:
            return self.num_heads * bits_per_element(whole, None, self.head_dim)
        return sum(self.head_bits(self.fallback.get(h, 4), opt) for h in range(self.num_heads))

    def choice(self) -> SideChoice:
        option = self.options[self.opt]
        rep = self.cands[option.head_cand[0]]
        naive = self.cands.index(NAIVE)
        return SideChoice(
            candidate=Candidate(4, rep.block, rep.sign_seed, option.group),
            fallback_heads={} if self.whole else dict(sorted(self.fallback.items())),
            head_transforms=[
                (self.cands[c].center, self.cands[c].smooth) for c in option.head_cand
            ],
            whole=self.whole,
            head_err=[self.head_err(h, table="err") for h in range(self.num_heads)],
            naive_err=[float(self.err[naive, h]) for h in range(self.num_heads)],
            int4_err=[float(self.err[c, h]) for h, c in enumerate(option.head_cand)],
            head_obj=[self.head_err(h) for h in range(self.num_heads)],
            naive_obj=[float(self.obj[naive, h]) for h in range(self.num_heads)],
        )


def select(
    attn_err: list[dict[str, torch.Tensor]],
    candidates: list[Candidate],
    recipe: Recipe,
    *,
    head_dim: int,
    objective: list[dict[str, torch.Tensor]] | None = None,
) -> list[dict[str, SideChoice]]:
    """Per layer, ``{"k": SideChoice, "v": SideChoice}``; see the module docstring.

    attn_err: per layer ``{"k": [C, H], "v": [C, H]}`` relative squared errors, candidates in
    the order of ``candidates`` (which must contain naive INT4; INT8 is used when present).
    ``objective`` (same layout, e.g. the Fisher loss estimate) is what the rotation choice and
    the budget minimise; default: attn_err. Thresholds always apply to attn_err.
    """
    if NAIVE not in candidates:
        raise ValueError("candidates must include naive INT4 (block 1, no signs, no groups)")
    objective = objective or attn_err
    sides = [
        _Side(layer[s], obj[s], candidates, recipe, head_dim)
        for layer, obj in zip(attn_err, objective)
        for s in ("k", "v")
    ]
    num_heads = sides[0].num_heads
    budget = recipe.max_avg_bits * num_heads * len(sides)
    max_fallback = int(math.floor(recipe.max_fallback_fraction * num_heads * len(sides)))
    used = sum(s.cost() for s in sides)
    if used > budget + 1e-9:
        cheapest = used / (num_heads * len(sides))
        raise ConfigError(
            f"INT4 with an fp16 scale and zero per head costs {cheapest:g} bits per element at "
            f"head_dim {head_dim}, above the {recipe.max_avg_bits:g}-bit budget; raise "
            f"max_avg_bits (--max-bits) to at least {cheapest:g}"
        )
    n_fallback = 0
    threshold_sq = recipe.fallback_threshold**2

    # 2. Heads that INT4 cannot serve, worst first.
    bad = sorted(
        ((s.head_err(h, table="err"), i, h) for i, s in enumerate(sides) for h in range(num_heads)),
        reverse=True,
    )
    for err, i, h in bad:
        if err <= threshold_sq or n_fallback >= max_fallback:
            break
        side = sides[i]
        int8_ok = side.head_err(h, bits=8, table="err") <= threshold_sq
        bits = 8 if int8_ok or not recipe.allow_bf16 else 16
        extra = side.head_bits(bits) - side.head_bits(4)
        if used + extra <= budget + 1e-9:
            side.fallback[h] = bits
            used += extra
            n_fallback += 1

    # 3. Spend what is left of the bit budget where it buys the most error per bit.
    wholes = (8, 16) if recipe.allow_bf16 else (8,)
    while True:
        best = None  # (gain per bit, extra bits, apply)

        def consider(gain: float, extra: float, what: tuple) -> None:
            nonlocal best
            if gain > 0 and extra > 0 and used + extra <= budget + 1e-9:
                cand = (gain / extra, extra, what)
                best = cand if best is None or cand[0] > best[0] else best

        for side in sides:
            now = side.total_err()
            if side.whole is None:
                for opt in range(side.opt + 1, len(side.options)):
                    consider(now - side.total_err(opt), side.cost(opt) - side.cost(),
                             ("group", side, opt))  # fmt: skip
                # The whole side to INT8/BF16: its heads count as fallbacks too.
                new = num_heads - len(side.fallback)
                for bits in wholes:
                    if n_fallback + new <= max_fallback:
                        gain = now - side.total_err(whole=bits)
                        consider(gain, side.cost(whole=bits) - side.cost(), ("whole", side, bits))
            elif side.whole == 8 and 16 in wholes:
                consider(now - side.total_err(whole=16),
                         side.cost(whole=16) - side.cost(), ("whole", side, 16))  # fmt: skip
            if side.whole is not None:
                continue
            for h in range(num_heads):
                cur = side.fallback.get(h, 4)
                steps = [b for b in (8, 16) if b > cur and (b == 8 or recipe.allow_bf16)]
                if cur == 4 and n_fallback >= max_fallback:
                    steps = []
                for bits in steps:
                    extra = side.head_bits(bits) - side.head_bits(cur)
                    gain = (side.head_err(h) - side.head_err(h, bits=bits)) / num_heads
                    consider(gain, extra, ("head", side, (h, bits)))
        if best is None:
            break
        _, extra, (kind, side, what) = best
        if kind == "group":
            side.opt = what
        elif kind == "whole":
            if side.whole is None:
                n_fallback += num_heads - len(side.fallback)
            side.whole = what
        else:
            h, bits = what
            n_fallback += side.fallback.get(h, 4) == 4
            side.fallback[h] = bits
        used = sum(s.cost() for s in sides)

    choices = [s.choice() for s in sides]
    return [{"k": choices[2 * i], "v": choices[2 * i + 1]} for i in range(len(attn_err))]
