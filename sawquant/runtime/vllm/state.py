"""What the vLLM adapter knows about the checkpoint being served, found from vLLM's config.

One :class:`ServingState` per process and model: the checkpoint's KV config (read through
``sawquant.checkpoint``, as every other consumer reads it), this tensor-parallel rank's part of
it, the per-layer block layouts, and the flag the Triton writer raises for values it cannot
store. No vLLM import at module level.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from sawquant.config import KVConfig
from sawquant.errors import NonFiniteKVError, SawquantError
from sawquant.runtime.blocks import BlockLayout
from sawquant.runtime.sharding import local_config

__all__ = ["ServingState", "is_sawquant", "layer_index", "serving_state"]


def is_sawquant(vllm_config: Any) -> bool:
    """True when the model vLLM serves carries a sawquant KV config in its config.json."""
    model_config = getattr(vllm_config, "model_config", None)
    hf = getattr(model_config, "hf_config", None)
    entry = getattr(hf, "kv_cache_quantization", None)
    return isinstance(entry, dict) and entry.get("method") == "sawquant"


def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def _tp() -> tuple[int, int]:
    """(size, rank) of tensor parallelism in this process ((1, 0) before it is set up)."""
    try:
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    except Exception:  # noqa: BLE001 - the front-end process has no model-parallel group
        return 1, 0


@dataclass
class ServingState:
    config: KVConfig  # the checkpoint's, all KV heads
    local: KVConfig  # this rank's KV heads
    dtype: torch.dtype  # the model dtype (16-bit pools)
    # Layer calls sawquant served in this process (write, decode rows, prefill requests): what a
    # test counts to prove the INT4 path really ran.
    calls: dict[str, int] = field(default_factory=lambda: {"write": 0, "decode": 0, "prefill": 0})
    # Layers whose K/V writes are being kept (runtime.vllm.inspect): layer -> [(k, v, slots)].
    recording: dict[int, list] = field(default_factory=dict)
    _layouts: dict[tuple[int, int], BlockLayout] = field(default_factory=dict)
    _flags: dict[str, torch.Tensor] = field(default_factory=dict)

    def layout(self, layer: int, block_size: int) -> BlockLayout:
        key = (layer, block_size)
        if key not in self._layouts:
            self._layouts[key] = BlockLayout.build(
                self.local.layers[layer], self.local.model, block_size=block_size,
                dtype=self.dtype, values_folded=self.local.values_folded,
            )  # fmt: skip
        return self._layouts[key]

    def flag(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._flags:
            self._flags[key] = torch.zeros(1, dtype=torch.int32, device=device)
        return self._flags[key]

    def check_flag(self, device: torch.device) -> None:
        flag = self.flag(device)
        layer = int(flag[0])
        if layer:
            flag.zero_()
            raise NonFiniteKVError(
                f"sawquant: layer {layer - 1} produced NaN/Inf keys or values, which the cache "
                "does not store; serve the model in bfloat16 (or float32) rather than float16"
            )

    def bytes_per_token(self, block_size: int) -> list[int]:
        """What vLLM allocates per token for each layer, K and V together."""
        return [self.layout(i, block_size).bytes_per_token for i in range(len(self.local.layers))]


@functools.lru_cache(maxsize=8)
def _load(model: str, revision: str | None, dtype: torch.dtype, tp: tuple[int, int]):
    from sawquant.checkpoint import read_kv_config

    hub = {"revision": revision} if revision else {}
    config = read_kv_config(model, **hub)
    if config is None:
        raise SawquantError(f"{model} says kv_cache_quantization but has no sawquant config")
    return ServingState(config=config, local=local_config(config, *tp), dtype=dtype)


def serving_state(vllm_config: Any) -> ServingState:
    """The state of the sawquant checkpoint ``vllm_config`` serves (cached per process)."""
    mc = vllm_config.model_config
    return _load(str(mc.model), getattr(mc, "revision", None), mc.dtype, _tp())
