"""The one place that chooses between the fused Triton kernels and their pure-torch twins.

CUDA tensors with triton importable go to ``sawquant.kernels``' Triton launchers; anything else
(CPU, or a GPU box without triton) goes to the ``*_ref`` twin of the same signature, except
decode attention on the CPU, which goes to ``runtime.cpu``'s batched equivalent of the twin (one
set of torch calls per step instead of one per sequence; tested equal to the twin). Kernel
modules are imported on first use, so importing the runtime never imports triton.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from sawquant.format import SideStore

__all__ = ["backend_name", "decode_attention", "prefill_attention", "use_triton", "write_kv"]


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_name(device: torch.device) -> str:
    """What runs for tensors on ``device``: the Triton kernels or the torch twins."""
    if device.type == "cuda" and _triton_available():
        return "Triton kernels (sawquant.kernels)"
    why = "no CUDA device" if device.type != "cuda" else "triton is not installed"
    return f"torch twins (sawquant.quant; {why})"


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a CUDA device and triton can be imported."""
    return t.is_cuda and _triton_available()


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    *,
    flag: torch.Tensor | None = None,
    flag_value: int = 1,
) -> None:
    """Rotate, quantize and write T new tokens. k, v: [T, H_kv, D]; slot_mapping: [T] int64.

    Values that cannot be stored raise NonFiniteKVError in the twin; the kernel sets
    ``flag[0] = flag_value`` instead (the caller checks it once per step)."""
    from sawquant.kernels import write

    fn = write.rotate_quantize_paged if use_triton(k) else write.rotate_quantize_paged_ref
    fn(k, v, slot_mapping, k_store, v_store, flag=flag, flag_value=flag_value)


def decode_attention(
    q: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    """One query token per sequence over the paged cache. q: [B, H_q, D] -> [B, H_q, D]."""
    if use_triton(q):
        from sawquant.kernels.decode import paged_decode_attention as fn
    elif q.device.type == "cpu":
        from sawquant.runtime.cpu import paged_decode_attention_cpu as fn
    else:
        from sawquant.kernels.decode import paged_decode_attention_ref as fn
    return fn(q, k_store, v_store, block_table, seq_lens, **kwargs)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    block_table: torch.Tensor,
    cached_lens: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    """A chunk over its own K/V plus the cached prefix. q: [B, H_q, T, D] -> [B, H_q, T, D]."""
    from sawquant.kernels import prefill

    fn = prefill.paged_prefill_attention if use_triton(q) else prefill.paged_prefill_attention_ref
    return fn(q, k, v, k_store, v_store, block_table, cached_lens, **kwargs)
