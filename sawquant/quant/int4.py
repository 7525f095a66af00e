"""Asymmetric min/max integer quantization of the last dim, per vector or per group.

The arithmetic below is the specification; the Triton write kernel performs the same float32
operations in the same order, so codes, scales and zeros match bit for bit:

    lo, hi = min(x), max(x)                       over each group (float32, exact)
    zero   = fp16 rounded DOWN from lo            so zero <= every element
    scale  = fp16 rounded UP from (hi - zero) / L  so (x - zero) / scale <= L   (L = 2**bits - 1)
    inv    = 1 / scale  (0 when scale == 0)       IEEE float32 division
    q      = clamp(floor((x - zero) * inv + 0.5), 0, L)
    x_hat  = q * scale + zero

Directed rounding of the fp16 parameters keeps ``|x - x_hat| <= scale / 2`` element-wise (up to
float32 rounding) even when lo is large next to the range. A constant group has scale 0, every
code 0, and dequantizes to fp16(lo): exact for any fp16/bf16 value in fp16 range.
"""

from __future__ import annotations

import torch

__all__ = [
    "FP16_MAX",
    "dequantize",
    "dequantize_int4",
    "fp16_round_down",
    "fp16_round_up",
    "pack_int4",
    "quantize",
    "quantize_int4",
    "unpack_int4",
]

FP16_MAX = 65504.0


def fp16_round_down(v: torch.Tensor) -> torch.Tensor:
    """Largest fp16 value <= v (v float32, finite, |v| <= FP16_MAX)."""
    h = v.to(torch.float16)
    too_big = h.float() > v
    bits = h.view(torch.int16)
    # One fp16 step toward -inf: positive values lose one unit, negative ones (and -0) gain one;
    # +0 becomes the smallest negative subnormal (bit pattern 0x8001).
    step = torch.where(bits > 0, bits - 1, torch.where(bits == 0, bits - 32767, bits + 1))
    return torch.where(too_big, step, bits).view(torch.float16)


def fp16_round_up(v: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= v (v float32, finite, 0 <= v <= FP16_MAX)."""
    h = v.to(torch.float16)
    too_small = h.float() < v
    bits = h.view(torch.int16)
    return torch.where(too_small, bits + 1, bits).view(torch.float16)


def _groups(x: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    d = x.shape[-1]
    g = d if group_size is None else int(group_size)
    if g <= 0 or d % g:
        raise ValueError(f"group_size {g} does not divide the last dim {d}; use a divisor of it")
    return x.reshape(*x.shape[:-1], d // g, g), g


def quantize(
    x: torch.Tensor, *, bits: int = 4, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the last dim of ``x`` to ``bits`` (4 or 8) unsigned codes, unpacked.

    Returns ``codes`` (uint8, same shape as x), ``scale`` and ``zero`` (fp16, ``[..., D // g]``).
    Raises ValueError on NaN/Inf or values outside the fp16 range (they cannot be stored).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError("input has NaN or Inf values; quantizing them would store NaN")
    if x.numel() and x.abs().max() > FP16_MAX:
        raise ValueError(f"input exceeds the fp16 range (|x| > {FP16_MAX}); scale it down first")
    levels = float(2**bits - 1)
    xg, _ = _groups(x, group_size)
    lo = xg.amin(dim=-1)
    hi = xg.amax(dim=-1)
    zero = fp16_round_down(lo)
    # Tensor / tensor on purpose: torch on CUDA turns division by a Python scalar into a
    # multiply by its reciprocal, which is not the IEEE division the kernels perform.
    scale = fp16_round_up((hi - zero.float()) / torch.full_like(hi, levels))
    s32 = scale.float()
    ones = torch.ones_like(s32)
    inv = torch.where(s32 > 0, ones / torch.where(s32 > 0, s32, ones), 0.0)
    t = (xg - zero.float()[..., None]) * inv[..., None]
    q = torch.floor(t + 0.5).clamp_(0.0, levels).to(torch.uint8)
    return q.reshape(x.shape), scale, zero


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    *,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize` on unpacked codes: ``q * scale + zero`` in float32."""
    qg, _ = _groups(codes.float(), group_size)
    x = qg * scale.float()[..., None] + zero.float()[..., None]
    return x.reshape(codes.shape).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte: element 2j in the low nibble, 2j+1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"last dim {codes.shape[-1]} must be even to pack two codes per byte")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., D // 2]`` uint8 -> ``[..., D]`` codes in 0..15."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_int4(
    x: torch.Tensor, *, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT4 asymmetric quantization of the last dim; see the module docstring.

    Returns ``(codes, scale, zero)``: codes packed ``[..., D // 2]`` uint8 (nibble order in
    ``sawquant.format``), scale and zero ``[..., D // group_size]`` fp16.
    """
    q, scale, zero = quantize(x, bits=4, group_size=group_size)
    return pack_int4(q), scale, zero


def dequantize_int4(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    *,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_int4` (packed codes in, ``[..., D]`` floats out)."""
    return dequantize(unpack_int4(codes), scale, zero, group_size=group_size, dtype=dtype)
