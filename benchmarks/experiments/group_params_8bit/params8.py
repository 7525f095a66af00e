"""8-bit INT4 group-parameter encodings (scratch, sawquant exp8).

All encodings quantize the last dim of x per group exactly like sawquant.quant.int4.quantize
except for how scale/zero are stored. Counters of saturation/underflow go to STATS.
"""

from __future__ import annotations

import collections

import torch

import sawquant.simulate as sim
from sawquant.quant.int4 import dequantize, quantize

STATS: dict = collections.defaultdict(float)

# ---- value tables ---------------------------------------------------------------------------
_b = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
E4M3 = torch.unique(_b[~_b.isnan()])  # sorted, 253 values (+-0 merged), max 448
E4M3_MIN_NORMAL = 2.0**-6


def ue4m4_table(bias: int = 11) -> torch.Tensor:
    """Unsigned float, 4 exponent + 4 mantissa bits (no sign bit: a scale is >= 0)."""
    vals = [m / 16 * 2.0 ** (1 - bias) for m in range(16)]
    vals += [(1 + m / 16) * 2.0 ** (e - bias) for e in range(1, 16) for m in range(16)]
    return torch.tensor(sorted(set(vals)), dtype=torch.float32)


UE4M4 = ue4m4_table(11)  # max 31.0, min normal 2^-10, min subnormal 2^-14
_h = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
FP16POS = torch.unique(_h)  # every finite fp16 >= 0 (control: integer zero with an fp16 scale)


def round_up(v: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest table value >= v (saturates at the max); returns (value, saturated mask)."""
    idx = torch.searchsorted(table, v.contiguous(), side="left")
    sat = idx >= table.numel()
    return table[idx.clamp(max=table.numel() - 1)], sat


def round_down(v: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest table value <= v (saturates at the min)."""
    idx = torch.searchsorted(table, v.contiguous(), side="right") - 1
    sat = idx < 0
    return table[idx.clamp(min=0)], sat


def _groups(x, g):
    d = x.shape[-1]
    g = d if g is None else g
    return x.reshape(*x.shape[:-1], d // g, g)


def _count(name, mask):
    STATS[name] += float(mask.sum())


def rt_fp8_directed(x: torch.Tensor, group_size) -> torch.Tensor:
    """Encoding 1: zero = e4m3 rounded DOWN from lo, scale = e4m3 rounded UP from
    (hi - zero)/15; same codes/clamp as the fp16 spec."""
    xg = _groups(x.float(), group_size)
    lo, hi = xg.amin(-1), xg.amax(-1)
    zero, zsat = round_down(lo, E4M3)
    scale, ssat = round_up((hi - zero) / 15.0, E4M3)
    n = lo.numel()
    STATS["groups"] += n
    _count("zero_saturated", zsat)
    _count("scale_saturated", ssat)
    _count("scale_subnormal", (scale < E4M3_MIN_NORMAL) & (scale > 0))
    _count("zero_subnormal_nonzero", (zero.abs() < E4M3_MIN_NORMAL) & (lo != 0))
    _count("scale_zero", scale == 0)
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)
    q = torch.floor((xg - zero[..., None]) * inv[..., None] + 0.5).clamp(0, 15)
    out = q * scale[..., None] + zero[..., None]
    _err(xg, out, lo, hi)
    return out.reshape(x.shape)


def make_rt_intzero(table: torch.Tensor, name: str, f: float = 1.0):
    """Encoding 2: scale = 8-bit float (table) rounded UP from (hi-lo)/15; int8 zero code
    z = round(-lo/scale) clamped to [-128,127]; q = clamp(round(x/scale) + z, 0, 15);
    x_hat = scale * (q - z)."""
    min_normal = 2.0**-6 if table is E4M3 else 2.0**-10 if table is UE4M4 else 2.0**-14

    def rt(x: torch.Tensor, group_size) -> torch.Tensor:
        xg = _groups(x.float(), group_size)
        lo, hi = xg.amin(-1), xg.amax(-1)
        scale, ssat = round_up((hi - lo) / 15.0 * f, table)
        STATS["groups"] += lo.numel()
        _count("scale_saturated", ssat)
        _count("scale_subnormal", (scale < min_normal) & (scale > 0))
        _count("scale_zero", scale == 0)
        safe = torch.where(scale > 0, scale, 1.0)
        zf = torch.round(-lo / safe)
        _count("zero_code_clamped", (zf < -128) | (zf > 127))
        z = zf.clamp(-128, 127)
        q = (torch.round(xg / safe[..., None]) + z[..., None]).clamp(0, 15)
        out = torch.where(scale[..., None] > 0, safe[..., None] * (q - z[..., None]), 0.0)
        # constant group (scale 0): code 0, value = lo would need a float zero; count it
        _count("const_group_lost", (scale == 0) & (lo != 0))
        _err(xg, out, lo, hi)
        return out.reshape(x.shape)

    rt.__name__ = name
    return rt


def rt_fp16(x: torch.Tensor, group_size) -> torch.Tensor:
    """Today's spec (fp16 directed), with the same error counters."""
    q, scale, zero = quantize(x, bits=4, group_size=group_size)
    out = dequantize(q, scale, zero, group_size=group_size)
    xg = _groups(x.float(), group_size)
    STATS["groups"] += xg.shape[:-1].numel()
    _err(xg, _groups(out, group_size), xg.amin(-1), xg.amax(-1))
    return out


def _err(xg, out, lo, hi):
    e = (out - xg).float()
    STATS["sq_err"] += float((e * e).sum())
    STATS["sq_x"] += float((xg * xg).sum())
    # error relative to the ideal (unrounded-parameter) step (hi-lo)/15: mean |e|/step
    step = ((hi - lo) / 15.0)[..., None]
    STATS["sq_err_over_ideal_step2"] += float(
        (torch.where(step > 0, e / torch.where(step > 0, step, 1.0), 0.0) ** 2).sum()
    )
    STATS["elems"] += e.numel()


def make_rt_fp16_jitter(f: float):
    """Noise-floor control: today's fp16 directed spec but the scale is rounded up from
    f * (hi - zero)/15 (f slightly > 1): an equally valid quantizer (MSE +~2(f-1)), whose codes
    differ from the spec's wherever an element sits near a decision boundary."""
    from sawquant.quant.int4 import fp16_round_down, fp16_round_up

    def rt(x, group_size):
        xg = _groups(x.float(), group_size)
        lo, hi = xg.amin(-1), xg.amax(-1)
        zero = fp16_round_down(lo).float()
        scale = fp16_round_up((hi - zero) / 15.0 * f).float()
        inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)
        q = torch.floor((xg - zero[..., None]) * inv[..., None] + 0.5).clamp(0, 15)
        out = q * scale[..., None] + zero[..., None]
        STATS["groups"] += lo.numel()
        _err(xg, out, lo, hi)
        return out.reshape(x.shape)

    return rt


ENCODINGS = {
    "fp16j1": make_rt_fp16_jitter(1.003),
    "fp16j2": make_rt_fp16_jitter(1.01),
    "fp16j3": make_rt_fp16_jitter(1.02),
    "fp8dir": rt_fp8_directed,
    "e4m3int": make_rt_intzero(E4M3, "e4m3int"),
    "ue4m4int": make_rt_intzero(UE4M4, "ue4m4int"),
    "fp16": rt_fp16,
    "fp16int": make_rt_intzero(FP16POS, "fp16int"),
    "e4m3intj2": make_rt_intzero(E4M3, "e4m3intj2", 1.01),  # noise-floor controls
    "e4m3intj3": make_rt_intzero(E4M3, "e4m3intj3", 1.02),  # 16+8 bits/group: isolates the int zero
}

_orig = sim._round_trip


def install(encoding: str | None, groups: set):
    """INT4 groups whose group_size is in ``groups`` (None = per token) use ``encoding``;
    everything else (INT8/BF16 heads, other INT4 sides) keeps the project's fp16 path."""
    rt = ENCODINGS[encoding] if encoding else None

    def patched(x, bits, group_size):
        if rt is not None and bits == 4 and group_size in groups:
            return rt(x, group_size)
        return _orig(x, bits, group_size)

    sim._round_trip = patched
