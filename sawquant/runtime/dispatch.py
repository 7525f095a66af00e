"""The one place that chooses between the fused Triton kernels and their pure-torch twins.

CUDA tensors with triton importable go to ``sawquant.kernels``' launchers, with the layer's
plan; anything else (CPU, or a GPU box without triton) goes to the twin in ``sawquant.quant``,
which needs no triton at all (so macOS and Windows run the runtime). Kernel modules are
imported on first use only.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch

from sawquant.quant.decode import paged_decode_attention_ref
from sawquant.quant.prefill import paged_prefill_attention_ref, paged_prefill_attention_stored_ref
from sawquant.quant.write import rotate_quantize_paged_ref
from sawquant.runtime.layer import LayerKV

__all__ = [
    "backend_name",
    "decode_attention",
    "prefill_attention",
    "prefill_attention_stored",
    "use_triton",
    "write_kv",
]


@functools.cache
def _triton_available() -> bool:
    # find_spec, not an import: nothing outside sawquant.kernels imports triton, and where it
    # is blocked or missing (macOS, Windows) the twins run.
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None
        return False


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
    layer: LayerKV,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    flag: torch.Tensor | None = None,
    flag_value: int = 1,
) -> None:
    """Rotate, quantize and write T new tokens. k, v: [T, H_kv, D]; slot_mapping: [T] int64.

    Values that cannot be stored raise NonFiniteKVError in the twin; the kernel sets
    ``flag[0] = flag_value`` instead (the caller checks it once per step)."""
    if use_triton(k):
        from sawquant.kernels.write import rotate_quantize_paged as fn
    else:
        fn = rotate_quantize_paged_ref
    fn(k, v, slot_mapping, layer.k, layer.v, flag=flag, flag_value=flag_value)


def _attention(
    kind: str, twin, q: torch.Tensor, layer: LayerKV, args: tuple, kwargs: dict, suffix: str = ""
):
    """Run ``kind`` ("decode" / "prefill") on the kernel with the layer's plan, or the twin."""
    if use_triton(q):
        import importlib

        module = importlib.import_module(f"sawquant.kernels.{kind}")
        fn = getattr(module, f"paged_{kind}_attention{suffix}")
        return fn(*args, plan=layer.plan(kind), **kwargs)
    return twin(*args, **kwargs)


def decode_attention(
    q: torch.Tensor,
    layer: LayerKV,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    """One query token per sequence over the paged cache. q: [B, H_q, D] -> [B, H_q, D]."""
    args = (q, layer.k, layer.v, block_table, seq_lens)
    return _attention("decode", paged_decode_attention_ref, q, layer, args, kwargs)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: LayerKV,
    block_table: torch.Tensor,
    cached_lens: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    """A chunk over its own K/V plus the cached prefix. q: [B, H_q, T, D] -> [B, H_q, T, D]."""
    args = (q, k, v, layer.k, layer.v, block_table, cached_lens)
    return _attention("prefill", paged_prefill_attention_ref, q, layer, args, kwargs)


def prefill_attention_stored(
    q: torch.Tensor,
    layer: LayerKV,
    block_table: torch.Tensor,
    cached_lens: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    """A chunk already written to the pages (positions [cached_lens, cached_lens + T) of each
    sequence), attending to prefix and chunk as stored. q: [B, H_q, T, D] -> [B, H_q, T, D]."""
    args = (q, layer.k, layer.v, block_table, cached_lens)
    twin = paged_prefill_attention_stored_ref
    return _attention("prefill", twin, q, layer, args, kwargs, suffix="_stored")
