"""The exact per-channel transforms applied before the rotation (config version 2): a cached
vector x of KV head h is stored as ``rotate((x - center[h]) * inv_smooth[h])``.

Keys: the read side multiplies the query by ``smooth`` and ignores ``center`` (q . center is
the same for every key of a query, so the softmax does not change). Values: the attention
output gets ``out * smooth + center`` back (the weights sum to 1). Restoring a cached vector to
the original basis (chunked prefill) is ``x * smooth + center``. Every path takes its
``center`` / ``smooth`` / ``inv_smooth`` from the SideStore, so the twins and the kernels use
the very same float32 values.
"""

from __future__ import annotations

import torch

__all__ = ["per_query_head", "restore", "transform"]


def transform(
    x: torch.Tensor, center: torch.Tensor | None, inv_smooth: torch.Tensor | None
) -> torch.Tensor:
    """(x - center) * inv_smooth in float32; x [..., H, D] and center/inv_smooth [H, D]
    broadcast over the leading dims (same op order as the write kernel)."""
    x = x.float()
    if center is not None:
        x = x - center
    if inv_smooth is not None:
        x = x * inv_smooth
    return x


def restore(
    x: torch.Tensor, center: torch.Tensor | None, smooth: torch.Tensor | None
) -> torch.Tensor:
    """x * smooth + center (the inverse of :func:`transform`, original basis), float32."""
    x = x.float()
    if smooth is not None:
        x = x * smooth
    if center is not None:
        x = x + center
    return x


def per_query_head(t: torch.Tensor | None, num_q_heads: int) -> torch.Tensor | None:
    """A per-KV-head [H_kv, D] tensor repeated for the query heads of each GQA group."""
    if t is None:
        return None
    return t.repeat_interleave(num_q_heads // t.shape[0], dim=0)
