"""CUDA-graph replay of the one-token decode steps of a patched decoder.

An eager decode step of an 8B model launches ~30 kernels per layer, and at batch 1 the host
(Python, transformers, the Triton launchers) takes longer to issue them than the GPU takes to
run them. So the first decode step of each shape is captured in a CUDA graph and every later
step replays it: the host only plans the step's slots (as in eager mode), copies the plan and
the inputs into the graph's static tensors and launches one graph.

What a step depends on, and how the graph sees it:

* token ids and position ids: static input tensors, refreshed in place;
* where the token goes and what the kernels read (slots, lengths, block table): a static
  :class:`StepPlan` whose tensors are refreshed in place; the cache reuses it
  (``SawquantCache.reuse_plan``), so the captured layers never plan on the host;
* the 2D attention mask: not passed. The paged decode kernels mask by ``seq_lens`` (padding is
  never stored) and ignore transformers' mask, so leaving it out keeps the step's shapes static
  (the mask grows by one column per token) without changing its result;
* the pools: their addresses are baked into the graph, so a graph lives with its pools (on its
  cache, then on the next cache that takes them: ``sawquant.runtime.hf.reuse``) and is dropped
  when the pools are reallocated (growth doubles them: rare).

Graph keys are the input shapes, the block table's width (it doubles as sequences grow, so a
long generation captures a handful of graphs) and the autocast dtype, if any. Steps a graph
cannot serve run eagerly, and the user is told once why (gradients on, hidden states requested,
a forward argument the graph does not carry, several devices). ``simulate=True`` replays by
running the captured call again with the host-side lengths frozen at their capture values: the
bookkeeping of the graph path, tested on a CPU.
"""

from __future__ import annotations

import functools
import gc
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sawquant.runtime.hf.cache import SawquantCache
from sawquant.runtime.hf.compat import CACHE_NAMES, cache_kwargs
from sawquant.runtime.pages import StepPlan

__all__ = ["DecodeGraphs", "graph_support"]

# Forward arguments a decode step may carry; anything else (not None) runs the step eagerly.
_CARRIED = {"input_ids", "position_ids", "attention_mask", "use_cache", "return_dict", *CACHE_NAMES}
_FALSY_OK = {"inputs_embeds", "output_attentions", "output_hidden_states", "cache_position"}


def graph_support(model: torch.nn.Module) -> str | None:
    """None when ``model``'s decode steps can be captured, else why not (a short phrase)."""
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if any(d.type != "cuda" for d in devices):
        return "the model is not on a CUDA device"
    if len(devices) > 1:
        return f"the model is spread over {len(devices)} devices"
    from sawquant.runtime import dispatch

    if not dispatch.use_triton(next(model.parameters())):
        return "triton is not installed"
    return None


@dataclass
class _Graph:
    """One captured decode step and its static tensors. It holds no reference to its cache
    (which holds it): a cycle would leave dead caches, pools and graphs to Python's cyclic
    collector, which may then run in the middle of another capture and invalidate it."""

    ids: torch.Tensor  # [B, 1] token ids
    positions: torch.Tensor  # position ids as the model takes them
    plan: StepPlan  # static slots, lengths and block table
    hidden: torch.Tensor  # the step's output hidden states (the graph writes them)
    output_type: type  # the decoder's output class
    replay: Callable[[SawquantCache], None]
    layers: frozenset[int]  # layers whose update ran in the captured step
    calls: Counter  # the cache's path counters of one step (write, decode)


class DecodeGraphs:
    """Serve a patched decoder's one-token steps from CUDA graphs (see the module docstring).

    ``forward`` is the decoder's own bound forward (not the patched wrapper)."""

    def __init__(self, decoder: torch.nn.Module, forward: Callable, *, simulate: bool = False):
        self.decoder = decoder
        self.forward = forward
        self.simulate = simulate
        self.disabled: str | None = None  # set when a capture failed: every step runs eagerly
        self._told: set[str] = set()

    # -- the patched forward ------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        cache = self._decode_cache(args, kwargs)
        if cache is None:
            return self.forward(*args, **kwargs)
        key = self._key(cache, kwargs)
        graph = cache.graphs.get(key)
        for attempt in range(2 if graph is None else 0):  # one retry: a capture can be upset
            try:  # by something outside it (another thread, a driver hiccup)
                graph = self._capture(cache, kwargs)
                cache.graphs[key] = graph
                break
            except Exception as err:  # noqa: BLE001  (any failure: run eagerly, say why)
                if attempt:
                    self.disabled = f"capturing a decode step failed ({type(err).__name__}: {err})"
                    self._tell(self.disabled)
                    return self.forward(*args, **kwargs)
        return self._replay(graph, cache, kwargs)

    def _decode_cache(self, args: tuple, kwargs: dict) -> SawquantCache | None:
        """The step's cache when a graph can serve this call, else None (told once why)."""
        cache = next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)
        if args or not isinstance(cache, SawquantCache) or cache.plan is None:
            return None
        plan = cache.plan
        if plan.length != 1 or plan.past == 0 or plan.done:
            return None  # a prompt chunk, or a plan some layer already used: not a decode step
        reason = self.disabled or self._unsupported(kwargs)
        if reason:
            self._tell(reason)
            return None
        return cache

    def _unsupported(self, kwargs: dict) -> str | None:
        if torch.is_grad_enabled():
            return "gradients are enabled (wrap the call in torch.no_grad())"
        ids = kwargs.get("input_ids")
        if ids is None:
            return "the step gets inputs_embeds instead of input_ids"
        if not self.simulate and not ids.is_cuda:
            return "the inputs are not on a CUDA device"
        for name, value in kwargs.items():
            if name in _FALSY_OK and not (value is None or value is False):
                return f"the forward got {name}"
            if name not in _CARRIED | _FALSY_OK and value is not None:
                return f"the forward got {name}, which a captured step does not carry"
        return None

    def _tell(self, reason: str) -> None:
        if reason not in self._told:
            self._told.add(reason)
            warnings.warn(
                f"sawquant: decode steps run without CUDA graphs ({reason}); they still use the "
                "INT4 cache, at the eager path's host overhead",
                UserWarning,
                stacklevel=4,
            )

    # -- capture and replay -------------------------------------------------------------
    @staticmethod
    def _positions(cache: SawquantCache, kwargs: dict, ids: torch.Tensor) -> torch.Tensor:
        pos = kwargs.get("position_ids")
        if pos is not None:
            return pos
        # The model's own default (arange(T) + tokens seen), made an input so it is not baked.
        return torch.full((1, 1), cache.plan.past, dtype=torch.long, device=ids.device)

    def _key(self, cache: SawquantCache, kwargs: dict) -> tuple:
        ids = kwargs["input_ids"]
        pos = kwargs.get("position_ids")
        pos_shape = None if pos is None else (tuple(pos.shape), pos.dtype)
        # Autocast changes the kernels a step runs: a graph captured without it (or with
        # another dtype) must not serve a step under it, now that graphs outlive their call.
        kind = ids.device.type
        cast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        return tuple(ids.shape), pos_shape, tuple(cache.plan.block_table.shape), cast

    def _call(self, cache: SawquantCache, graph_inputs: tuple[torch.Tensor, torch.Tensor]):
        ids, positions = graph_inputs
        return self.forward(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            **cache_kwargs(self.decoder, cache),
        )

    def _capture(self, cache: SawquantCache, kwargs: dict) -> _Graph:
        cache.note_weights()  # the graph bakes the weights' addresses (sawquant.runtime.hf.reuse)
        step = cache.plan
        ids = kwargs["input_ids"].clone()
        positions = self._positions(cache, kwargs, ids).clone()
        static = StepPlan(
            past=step.past,
            length=1,
            slots=step.slots.clone(),
            cached_lens=step.cached_lens.clone(),
            seq_lens=step.seq_lens.clone(),
            block_table=step.block_table.clone(),
        )
        inputs = (ids, positions)
        cache._plan, cache.reuse_plan = static, True
        try:
            if self.simulate:
                output, calls = self._counted(cache, self._call, inputs)
                seen = [layer.seen for layer in cache.layers]
                replay = functools.partial(
                    self._simulated_replay, inputs, output.last_hidden_state, seen
                )
            else:
                output, calls, replay = self._cuda_capture(cache, inputs)
        finally:
            cache._plan, cache.reuse_plan = step, False
        graph = _Graph(
            ids, positions, static, output.last_hidden_state, type(output), replay,
            frozenset(static.done), calls,
        )  # fmt: skip
        return graph

    def _counted(self, cache: SawquantCache, call: Callable, inputs) -> tuple[Any, Counter]:
        """Run ``call(cache, inputs)``; return its output and the path counters it added (taken
        back from the cache: the caller counts what really runs)."""
        before = Counter(cache.calls)
        try:
            output = call(cache, inputs)
            added = Counter(cache.calls)
            added.subtract(before)
        finally:
            cache.calls = before
        return output, +added

    def _cuda_capture(self, cache: SawquantCache, inputs):
        device = cache.plan.slots.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        # Warm-up off the capture: JIT-compiles the kernels and settles the allocator. It runs
        # the step for real; writing the same token into the same slot again is harmless.
        with torch.cuda.stream(side):
            for _ in range(2):
                self._call(cache, inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if cache.graph_pool is None:  # one pool per cache (and per pool size): see the cache
            cache.graph_pool = torch.cuda.graph_pool_handle()
        collecting = gc.isenabled()
        gc.collect()  # nothing the collector frees (CUDA graphs, events) may die mid-capture
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=cache.graph_pool):
                output, calls = self._counted(cache, self._call, inputs)
        finally:
            if collecting:
                gc.enable()
        return output, calls, lambda _cache: graph.replay()

    def _simulated_replay(self, inputs, hidden: torch.Tensor, seen: list[int], cache) -> None:
        """What a replay does, on any device: the captured call with the host state it saw at
        capture (a graph cannot see later host values), its output copied into the static one."""
        now = [layer.seen for layer in cache.layers]
        for layer, n in zip(cache.layers, seen):
            layer.seen = n
        try:
            output, _ = self._counted(cache, self._call, inputs)
            hidden.copy_(output.last_hidden_state)
        finally:
            for layer, n in zip(cache.layers, now):
                layer.seen = n

    def _replay(self, graph: _Graph, cache: SawquantCache, kwargs: dict):
        step = cache.plan
        graph.ids.copy_(kwargs["input_ids"])
        graph.positions.copy_(self._positions(cache, kwargs, graph.ids))
        for name in ("slots", "cached_lens", "seq_lens", "block_table"):
            getattr(graph.plan, name).copy_(getattr(step, name))
        graph.replay(cache)
        # The host-side effects of the captured updates, which a replay does not run.
        for i in graph.layers:
            cache.layers[i].seen += 1
        step.done.update(graph.layers)
        cache.calls.update(graph.calls)
        cache.calls["graph_replay"] += 1
        hidden = graph.hidden.clone()  # the next replay overwrites the static one
        return graph.output_type(last_hidden_state=hidden, **self._cache_field(graph, cache))

    @staticmethod
    def _cache_field(graph: _Graph, cache: SawquantCache) -> dict:
        fields = getattr(graph.output_type, "__dataclass_fields__", {})
        name = next((n for n in CACHE_NAMES if n in fields), None)  # the field this release has
        return {} if name is None else {name: cache}
