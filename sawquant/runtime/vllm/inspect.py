"""Worker-side inspection the plugin adds to vLLM's workers, called by name through
``LLM.collective_rpc`` (no pickled code crosses processes):

- ``sawquant_calls()``: the layer calls sawquant served in this worker (the proof its INT4 path
  ran; all zero when the model is not served by sawquant);
- ``sawquant_record(layer)``: from now on keep a copy of every K/V write of that layer (keys,
  values, slots) and return the layer's cache bytes as they are now;
- ``sawquant_recorded(layer)``: the writes kept since, and the layer's cache bytes now.

Tensors travel as bytes (:func:`decode_tensor` turns them back).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "WORKER_METHODS",
    "decode_tensor",
    "sawquant_calls",
    "sawquant_record",
    "sawquant_recorded",
]

WORKER_METHODS = ("sawquant_calls", "sawquant_record", "sawquant_recorded")


def _encode(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as plain bytes (vLLM's RPC serializer turns tensors into nested lists)."""
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "data": raw.numpy().tobytes()}  # fmt: skip


def decode_tensor(item: dict[str, Any]) -> torch.Tensor:
    """The tensor ``_encode`` sent (in the caller's process)."""
    dtype = getattr(torch, item["dtype"])
    flat = torch.frombuffer(bytearray(item["data"]), dtype=torch.uint8)
    return flat.view(dtype).reshape(item["shape"]).clone()


def _impls(worker) -> list[tuple[str, Any, Any]]:
    """(layer name, sawquant impl, attention module) of every layer sawquant serves."""
    from sawquant.runtime.vllm.backend import SawquantAttentionImpl

    found = []
    for module in worker.model_runner.model.modules():
        impl = getattr(module, "impl", None)
        if isinstance(impl, SawquantAttentionImpl):
            found.append((module.layer_name, impl, module))
    return found


def _layer(worker, layer: int):
    from sawquant.runtime.vllm.state import layer_index

    for name, impl, module in _impls(worker):
        if layer_index(name) == layer:
            return impl, module
    raise ValueError(f"sawquant serves no layer {layer} in this worker")


def _cache_bytes(module) -> dict[str, Any]:
    kv = module.kv_cache
    return _encode(kv.reshape(kv.shape[0], -1).view(torch.uint8))


def sawquant_calls(worker) -> dict[str, int]:
    impls = _impls(worker)
    if not impls:
        return {"write": 0, "decode": 0, "prefill": 0}
    return dict(impls[0][1].state.calls)


def sawquant_record(worker, layer: int) -> dict[str, Any]:
    impl, module = _layer(worker, layer)
    impl.state.recording[layer] = []
    return {"cache": _cache_bytes(module)}


def sawquant_recorded(worker, layer: int) -> dict[str, Any]:
    impl, module = _layer(worker, layer)
    writes = impl.state.recording.pop(layer, [])
    return {
        "keys": [_encode(w[0]) for w in writes],
        "values": [_encode(w[1]) for w in writes],
        "slots": [_encode(w[2]) for w in writes],
        "cache": _cache_bytes(module),
    }
