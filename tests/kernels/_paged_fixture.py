"""Shared fixtures of the attention-kernel tests: a paged quantized cache (the shared builder,
with the kernels' test parameters), and NaN poisoning of every float buffer a kernel launcher
allocates, and the tolerance rule."""

from __future__ import annotations

import torch
from _builders import paged_cache

from sawquant.config import SideConfig
from sawquant.quant import rotate, unrotate
from sawquant.quant.attention import gather_heads
from sawquant.quant.transforms import per_query_head, restore


def build_cache(
    *,
    lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    block: int,
    k_bits: tuple[int, ...] | None = None,
    v_bits: tuple[int, ...] | None = None,
    group_size: int | tuple[int | None, int | None] | None = None,
    transforms: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
):
    """K and V stores holding ``lens[b]`` random tokens per sequence, and the block table.

    K uses random signs on top of the block rotation, V the plain block rotation, so both
    rotation paths (and their inverses) are exercised; ``k_bits``/``v_bits`` give each KV
    head's precision (4 by default); ``transforms``: random centering and smoothing on both
    sides (config version 2); ``group_size``: both sides', or a (K, V) pair.
    """
    groups = group_size if isinstance(group_size, tuple) else (group_size, group_size)
    gen = torch.Generator().manual_seed(seed + 99)

    def rows(low: float, high: float):
        t = torch.rand(num_kv_heads, head_dim, generator=gen) * (high - low) + low
        return t.tolist()

    def side(bits, signs, group_size):
        fallback = {h: b for h, b in enumerate(bits or ()) if b != 4}
        extra = dict(center=rows(-2.0, 2.0), smooth=rows(0.5, 2.0)) if transforms else {}
        return SideConfig(
            rotation_block=block, sign_seed=seed + 7 if signs and block > 1 else None,
            group_size=group_size, fallback_heads=fallback, **extra,
        )  # fmt: skip

    return paged_cache(
        lens=lens, k_side=side(k_bits, True, groups[0]), v_side=side(v_bits, False, groups[1]),
        num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size, dtype=dtype,
        seed=seed,
    )  # fmt: skip


def poison_float_allocations(monkeypatch) -> None:
    """Make torch.empty / empty_like return NaN-filled float tensors while the test runs, so an
    element a kernel forgets to write (output or workspace) shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


def check_close(out: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor) -> None:
    """flash-attention's rule: err(kernel) <= 2 * err(torch in the same dtype) + atol, max-abs
    errors against the float32 reference; every element finite. atol is one rounding of the
    largest output to its dtype (both sides round their result once)."""
    assert torch.isfinite(out).all(), "kernel left NaN/Inf in the output"
    atol = torch.finfo(out.dtype).eps * ref.float().abs().max().item()
    err = (out.float() - ref.float()).abs().max().item()
    err_lowp = (lowp.float() - ref.float()).abs().max().item()
    print(f"max err kernel {err:.3e}, torch {lowp.dtype} {err_lowp:.3e}, atol {atol:.1e}")
    assert err <= 2 * err_lowp + atol


def torch_lowp_attention(q, k_store, v_store, table, lens, *, scale, window=None, softcap=None):
    """Plain torch attention in q.dtype on the same dequantized cache (the error yardstick)."""
    dt = q.dtype
    group = q.shape[1] // k_store.num_kv_heads
    keys = gather_heads(k_store, table, lens)
    values = gather_heads(v_store, table, lens)
    qs = restore(q, None, per_query_head(k_store.smooth, q.shape[1]))
    qr = rotate(qs, k_store.block, k_store.signs).to(dt)
    out = []
    for i, n in enumerate(lens.tolist()):
        k = keys[i].to(dt).repeat_interleave(group, 0)  # [H_q, L, D]
        v = values[i].to(dt).repeat_interleave(group, 0)
        s = (qr[i][:, None] @ k.transpose(-1, -2)) * scale  # [H_q, 1, L] in dt
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if window is not None:
            s[..., : max(n - window, 0)] = float("-inf")
        out.append((torch.softmax(s, -1) @ v)[:, 0])
    o = unrotate(torch.stack(out).float(), v_store.block, v_store.signs)
    h_q = q.shape[1]
    return restore(o, per_query_head(v_store.center, h_q), per_query_head(v_store.smooth, h_q)).to(
        dt
    )
