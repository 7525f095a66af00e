"""Paged-cache reference: quantize tokens into page slots, and gather sequences back.

This is the specification of the fused write kernel and of every paged read; layout in
``sawquant.format``.
"""

from __future__ import annotations

import torch

from sawquant.errors import NonFiniteKVError
from sawquant.format import Pool
from sawquant.quant.hadamard import rotate
from sawquant.quant.int4 import FP16_MAX, dequantize, pack_int4, quantize, unpack_int4

__all__ = ["check_storable", "paged_gather_ref", "paged_write_ref", "slots_for", "storable_limit"]


def storable_limit(bits: int, dtype: torch.dtype) -> float:
    """The largest magnitude a pool stores: the fp16 range for INT4/INT8 (their fp16 scale and
    zero), the storage dtype's finite range for a 16-bit pool."""
    return FP16_MAX if bits != 16 else float(torch.finfo(dtype).max)


def check_storable(xr: torch.Tensor, bits: int, dtype: torch.dtype) -> None:
    """Raise NonFiniteKVError unless every rotated value fits the pool (the one policy of every
    write path: the twins raise here, the Triton writer flags it for the runtime to raise)."""
    limit = storable_limit(bits, dtype)
    bad = ~(xr.abs() <= limit)  # NaN compares False: counted as bad
    if bool(bad.any()):
        raise NonFiniteKVError(
            f"{int(bad.sum())} key/value element(s) are NaN/Inf or beyond {limit:.4g}, which the "
            "cache cannot store; the model's activations overflowed (load it in bfloat16 or "
            "float32 rather than float16, or check the weights for NaN)"
        )


def slots_for(block_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Slot numbers (int64) of token ``positions[b]`` of each sequence b.

    block_table: [B, max_pages] int32; positions: [B] or [B, T] int64 -> same shape as positions.
    """
    pos = positions.long()
    rows = torch.arange(block_table.shape[0], device=pos.device).view(-1, *([1] * (pos.dim() - 1)))
    pages = block_table.long()[rows.expand_as(pos), pos // page_size]
    return pages * page_size + pos % page_size


def paged_write_ref(
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    pool: Pool,
    *,
    block: int = 1,
    signs: torch.Tensor | None = None,
) -> None:
    """Rotate, quantize and store tokens into their slots, in place.

    x: [T, H, D] new tokens for the pool's H heads (any float dtype); slot_mapping: [T] int64,
    -1 skips a token. INT4/INT8 pools store rotated, quantized codes; a 16-bit pool stores the
    rotated vectors in its dtype.
    """
    spec = pool.spec
    keep = slot_mapping >= 0
    x, slots = x[keep], slot_mapping[keep].long()
    page, off = slots // spec.page_size, slots % spec.page_size
    xr = rotate(x, block, signs)  # [T, H, D] float32
    check_storable(xr, spec.bits, pool.codes.dtype)
    if spec.bits == 16:
        pool.codes[page, :, off] = xr.to(pool.codes.dtype)
        return
    q, scale, zero = quantize(xr, bits=spec.bits, group_size=spec.group_size)
    pool.codes[page, :, off] = pack_int4(q) if spec.bits == 4 else q
    pool.scale[page, :, off] = scale
    pool.zero[page, :, off] = zero


def paged_gather_ref(
    pool: Pool, block_table: torch.Tensor, seq_lens: torch.Tensor
) -> list[torch.Tensor]:
    """Dequantize every sequence's tokens back, in order (still in the rotated basis).

    block_table: [B, max_pages] int32; seq_lens: [B]. Returns B float32 tensors [H, L_b, D].
    """
    spec = pool.spec
    out = []
    for b, length in enumerate(seq_lens.tolist()):
        pos = torch.arange(length, device=block_table.device)
        page = block_table[b].long()[pos // spec.page_size]
        off = pos % spec.page_size
        codes = pool.codes[page, :, off].transpose(0, 1)  # [H, L, D or D/2]
        if spec.bits == 16:
            out.append(codes.float())
            continue
        q = unpack_int4(codes) if spec.bits == 4 else codes
        scale = pool.scale[page, :, off].transpose(0, 1)
        zero = pool.zero[page, :, off].transpose(0, 1)
        out.append(dequantize(q, scale, zero, group_size=spec.group_size))
    return out
