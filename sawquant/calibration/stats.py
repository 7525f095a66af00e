"""Streaming KV statistics: outlier measures and, per candidate quantizer, the error it causes.

Everything is accumulated as per-head sums while the windows stream through the model, so memory
does not grow with the number of tokens: per layer and side a few ``[H]``/``[C, H]`` float64
sums (C candidates) and one ``[H, D]`` channel maximum.

The error that matters is the attention output's, not the cache's: for a sample of the captured
queries we compute ``O = softmax(q K^T * scale) V`` in float32 and, for every candidate,
``O_hat`` with only K (resp. only V) fake-quantized. ``attn_err = sum |O_hat - O|^2 / sum |O|^2``
per KV head (summed over its GQA query heads), a relative squared error (noise-to-signal power).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from sawquant.calibration.capture import AttentionCall
from sawquant.config import SUPPORTED_BLOCKS, SUPPORTED_GROUPS
from sawquant.errors import InputError
from sawquant.quant.hadamard import block_hadamard
from sawquant.quant.transforms import transform

__all__ = [
    "TRANSFORMS",
    "Candidate",
    "SideStats",
    "StatsAccumulator",
    "make_candidates",
]

SIDES = ("k", "v")
# The sampled queries are measured in at most this many position chunks (each attending only to
# the keys its mask allows), of at least MIN_CHUNK_QUERIES positions.
MAX_QUERY_CHUNKS = 4
MIN_CHUNK_QUERIES = 16


@dataclass(frozen=True)
class Candidate:
    """One way to cache a side: precision, rotation block, sign seed, group size, and the
    exact transforms before the rotation (per-channel centering, smoothing)."""

    bits: int = 4
    block: int = 1
    sign_seed: int | None = None
    group_size: int | None = None  # None = head_dim
    center: bool = False
    smooth: bool = False

    @property
    def rotation(self) -> tuple:
        """What candidates share one transformed, rotated copy of the captured tensors."""
        return (self.block, self.sign_seed, self.center, self.smooth)

    def label(self) -> str:
        seed = "" if self.sign_seed is None else f" s{self.sign_seed}"
        group = "" if self.group_size is None else f" g{self.group_size}"
        extra = ("+c" if self.center else "") + ("+m" if self.smooth else "")
        return f"INT{self.bits} b{self.block}{seed}{group}{extra}"

    def to_dict(self) -> dict:
        return asdict(self)


NAIVE = Candidate()
INT8 = Candidate(bits=8)


TRANSFORMS = {"none": (False, False), "center": (True, False), "center+smooth": (True, True),
              "smooth": (False, True)}  # fmt: skip


def make_candidates(
    head_dim: int,
    blocks: list[int] | tuple[int, ...],
    sign_seeds: list[int | None] | tuple[int | None, ...],
    group_sizes: list[int | None] | tuple[int | None, ...],
    transforms: list[str] | tuple[str, ...] = ("none",),
) -> list[Candidate]:
    """INT4 candidates for this head_dim (blocks that divide it), then the INT8 reference.

    Signs without a Hadamard (block 1) only flip signs, so block 1 gets no seeds; a group size
    equal to head_dim is the same as None; ``transforms`` are names of :data:`TRANSFORMS`. The
    first candidate is always naive INT4.
    """
    out = [NAIVE]
    groups = sorted(
        {None if g in (None, head_dim) else g for g in group_sizes}, key=lambda g: -(g or head_dim)
    )
    groups = [g for g in groups if g is None or (g in SUPPORTED_GROUPS and head_dim % g == 0)]
    for group in groups:
        for block in sorted(set(blocks)):
            if block not in SUPPORTED_BLOCKS or head_dim % block or block > head_dim:
                continue
            for seed in dict.fromkeys(sign_seeds):
                if block == 1 and seed is not None:
                    continue
                for name in dict.fromkeys(transforms):
                    cand = Candidate(4, block, seed, group, *TRANSFORMS[name])
                    if cand not in out:
                        out.append(cand)
    out.append(INT8)
    return out


@dataclass
class SideStats:
    """Accumulated sums for one layer and side (K or V); ``H`` KV heads, ``C`` candidates."""

    num_heads: int
    head_dim: int
    num_candidates: int
    count: torch.Tensor = field(init=False)  # [H] elements seen
    moments: torch.Tensor = field(init=False)  # [4, H] sums of x, x^2, x^3, x^4
    absmax: torch.Tensor = field(init=False)  # [H]
    channel_absmax: torch.Tensor = field(init=False)  # [H, D]
    noise: torch.Tensor = field(init=False)  # [C, H] sum |x_hat - x|^2 (cache error)
    attn_noise: torch.Tensor = field(init=False)  # [C, H] sum |O_hat - O|^2
    attn_noise_q: torch.Tensor | None = None  # [C, H_q] the same per query head
    # Transform statistics (the first windows): per channel sum, count, min and max.
    channel_sum: torch.Tensor = field(init=False)  # [H, D]
    channel_count: int = 0
    channel_min: torch.Tensor = field(init=False)  # [H, D]
    channel_max: torch.Tensor = field(init=False)  # [H, D]

    def __post_init__(self) -> None:
        h, d, c = self.num_heads, self.head_dim, self.num_candidates
        f64 = dict(dtype=torch.float64)
        self.count = torch.zeros(h, **f64)
        self.moments = torch.zeros(4, h, **f64)
        self.absmax = torch.zeros(h, **f64)
        self.channel_absmax = torch.zeros(h, d, **f64)
        self.noise = torch.zeros(c, h, **f64)
        self.attn_noise = torch.zeros(c, h, **f64)
        self.channel_sum = torch.zeros(h, d, **f64)
        self.channel_min = torch.full((h, d), float("inf"), **f64)
        self.channel_max = torch.full((h, d), float("-inf"), **f64)

    def observe_channels(self, x: torch.Tensor) -> None:
        """x: [B, H, S, D]: per-channel mean and range, for the centering/smoothing tables."""
        xd = x.double()
        self.channel_sum += xd.sum(dim=(0, 2)).cpu()
        self.channel_count += x.shape[0] * x.shape[2]
        self.channel_min = torch.minimum(self.channel_min, xd.amin(dim=(0, 2)).cpu())
        self.channel_max = torch.maximum(self.channel_max, xd.amax(dim=(0, 2)).cpu())

    def channel_mean(self) -> torch.Tensor:
        """[H, D] float64 mean of each channel over the transform windows."""
        return self.channel_sum / max(self.channel_count, 1)

    def centered_range(self) -> torch.Tensor:
        """[H, D] largest |x - mean| of each channel seen."""
        mean = self.channel_mean()
        return torch.maximum(self.channel_max - mean, mean - self.channel_min)

    def observe(self, x: torch.Tensor) -> None:
        """x: [B, H, S, D] float32 (any device): outlier statistics."""
        xd = x.double()
        h = x.shape[1]
        flat = xd.transpose(0, 1).reshape(h, -1)  # [H, B*S*D]
        self.count += torch.full((h,), flat.shape[1], dtype=torch.float64)
        self.moments += torch.stack([(flat**p).sum(1) for p in (1, 2, 3, 4)]).cpu()
        self.absmax = torch.maximum(self.absmax, flat.abs().amax(1).cpu())
        ch = xd.abs().amax(dim=(0, 2)).cpu()  # [H, D]
        self.channel_absmax = torch.maximum(self.channel_absmax, ch)

    # -- derived statistics --------------------------------------------------------------------
    @property
    def signal(self) -> torch.Tensor:
        """[H] sum of x^2."""
        return self.moments[1]

    def kurtosis(self) -> torch.Tensor:
        """[H] kurtosis of all elements of a head (3 for a Gaussian; outliers make it large)."""
        n = self.count.clamp(min=1)
        m1, m2, m3, m4 = (self.moments[i] / n for i in range(4))
        var = (m2 - m1**2).clamp(min=1e-30)
        c4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
        return c4 / var**2

    def outlier_ratio(self) -> torch.Tensor:
        """[H] largest channel magnitude over the median channel's."""
        med = self.channel_absmax.median(dim=1).values.clamp(min=1e-30)
        return self.channel_absmax.amax(dim=1) / med

    def sqnr_db(self) -> torch.Tensor:
        """[C, H] signal-to-quantization-noise ratio of the cached vectors, in dB."""
        return 10 * torch.log10(self.signal.clamp(min=1e-30) / self.noise.clamp(min=1e-30))


def _smooth_scales(x_range: torch.Tensor, q_range: torch.Tensor | None) -> torch.Tensor:
    """Per-channel smoothing scales [H, D] (float32, > 0) from channel ranges.

    Keys (SmoothQuant's alpha = 0.5): s = sqrt(range_k / range_q), so the stored k / s and the
    multiplied q * s meet in the middle. Values: s = sqrt(range_v), equalising the channels a
    per-token scale shares. Normalised to a geometric mean of 1 per head, and clamped to
    [2**-8, 2**8] so the tables stay well inside fp16 range.
    """
    r = x_range.clamp(min=1e-6)
    s = (r / q_range.clamp(min=1e-6)).sqrt() if q_range is not None else r.sqrt()
    s = s / s.log().mean(dim=-1, keepdim=True).exp()
    return s.clamp(2.0**-8, 2.0**8).float()


class StatsAccumulator:
    """Feed it every :class:`AttentionCall`; it keeps per layer/side :class:`SideStats`.

    ``query_samples`` query positions per window (drawn once per sequence length, seeded) are
    enough to estimate the attention-output error and keep its cost a small fraction of the
    forward pass; 0 uses every position.

    Phases (driven by ``calibrate``): while ``transform_phase`` is set only the per-channel
    statistics are gathered; :meth:`finish_transforms` turns them into the centering and
    smoothing tables the transform candidates use; :meth:`prune` then keeps the most promising
    candidates of each layer side, so the remaining windows measure only those.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        candidates: list[Candidate],
        query_samples: int = 128,
        seed: int = 0,
    ) -> None:
        self.candidates = list(candidates)
        self.query_samples = query_samples
        self.seed = seed
        c = len(self.candidates)
        self.sides = [
            {s: SideStats(num_kv_heads, head_dim, c) for s in SIDES} for _ in range(num_layers)
        ]
        self.attn_signal = torch.zeros(num_layers, num_kv_heads, dtype=torch.float64)  # sum |O|^2
        self.query_count = torch.zeros(num_layers, dtype=torch.float64)  # sampled positions
        # Empirical Fisher of the loss w.r.t. each attention output: sum of (dL/dO)^2 per query
        # head, and the number of elements summed (see observe_output / loss_err).
        self.fisher: torch.Tensor | None = None  # [L, H_q]
        self.fisher_count = torch.zeros(num_layers, dtype=torch.float64)
        self.tokens = 0
        self.head_dim = head_dim
        self._matrices: dict[tuple, torch.Tensor] = {}
        # Which candidates each layer side still measures ([C] bool; all until pruned).
        self.active = [
            {s: torch.ones(c, dtype=torch.bool) for s in SIDES} for _ in range(num_layers)
        ]
        # Per layer side: {"center": [H, D], "smooth": [H, D]} float32 (finish_transforms).
        self.tables: list[dict[str, dict[str, torch.Tensor]]] = [
            {s: {} for s in SIDES} for _ in range(num_layers)
        ]
        self.q_range = torch.zeros(num_layers, num_kv_heads, head_dim, dtype=torch.float64)
        self.transform_phase = any(cand.center or cand.smooth for cand in self.candidates)
        self.softcap = False  # a logit soft-cap makes key centering inexact (never measured)
        # Set while the Fisher backward recomputes checkpointed layers: the recomputed
        # attention calls repeat the forward's and must not be counted twice.
        self.paused = False
        self._calls = 0

    def nbytes(self) -> int:
        """Memory held by the accumulators (what grows with the model, not with the data)."""
        tensors = [self.attn_signal, self.q_range]
        for layer in self.sides:
            for st in layer.values():
                tensors += [st.count, st.moments, st.absmax, st.channel_absmax, st.noise]
                tensors += [st.attn_noise, st.channel_sum, st.channel_min, st.channel_max]
                if st.attn_noise_q is not None:
                    tensors.append(st.attn_noise_q)
        if self.fisher is not None:
            tensors.append(self.fisher)
        return sum(t.numel() * t.element_size() for t in tensors)

    def _query_positions(self, s_q: int, device: torch.device) -> torch.Tensor:
        n = self.query_samples
        if n <= 0 or n >= s_q:
            return torch.arange(s_q, device=device)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._calls)
        pos = torch.randperm(s_q, generator=gen)[:n].sort().values
        return pos.to(device)

    def new_window(self) -> None:
        """Call once per forward pass, so each batch of windows samples fresh query positions."""
        self._calls += 1

    def _rotation(self, block: int, seed: int | None, device: torch.device) -> torch.Tensor | None:
        """The [D, D] rotation matrix (None for the identity), cached per device."""
        if block == 1 and seed is None:
            return None
        key = (block, seed, str(device))
        if key not in self._matrices:
            r = block_hadamard(self.head_dim, block, seed=seed)
            self._matrices[key] = r.to(device)
        return self._matrices[key]

    # -- phases --------------------------------------------------------------------------------
    def finish_transforms(self) -> None:
        """Turn the transform-phase statistics into each layer side's centering and smoothing
        tables, and start measuring candidates."""
        for layer, sides in enumerate(self.sides):
            for side, st in sides.items():
                q_range = self.q_range[layer] if side == "k" else None
                self.tables[layer][side] = {
                    "center": st.channel_mean().float(),
                    "smooth": _smooth_scales(st.centered_range(), q_range),
                }
        self.transform_phase = False

    def prune(self, keep_per_group: int) -> None:
        """Keep, per layer side and group size, the ``keep_per_group`` candidates with the lowest
        mean error so far (naive INT4 and INT8 always stay); the others stop being measured and
        drop out of the selection."""
        for layer, sides in enumerate(self.sides):
            for side in SIDES:
                err = self.attn_err(layer, side).mean(1)  # [C]
                keep = torch.zeros(len(self.candidates), dtype=torch.bool)
                for group in {c.group_size for c in self.candidates}:
                    idx = [i for i, c in enumerate(self.candidates)
                           if c.group_size == group and c.bits == 4]  # fmt: skip
                    best = sorted(idx, key=lambda i: float(err[i]))[:keep_per_group]
                    keep[best] = True
                for fixed in (NAIVE, INT8):
                    if fixed in self.candidates:
                        keep[self.candidates.index(fixed)] = True
                self.active[layer][side] &= keep

    # -- measuring -----------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, call: AttentionCall) -> None:
        if self.paused:
            return
        layer = call.layer_idx
        q = call.query.float()  # [B, H_q, S_q, D]
        k = call.key.float()  # [B, H_kv, S, D]
        v = call.value.float()
        for name, x in (("queries", q), ("keys", k), ("values", v)):
            if not bool(torch.isfinite(x).all()):
                raise InputError(
                    f"layer {layer} produced NaN/Inf {name} on the calibration text; the "
                    "weights or activations are broken (check the checkpoint for NaN weights, "
                    "or load it in float32 or bfloat16 instead of float16)"
                )
        b, h_q, s_q, d = q.shape
        h_kv = k.shape[1]
        g = h_q // h_kv
        self.softcap = self.softcap or bool(call.softcap)
        if self.transform_phase:
            # Channel statistics only: means and ranges of K and V, ranges of each GQA group's
            # queries (key smoothing balances the two).
            self.sides[layer]["k"].observe_channels(k)
            self.sides[layer]["v"].observe_channels(v)
            qg = q.abs().amax(dim=2).reshape(b, h_kv, g, d).amax(dim=(0, 2))  # [H_kv, D]
            self.q_range[layer] = torch.maximum(self.q_range[layer], qg.double().cpu())
            return
        if layer == 0:
            self.tokens += b * s_q
        pos = self._query_positions(s_q, q.device)
        # The sampled query positions in a few contiguous chunks, each attending only to the
        # key range its mask allows (causal: the keys up to its last position; sliding
        # windows: from its first visible key): the masked logits are never computed, about
        # 40 % of the work under a causal mask. Per chunk: the grouped queries
        # [B, H_kv, G*Qc, D] (query head = kv head * G + g), the additive mask, the exact
        # probabilities and output.
        chunks = []
        allowed_all = call.mask[:, pos]  # [B, Q, S]
        per_chunk = max(MIN_CHUNK_QUERIES, -(-len(pos) // MAX_QUERY_CHUNKS))
        for lo in range(0, len(pos), per_chunk):
            allowed = allowed_all[:, lo : lo + per_chunk]
            n = allowed.shape[1]
            cols = allowed.any(dim=(0, 1)).nonzero()
            if cols.numel() == 0:  # every key masked for these queries: nothing to measure
                continue
            k_lo, k_hi = int(cols[0]), int(cols[-1]) + 1
            allowed = allowed[..., k_lo:k_hi]
            qc = q[:, :, pos[lo : lo + n]].reshape(b, h_kv, g * n, d)
            bias = torch.zeros(b, 1, g, n, k_hi - k_lo, device=q.device)
            bias.masked_fill_(~allowed[:, None, None], float("-inf"))
            bias = bias.reshape(b, 1, g * n, k_hi - k_lo)
            p = _probs(qc, k[:, :, k_lo:k_hi], bias, call)
            chunks.append((k_lo, k_hi, n, qc, bias, p, p @ v[:, :, k_lo:k_hi]))
        self.attn_signal[layer] += sum(_head_sum(c[-1].square()) for c in chunks)
        self.query_count[layer] += b * len(pos)
        for side, x in (("k", k), ("v", v)):
            st = self.sides[layer][side]
            st.observe(x)
            tables = self.tables[layer][side]
            active = self.active[layer][side]
            by_rotation: dict[tuple, list[int]] = {}
            for c, cand in enumerate(self.candidates):
                if not active[c]:
                    continue
                if side == "k" and cand.center and self.softcap:
                    active[c] = False  # not exact under a soft-cap: never a choice
                    continue
                by_rotation.setdefault(cand.rotation, []).append(c)
            if st.attn_noise_q is None:
                st.attn_noise_q = torch.zeros(len(self.candidates), h_q, dtype=torch.float64)
            for (block, seed, center, smooth), members in by_rotation.items():
                r = self._rotation(block, seed, x.device)
                c_t = tables["center"].to(x.device)[:, None] if center else None  # [H, 1, D]
                s_t = tables["smooth"].to(x.device)[:, None] if smooth else None
                # Work in the transformed, rotated basis: x~ = ((x - c) / s) R. Keys: q meets
                # them as (q * s) R, and q.c is a per-query constant the softmax ignores;
                # values: the output error is (P (x~_hat - x~)) R^T * s, which equals the error
                # in the rotated basis when there is no smoothing (R is orthonormal).
                xt = transform(x, c_t, None if s_t is None else 1.0 / s_t)
                xr = xt if r is None else xt @ r
                if side == "k":
                    qrs = []
                    for _, _, _, qc, _, _, _ in chunks:
                        qk = qc if s_t is None else qc * s_t
                        qrs.append(qk if r is None else qk @ r)
                for c in members:
                    cand = self.candidates[c]
                    xq = _fake_quant_fast(xr, cand.bits, cand.group_size)
                    err = xq - xr
                    st.noise[c] += _head_sum(err.square())
                    per_q = torch.zeros(h_kv, g, dtype=torch.float64)
                    for i, (k_lo, k_hi, n, _, bias, p, out) in enumerate(chunks):
                        if side == "k":
                            p_hat = _probs(qrs[i], xq[:, :, k_lo:k_hi], bias, call)
                            diff = p_hat @ v[:, :, k_lo:k_hi] - out
                        else:
                            diff = p @ err[:, :, k_lo:k_hi]
                            if s_t is not None:
                                diff = (diff if r is None else diff @ r.T) * s_t
                        # [B, H_kv, G*Qc, D] -> [H_kv, G] per query head
                        sq = diff.square().reshape(b, h_kv, g, -1).sum(dim=(0, 3))
                        per_q += sq.double().cpu()
                    st.attn_noise_q[c] += per_q.reshape(-1)
                    st.attn_noise[c] += per_q.sum(1)

    def observe_output(self, layer: int, out: torch.Tensor) -> None:
        """Register a gradient hook on an attention output [B, S, H_q, D] (Fisher pass)."""
        if self.paused or not out.requires_grad:
            return

        def hook(grad: torch.Tensor) -> None:
            h_q = grad.shape[2]
            if self.fisher is None:
                self.fisher = torch.zeros(len(self.sides), h_q, dtype=torch.float64)
            self.fisher[layer] += grad.float().square().sum(dim=(0, 1, 3)).double().cpu()
            self.fisher_count[layer] += grad.shape[0] * grad.shape[1] * grad.shape[3]

        out.register_hook(hook)

    # -- results -------------------------------------------------------------------------------
    def attn_err(self, layer: int, side: str) -> torch.Tensor:
        """[C, H] relative squared attention-output error of every candidate (inf for the
        candidates pruned or not allowed: they are no choice)."""
        err = self.sides[layer][side].attn_noise / self.attn_signal[layer].clamp(min=1e-30)
        return err.masked_fill(~self.active[layer][side][:, None], float("inf"))

    def loss_err(self, layer: int, side: str) -> torch.Tensor | None:
        """[C, H] expected increase of the loss (nats per token) from each candidate, or None
        before a Fisher pass.

        Second order with a diagonal empirical Fisher per query head: a perturbation dO of the
        attention output raises the summed loss by about 1/2 sum (dL/dO)^2 dO^2, so per token
        ``1/2 * mean(g^2) * mean_positions |dO|^2``, summed over the query heads of a KV head.
        This puts layers and sides in one unit, which the relative error does not.
        """
        st = self.sides[layer][side]
        if self.fisher is None or self.fisher_count[layer] == 0 or st.attn_noise_q is None:
            return None
        w = self.fisher[layer] / self.fisher_count[layer]  # [H_q] mean g^2 per element
        e = st.attn_noise_q / self.query_count[layer].clamp(min=1)  # [C, H_q] per position
        per_q = 0.5 * w * e
        h_kv = st.num_heads
        loss = per_q.view(per_q.shape[0], h_kv, -1).sum(-1)
        return loss.masked_fill(~self.active[layer][side][:, None], float("inf"))


def _probs(
    queries: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, call: AttentionCall
) -> torch.Tensor:
    """softmax(q k^T * scaling (soft-capped) + bias): [B, H, Q, D] x [B, H, S, D] -> [B, H, Q, S].
    Without a soft-cap, one fused multiply-add matmul (baddbmm) writes the masked logits."""
    b, h, n, d = queries.shape
    s = keys.shape[2]
    if call.softcap:
        logits = (queries @ keys.transpose(-1, -2)) * call.scaling
        logits = torch.tanh(logits / call.softcap) * call.softcap
        return (logits + bias).softmax(-1)
    logits = torch.baddbmm(
        bias.expand(b, h, n, s).reshape(b * h, n, s),
        queries.reshape(b * h, n, d),
        keys.reshape(b * h, s, d).transpose(1, 2),
        alpha=call.scaling,
    )
    return logits.softmax(-1).view(b, h, n, s)


def _head_sum(x: torch.Tensor) -> torch.Tensor:
    """[B, H, ...] -> [H] float64 on the CPU (float32 pairwise sums, then exact accumulation)."""
    return x.sum(dim=(0, *range(2, x.dim()))).double().cpu()


def _fake_quant_fast(x: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Quantize-dequantize the last dim, per token (or group): the arithmetic of
    ``sawquant.quant.quantize`` with fp16 scale/zero rounded to nearest instead of directed and
    no input checks. Codes differ from the spec's only where that rounding moves a value across
    a code boundary, which changes an error estimate far less than its sampling noise, at a
    fraction of the cost."""
    d = x.shape[-1]
    g = group_size or d
    levels = float(2**bits - 1)
    xg = x.reshape(*x.shape[:-1], d // g, g)
    zero = xg.amin(-1, keepdim=True).half().float()
    scale = ((xg.amax(-1, keepdim=True) - zero) / levels).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: codes 0
    q = torch.floor((xg - zero) * (1.0 / scale) + 0.5).clamp_(0, levels)
    return (q * scale + zero).reshape(x.shape)
