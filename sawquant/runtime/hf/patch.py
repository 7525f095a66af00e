"""Apply a KV config to a transformers causal LM at load time, and take it off again.

``patch`` registers the "sawquant" attention function and mask (transformers'
``AttentionInterface`` / ``AttentionMaskInterface``), switches the model to it with
``set_attn_implementation``, and adds a forward pre-hook on the decoder stack that gives every
cached forward a :class:`SawquantCache` (and a post-hook that refuses a step the cache did
not serve): when ``use_cache`` is on and the call carries no cache,
or the empty ``DynamicCache`` that ``generate`` creates, the hook passes a fresh paged cache
instead (``generate`` keeps the cache the forward returns), and it plans each step's slots
from the 2D attention mask so left padding is never stored. No modeling code is copied or
replaced; ``unpatch`` restores the previous attention implementation.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache

from sawquant.checkpoint import CONFIG_KEY, KV_CONFIG_FILE, read_kv_config
from sawquant.config import KVConfig
from sawquant.errors import ConfigError, RuntimeBypassError
from sawquant.runtime.hf.attention import ATTN_NAME, register
from sawquant.runtime.hf.cache import SawquantCache
from sawquant.runtime.hf.compat import (
    cache_kwargs,
    distributed_kwargs,
    pop_cache,
    returned_cache,
)
from sawquant.runtime.hf.graphs import DecodeGraphs, graph_support
from sawquant.runtime.hf.reuse import CacheReuse
from sawquant.runtime.memory import KVMemory, kv_memory
from sawquant.runtime.sharding import local_config, tensor_parallel_rank

__all__ = [
    "CONFIG_KEY",
    "KV_CONFIG_FILE",
    "from_pretrained",
    "is_patched",
    "patch",
    "read_kv_config",
    "unpatch",
]


@dataclass
class _PatchState:
    """What ``patch`` installed: shared by the model, its decoder and every attention module
    (the attention function reads ``cache`` from here; nothing is found through a global)."""

    config: KVConfig  # this rank's part of the config (the whole config without tp_plan)
    page_size: int
    original_attn: str | None
    hooks: tuple  # torch.utils.hooks.RemovableHandle: the pre- and post-forward hooks
    holders: tuple  # modules carrying this state as ``_sawquant_state``
    cache: SawquantCache | None = None  # the cache of the forward in progress
    graphs: DecodeGraphs | None = None  # CUDA-graph decode steps, when on
    previous_forward: Any = None  # the decoder's instance-level forward before the graphs'
    reuse: CacheReuse | None = None  # a dead cache's pools and graphs for the next (with graphs)


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, "_sawquant_state", None) is not None


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for name in ("input_ids", "inputs_embeds"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


def _before_forward(decoder: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    state: _PatchState = decoder._sawquant_state
    state.cache = None
    if len(args) > 1:  # the cache passed positionally: leave the call alone
        return args, kwargs
    x = _first_tensor(args, kwargs)  # [B, T] ids or [B, T, hidden] embeddings
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(decoder.config, "use_cache", True)
    if x is None or not use_cache:
        return args, kwargs
    cache = pop_cache(kwargs)  # whichever name generate or the caller used
    fresh_dynamic = type(cache) is DynamicCache and cache.get_seq_length() == 0
    if cache is None or fresh_dynamic:
        cache = SawquantCache(state.config, page_size=state.page_size, reuse=state.reuse)
    kwargs.update(cache_kwargs(decoder, cache))
    if isinstance(cache, SawquantCache):
        mask = kwargs.get("attention_mask")
        cache.prepare_step(
            x.shape[1],
            batch_size=x.shape[0],
            device=x.device,
            attention_mask=mask if isinstance(mask, torch.Tensor) else None,
        )
        state.cache = cache
    return args, kwargs


def _after_forward(decoder: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Refuse a forward that bypassed the sawquant cache: it would have served the step from a
    full-precision cache while the user believes the INT4 one is in use."""
    state: _PatchState = decoder._sawquant_state
    expected, state.cache = state.cache, None
    if expected is None:
        return
    got = returned_cache(output)
    if got is not expected:
        raise RuntimeBypassError(
            f"the patched model returned a {type(got).__name__} instead of the sawquant cache: "
            f"transformers {transformers.__version__} passed the cache in a way sawquant does "
            "not handle, so this step did not use the INT4 cache; report it with your "
            "transformers version"
        )
    expected.check_storable()
    missing = expected.layers_not_written()
    if missing:
        raise RuntimeBypassError(
            f"layers {missing} did not write into the sawquant cache in this step (their "
            "attention does not go through the cache update); this model cannot be served "
            "with sawquant as it is, report it with its architecture"
        )


def _sawquant_memory(self: torch.nn.Module) -> KVMemory:
    """KV bytes per token of this model's sawquant cache and the ratio to a BF16 cache (of
    this rank's heads under tensor parallelism: the ranks' figures add up to the model's)."""
    state: _PatchState = self._sawquant_state
    return kv_memory(state.config, page_size=state.page_size)


def _sawquant_release(self: torch.nn.Module) -> None:
    """Free the KV pools and CUDA graphs the runtime keeps from the last finished
    ``generate`` for the next one (``sawquant.runtime.hf.reuse``); the next call allocates and
    captures again. Call ``torch.cuda.empty_cache()`` after it to return the memory to the
    driver."""
    reuse = self._sawquant_state.reuse
    if reuse is not None:
        reuse.release()


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module that receives the cache: the decoder stack under a *ForCausalLM head, so a
    direct call of ``model.model(...)`` is served too; the model itself otherwise."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if isinstance(decoder, torch.nn.Module) else model


def patch(
    model: torch.nn.Module,
    config: KVConfig,
    *,
    page_size: int = 16,
    cuda_graphs: bool | None = None,
) -> torch.nn.Module:
    """Serve ``model`` with the paged quantized KV cache described by ``config`` (in place).

    Afterwards ``model.generate(...)`` and ``model(..., use_cache=True)`` use the cache (fused
    Triton kernels on CUDA tensors, their torch twins elsewhere), and
    ``model.sawquant_memory()`` reports the KV bytes per token. ``cuda_graphs``: replay
    one-token decode steps from CUDA graphs (``sawquant.runtime.hf.graphs``); None (default)
    turns them on for a model on one CUDA device with triton, False turns them off, True
    insists (ConfigError where they cannot run). With graphs on, a finished ``generate``
    leaves its pools and graphs to the next call (``sawquant.runtime.hf.reuse``;
    ``model.sawquant_release()`` frees them). Raises ConfigError when the config was made
    for another model shape or asks for what the kernels cannot do, and
    UnsupportedModelError for a model without decoder KV attention. Returns the model.
    """
    from sawquant.architectures import attention_modules, check_exact_for, check_loaded_model
    from sawquant.kernels.limits import check_kernel_limits

    facts = check_loaded_model(model)
    config.check_model(facts.num_layers, facts.num_kv_heads, facts.head_dim)
    check_exact_for(config, model.config)
    # With transformers' tp_plan each rank computes its slice of the KV heads: its cache
    # stores those heads only, each with its own settings (fallback heads renumbered).
    tp_size, tp_rank = tensor_parallel_rank(model)
    config = local_config(config, tp_size, tp_rank)
    if any(p.is_cuda for p in model.parameters()):
        check_kernel_limits(config)
    if is_patched(model):
        unpatch(model)
    register()
    original = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    decoder = _decoder(model)
    hooks = (
        decoder.register_forward_pre_hook(_before_forward, with_kwargs=True),
        decoder.register_forward_hook(_after_forward, with_kwargs=True),
    )
    holders = tuple(dict.fromkeys([model, decoder, *attention_modules(model)]))
    state = _PatchState(config, page_size, original, hooks, holders)
    if _graphs_wanted(model, cuda_graphs, tp_size):
        install_graphs(state, decoder)
    for module in holders:
        module._sawquant_state = state
    model.sawquant_config = config  # this rank's part under tensor parallelism
    model.sawquant_memory = types.MethodType(_sawquant_memory, model)
    model.sawquant_release = types.MethodType(_sawquant_release, model)
    return model


def _graphs_wanted(model: torch.nn.Module, cuda_graphs: bool | None, tp_size: int) -> bool:
    if cuda_graphs is False:
        return False
    reason = graph_support(model)
    if reason is None and tp_size > 1:
        reason = "tensor parallelism is on (not tested with graphs yet)"
    if reason is not None and cuda_graphs:
        raise ConfigError(f"cuda_graphs=True, but {reason}; pass cuda_graphs=None or False")
    on_gpu = any(p.is_cuda for p in model.parameters())
    if reason is not None and on_gpu:  # a GPU user expects graphs: say why there are none
        warnings.warn(
            f"sawquant: CUDA-graph decode is off ({reason}); decode steps run eagerly, with "
            "more host overhead per token",
            UserWarning,
            stacklevel=3,
        )
    return reason is None


def install_graphs(state: _PatchState, decoder: torch.nn.Module, *, simulate: bool = False):
    """Route the decoder's forward through :class:`DecodeGraphs` (``simulate``: the CPU
    stand-in the tests use). Returns the DecodeGraphs."""
    state.previous_forward = decoder.__dict__.get("forward")  # e.g. accelerate's hook
    state.graphs = DecodeGraphs(decoder, decoder.forward, simulate=simulate)
    state.reuse = CacheReuse(decoder)
    decoder.forward = state.graphs
    return state.graphs


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch`: the previous attention implementation and no cache hook."""
    state: _PatchState | None = getattr(model, "_sawquant_state", None)
    if state is None:
        return model
    for hook in state.hooks:
        hook.remove()
    if state.reuse is not None:
        state.reuse.release()
    if state.graphs is not None:
        decoder = state.graphs.decoder
        if state.previous_forward is None:
            del decoder.forward
        else:
            decoder.forward = state.previous_forward
    model.set_attn_implementation(state.original_attn or "sdpa")
    for module in state.holders:
        if "_sawquant_state" in module.__dict__:
            del module._sawquant_state
    for name in ("sawquant_config", "sawquant_memory", "sawquant_release"):
        if name in model.__dict__:
            delattr(model, name)
    return model


def from_pretrained(
    path: str | Path, *, page_size: int = 16, cuda_graphs: bool | None = None, **hf_kwargs: Any
):
    """Load a causal LM with transformers and install the runtime its checkpoint describes.

    ``cuda_graphs`` is :func:`patch`'s (on by default on one CUDA device). ``hf_kwargs`` go
    to ``AutoModelForCausalLM.from_pretrained`` (dtype, device_map, ...).
    With ``tp_plan="auto"`` under ``torchrun --nproc-per-node N`` each rank loads its slice
    of the heads and its cache stores only its own KV heads. A checkpoint without a sawquant
    KV config loads as a normal model, with a warning.
    """
    from transformers import AutoModelForCausalLM

    hf_kwargs = distributed_kwargs(hf_kwargs)
    config = read_kv_config(path, **hf_kwargs)  # a mistyped local path fails here, at once
    model = AutoModelForCausalLM.from_pretrained(str(path), **hf_kwargs)
    if config is None:
        warnings.warn(
            f"sawquant found no KV config in {path} (no {CONFIG_KEY!r} in config.json); "
            "loaded it as a normal model with a full-precision cache. Export one with "
            "`sawquant export` to serve it with the INT4 cache.",
            UserWarning,
            stacklevel=2,
        )
        return model
    return patch(model, config, page_size=page_size, cuda_graphs=cuda_graphs)
