"""Triton helpers shared by the attention kernels (decode and chunked prefill)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["rotate_rows"]


@triton.jit
def rotate_rows(x, M, scale, rows_off, cols_off, mask):
    """(x @ M[rows, cols]) * scale in ~float32 precision on the fp16 tensor cores.

    M holds +-1 entries (exact in fp16); x is split as x_hi + x_lo, both fp16, so the two
    fp32-accumulated dots lose only ~2**-22 relative (|x| must stay under the fp16 maximum).
    """
    m = tl.load(M + rows_off[:, None] + cols_off[None, :], mask=mask, other=0.0)
    x_hi = x.to(tl.float16)
    x_lo = (x - x_hi.to(tl.float32)).to(tl.float16)
    return (tl.dot(x_hi, m) + tl.dot(x_lo, m)) * scale
