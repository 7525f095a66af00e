"""The hooks the plugin installs in vLLM (every process, before any model is built).

Three wraps, each a no-op for a checkpoint without a sawquant config:

- the platform's ``check_and_update_config`` (runs in the front end, inside ``LLM(...)`` / ``vllm
  serve``, before any engine process starts) checks that the config fits the model and the
  engine options, and refuses with one line otherwise; it then logs what is served: bits, bytes
  per token, and tokens per GiB against a BF16 and an FP8 cache;
- the platform's ``get_attn_backend_cls`` returns sawquant's backend (vLLM's own choice on the
  CPU ignores ``--attention-backend``, so the platform is where a backend is chosen);
- ``Attention.get_kv_cache_spec`` declares each layer's pages as opaque bytes of that layer's
  own size (a fallback layer costs more; vLLM accepts different page sizes per layer).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from sawquant.runtime.vllm.state import is_sawquant, layer_index, serving_state

__all__ = ["BACKEND_PATH", "capacity_line", "install", "validate"]

BACKEND_PATH = "sawquant.runtime.vllm.backend.SawquantAttentionBackend"
_MARK = "_sawquant_wrapped"
logger = logging.getLogger("vllm.sawquant")


def _platform_class():
    from vllm.platforms import current_platform

    return type(current_platform)


def validate(vllm_config: Any) -> None:
    """Raise ValueError("sawquant: ...") when the checkpoint's KV config cannot be served as
    vLLM is configured (pydantic turns it into one line of the start-up error)."""
    from sawquant.architectures import check_exact_for, model_facts
    from sawquant.errors import SawquantError
    from sawquant.runtime.sharding import local_heads

    mc, cc = vllm_config.model_config, vllm_config.cache_config
    dtype = str(cc.cache_dtype)
    if dtype != "auto":
        raise ValueError(
            f"sawquant: this checkpoint stores its own calibrated INT4 KV cache, so "
            f"--kv-cache-dtype {dtype} cannot apply; leave --kv-cache-dtype at auto"
        )
    if getattr(mc, "use_mla", False):
        raise ValueError(
            "sawquant: this model uses multi-head latent attention (MLA), whose latent cache "
            "sawquant does not quantize; serve it without the sawquant config"
        )
    try:
        state = serving_state(vllm_config)
        facts = model_facts(mc.hf_config)
        state.config.check_model(facts.num_layers, facts.num_kv_heads, facts.head_dim)
        check_exact_for(state.config, mc.hf_config)
        tp = vllm_config.parallel_config.tensor_parallel_size
        for rank in range(tp):
            local_heads(facts.num_kv_heads, tp, rank)
    except SawquantError as exc:
        raise ValueError(f"sawquant: {exc}") from None


def capacity_line(vllm_config: Any) -> str:
    """What the user is served, in one line: the config's average bits, the bytes per token
    vLLM allocates (all layers, K and V, this rank), and the KV tokens per GiB compared with a
    BF16 and an FP8 cache of the same model."""
    state = serving_state(vllm_config)
    block = vllm_config.cache_config.block_size or 16
    ours = sum(state.bytes_per_token(block))
    facts = state.local.model
    bf16 = 2 * facts.num_kv_heads * facts.head_dim * 2 * len(state.local.layers)
    per_gib = (1 << 30) // ours
    return (
        f"sawquant: serving {vllm_config.model_config.model} with its calibrated KV cache "
        f"({state.config.average_bits():.2f} bits/element, {ours} B/token in blocks of {block}): "
        f"{per_gib:,} tokens/GiB, {bf16 / ours:.2f}x a BF16 cache and {bf16 / 2 / ours:.2f}x "
        "an FP8 cache"
    )


def _wrap_check(cls) -> None:
    original = cls.check_and_update_config.__func__
    if getattr(original, _MARK, False):
        return

    def check_and_update_config(klass, vllm_config):
        original(klass, vllm_config)
        if is_sawquant(vllm_config):
            validate(vllm_config)
            logger.info(capacity_line(vllm_config))

    setattr(check_and_update_config, _MARK, True)
    cls.check_and_update_config = classmethod(check_and_update_config)


def _wrap_backend_choice(cls) -> None:
    original = cls.get_attn_backend_cls.__func__
    if getattr(original, _MARK, False):
        return

    def get_attn_backend_cls(klass, *args, **kwargs):
        from vllm.config import get_current_vllm_config_or_none

        if is_sawquant(get_current_vllm_config_or_none()):
            return BACKEND_PATH
        return original(klass, *args, **kwargs)

    setattr(get_attn_backend_cls, _MARK, True)
    cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _wrap_spec() -> None:
    from vllm.model_executor.layers.attention.attention import Attention

    original = Attention.get_kv_cache_spec
    if getattr(original, _MARK, False):
        return

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        if spec is None or not is_sawquant(vllm_config):
            return spec
        layout = serving_state(vllm_config).layout(layer_index(self.layer_name), spec.block_size)
        # One head slot of opaque bytes per token: vLLM allocates [blocks, 1, block, bytes] and
        # never looks inside; BlockLayout carves sawquant's pools out of it.
        return replace(
            spec, dtype=torch.uint8, num_head_slots=1, state_content_bytes=layout.bytes_per_token
        )

    setattr(get_kv_cache_spec, _MARK, True)
    Attention.get_kv_cache_spec = get_kv_cache_spec


def _add_worker_methods() -> None:
    """Worker methods ``LLM.collective_rpc`` can call by name (no pickled code): what sawquant
    served, and a recorder of one layer's cache writes (for tests and inspection)."""
    from vllm.v1.worker.worker_base import WorkerBase

    from sawquant.runtime.vllm import inspect

    for name in inspect.WORKER_METHODS:
        if not hasattr(WorkerBase, name):
            setattr(WorkerBase, name, getattr(inspect, name))


def install() -> None:
    """Install the hooks (idempotent: vLLM calls the entry point once per process, tests may
    call it again)."""
    cls = _platform_class()
    _wrap_check(cls)
    _wrap_backend_choice(cls)
    _wrap_spec()
    _add_worker_methods()
