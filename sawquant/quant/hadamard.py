"""Block-diagonal Hadamard rotation: the matrix (for tests and weight folding) and the
fast Walsh-Hadamard butterfly (the specification the Triton kernels reproduce bit for bit).

The rotation of a row vector x of length head_dim is ``x' = x @ R`` with
``R = diag(signs) @ blockdiag(H_b, ..., H_b)``, H_b the orthonormal Sylvester Hadamard
(symmetric, ``H_b @ H_b.T = I``) and ``signs`` all +1, or fixed random +-1 drawn from ``seed``.
R is orthonormal, so rotating both q and k preserves q.k, and ``x = x' @ R.T``.
"""

from __future__ import annotations

import math

import torch

from sawquant.config import SUPPORTED_BLOCKS, check_block

__all__ = [
    "SUPPORTED_BLOCKS",
    "block_hadamard",
    "check_block",
    "hadamard_scale",
    "random_signs",
    "rotate",
    "unrotate",
]


def hadamard_scale(block: int) -> float:
    """The float32 normalisation 1/sqrt(block) used by both the reference and the kernels."""
    # Rounded once to float32 so that torch and Triton multiply by the very same constant.
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32))


def random_signs(head_dim: int, seed: int) -> torch.Tensor:
    """Fixed random +-1 signs of length head_dim (float32, CPU), reproducible from ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    bits = torch.randint(0, 2, (head_dim,), generator=gen, dtype=torch.int64)
    return (bits * 2 - 1).to(torch.float32)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def block_hadamard(
    head_dim: int, block: int, *, seed: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The rotation matrix R ([head_dim, head_dim]) such that a row vector rotates as ``x @ R``.

    ``R = diag(signs) @ blockdiag(H_b / sqrt(b), ...)``; orthonormal. Block 1 is the identity
    (times the signs when ``seed`` is given). Generated, never stored as a table.
    """
    check_block(head_dim, block)
    hb = _sylvester(block) / math.sqrt(block)
    r = torch.block_diag(*([hb] * (head_dim // block)))
    if seed is not None:
        r = random_signs(head_dim, seed).to(torch.float64)[:, None] * r
    return r.to(dtype)


def _butterfly(x: torch.Tensor, block: int) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of each length-``block`` chunk of the last dim.

    Stage h pairs element i with i+h inside aligned groups of 2h: (a, c) -> (a + c, a - c).
    Pure additions in float32, so any implementation doing the same stages in the same order
    (the Triton kernels do) gets the same bits.
    """
    shape = x.shape
    d = shape[-1]
    h = 1
    while h < block:
        y = x.reshape(*shape[:-1], d // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + c, a - c), dim=-2).reshape(shape)
        h *= 2
    return x


def rotate(x: torch.Tensor, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the last dim of ``x``: ``x @ R`` computed in float32 by the butterfly.

    Equivalent to ``x.float() @ block_hadamard(D, block, seed=...)`` up to float32 rounding;
    bit-exact with the kernels. ``signs`` is ``random_signs(D, seed)`` or None. Returns float32.
    """
    x = x.float()
    if signs is not None:
        x = x * signs.to(x.device)
    if block == 1:
        return x
    return _butterfly(x, block) * hadamard_scale(block)


def unrotate(x: torch.Tensor, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`rotate`: ``x @ R.T`` (H_b is symmetric, so butterfly then signs)."""
    x = x.float()
    if block != 1:
        x = _butterfly(x, block) * hadamard_scale(block)
    if signs is not None:
        x = x * signs.to(x.device)
    return x
