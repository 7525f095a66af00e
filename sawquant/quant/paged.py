"""Paged-cache reference: quantize tokens into page slots, and gather sequences back.

This is the specification of the fused write kernel and of every paged read; layout in
``sawquant.format``.
"""

from __future__ import annotations

import torch

from sawquant.format import Pool
from sawquant.quant.hadamard import rotate
from sawquant.quant.int4 import dequantize, pack_int4, quantize, unpack_int4

__all__ = ["paged_gather_ref", "paged_write_ref", "slots_for"]


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
