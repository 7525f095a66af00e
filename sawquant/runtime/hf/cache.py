"""The paged INT4 KV cache as a ``transformers.Cache``: a :class:`PageTable` shared by every
layer, one engine-agnostic :class:`LayerKV` per layer, and transformers' Cache glue.

How a forward step uses it (the model code is unchanged):

1. ``prepare_step`` (called by the pre-forward hook ``patch`` installs, or lazily by the first
   layer's ``update``) asks the page table where the step's new tokens go.
2. Each attention layer calls ``update(k, v, layer_idx)``: the new K/V are rotated, quantized
   and written into the pages (the fused write kernel on GPU) and returned unchanged; the
   sawquant attention function then reads the pages (``attention.py``), after checking that
   the key it got is the one this update returned.

Lengths reported to transformers (``get_seq_length``, ``get_mask_sizes``) are logical lengths,
pad columns included, so they match the 2D attention mask that ``generate`` grows.
Pages grow on demand (the pools are reallocated at twice the size) unless ``grow=False``, in
which case running out raises :class:`CacheFullError` (a fixed KV memory budget).
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from sawquant.config import KVConfig
from sawquant.errors import ConfigError, NonFiniteKVError, SawquantError
from sawquant.format import SideStore
from sawquant.runtime import dispatch
from sawquant.runtime.hf.reuse import CacheReuse, Leftovers
from sawquant.runtime.layer import LayerKV
from sawquant.runtime.pages import PageTable, StepPlan

__all__ = ["SawquantCache"]


class _PagedLayer(CacheLayerMixin):
    """One layer of the cache; pages and lengths live in the parent's page table."""

    is_sliding = False  # every token is kept; sliding windows are applied by the kernels

    def __init__(self, cache: SawquantCache, layer_idx: int):
        super().__init__()
        self._cache = weakref.ref(cache)  # no reference cycle: the pools free with the cache
        self.layer_idx = layer_idx
        self.kv: LayerKV | None = None
        self.seen = 0  # logical tokens processed by this layer
        # What the last update returned (weak: a prefill's full-precision keys must not stay
        # alive until the next step); the attention function checks it got the same tensor.
        self.last_key: weakref.ref | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._cache()._allocate_layer(self, key_states)

    def update(self, key_states, value_states, *args, **kwargs):
        return self._cache()._update_layer(self, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = 0
        self.last_key = None

    def returned(self, key: torch.Tensor) -> bool:
        """True when ``key`` is what this layer's last update returned."""
        return self.last_key is not None and self.last_key() is key

    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.nbytes()


class SawquantCache(Cache):
    """Paged, quantized KV cache following a :class:`KVConfig` (one layer config per layer).

    ``num_pages`` fixes the initial page count (all layers share page ids); None sizes it from
    the first step. ``grow=False`` keeps it fixed: a step that needs more raises CacheFullError.
    ``reuse`` (set by the runtime for the caches it creates) recycles pools and CUDA graphs
    from one cache to the next (:mod:`sawquant.runtime.hf.reuse`).
    """

    def __init__(
        self,
        kv_config: KVConfig,
        *,
        page_size: int = 16,
        num_pages: int | None = None,
        grow: bool = True,
        reuse: CacheReuse | None = None,
    ):
        self.kv_config = kv_config
        # Where this cache leaves its pools and graphs when it dies, and takes a dead one's
        # at its first step (sawquant.runtime.hf.reuse); None: allocate, capture, free.
        self._reuse = reuse
        self._weights: tuple | None = None  # the decoder's tensors its pools and graphs saw
        # The page table calls back through a weak reference: no cycle, so a dead cache frees
        # its pools (and CUDA graphs) at once, not at some later run of the cyclic collector.
        grow_pools = weakref.WeakMethod(self._grow)
        self.pages = PageTable(
            page_size=page_size,
            num_pages=int(num_pages or 0),
            grow=(lambda n: grow_pools()(n)) if grow else None,
        )
        super().__init__(layers=[_PagedLayer(self, i) for i in range(kv_config.model.num_layers)])
        self._plan: StepPlan | None = None
        # Set by a caller that replays one captured step (CUDA graphs): every update reuses the
        # current plan, whose tensors the caller refreshes in place, and no host work is done.
        self.reuse_plan = False
        # Captured decode steps of this cache (sawquant.runtime.hf.graphs): they hold the pools'
        # addresses, so they are dropped when the pools are reallocated.
        self.graphs: dict = {}
        # The memory-pool id those graphs share (set by the first capture). Never reused once
        # its graphs are gone: torch's allocator asserts when a capture joins a pool whose last
        # graph died while some of its blocks are still cached.
        self.graph_pool = None
        # How often each path ran (write, decode, prefill, first_chunk): proof that the paged
        # INT4 path really serves the model (tests and verify read it).
        self.calls: Counter[str] = Counter()
        # Set by the Triton writer (to layer + 1) when a value cannot be stored; checked once
        # per step by check_storable(), since a kernel cannot raise (the twins raise at once).
        self._bad_write: torch.Tensor | None = None

    # -- transformers Cache API --------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    @property
    def batch_size(self) -> int:
        return self.pages.batch_size

    def reset(self) -> None:
        """Forget every sequence (pages return to the free list; pools stay allocated)."""
        for layer in self.layers:
            layer.reset()
        self.pages.reset()
        self._plan = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.pages.lens is not None:
            self._unsupported("batch_repeat_interleave on a filled cache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence b continues what sequence ``beam_idx[b]`` holds (its pages
        are copied to fresh ones in every layer)."""
        moved = self.pages.reorder(beam_idx)
        if moved is None:
            return
        src, dst = moved
        if dst:
            for layer in self.layers:
                if layer.kv is not None:
                    layer.kv.copy_pages(src, dst)
        self._plan = None

    def crop(self, *args, **kwargs) -> None:
        self._unsupported("crop (assisted/speculative decoding)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._unsupported("batch_select_indices (contrastive search)")

    @staticmethod
    def _unsupported(what: str):
        raise SawquantError(
            f"the sawquant paged cache does not support {what} yet; use greedy or sampling "
            "generation, or unpatch the model (sawquant.runtime.unpatch) for this mode"
        )

    # -- queries ------------------------------------------------------------------------
    @property
    def plan(self) -> StepPlan | None:
        """The current step's plan (None before the first step)."""
        return self._plan

    @property
    def page_size(self) -> int:
        return self.pages.page_size

    @property
    def num_pages(self) -> int:
        return self.pages.num_pages

    def layer_kv(self, layer_idx: int) -> LayerKV | None:
        """The engine-agnostic KV object of one layer (None before its first write)."""
        return self.layers[layer_idx].kv

    def stores(self, layer_idx: int) -> tuple[SideStore, SideStore]:
        kv = self.layers[layer_idx].kv
        return kv.k, kv.v

    def seq_lens(self) -> torch.Tensor:
        """Tokens stored per sequence ([B] int64, CPU); pad columns are not counted."""
        lens = self.pages.lens
        return torch.zeros(0, dtype=torch.int64) if lens is None else lens.clone()

    def free_pages(self) -> int:
        return self.pages.free_pages()

    def nbytes(self) -> int:
        """Bytes held by the pools of every layer (block table excluded)."""
        return sum(layer.nbytes() for layer in self.layers)

    def check_storable(self) -> None:
        """Raise NonFiniteKVError if a kernel write of this cache met a value it cannot store
        (one device-to-host read; the twins raise during the write instead)."""
        flag = self._bad_write
        if flag is None or self.reuse_plan:  # (a captured replay is checked by its caller)
            return
        layer = int(flag[0])
        if layer:
            flag.zero_()
            raise NonFiniteKVError(
                f"layer {layer - 1} produced NaN/Inf keys or values (or values beyond the "
                "cache's range), which sawquant does not store; the model's activations "
                "overflowed (load it in bfloat16 or float32 rather than float16). This cache "
                "holds garbage for that step: start a new one"
            )

    def layers_not_written(self) -> list[int]:
        """Layers that did not write into the pages during the current step (should be none)."""
        if self._plan is None or self.reuse_plan:
            return []
        return [i for i in range(len(self.layers)) if i not in self._plan.done]

    # -- planning -----------------------------------------------------------------------
    def prepare_step(self, length: int, **where) -> StepPlan:
        """Allocate pages for the next ``length`` tokens of every sequence and plan their slots:
        ``where`` is :meth:`PageTable.plan`'s batch_size, device and attention_mask."""
        self.check_storable()  # a bad write of the previous step is never silently kept
        if self._reuse is not None and self.pages.lens is None and self.pages.num_pages == 0:
            self._adopt(self._reuse.take(where["device"], self.page_size))
        self._plan = self.pages.plan(length, **where)
        return self._plan

    def _adopt(self, left: Leftovers | None) -> None:
        """Take a dead cache's pools and graphs before the first step (nothing allocated)."""
        if left is None or len(left.kvs) != len(self.layers):
            return
        self.pages.num_pages = left.num_pages
        self.pages.reset()
        for layer, kv in zip(self.layers, left.kvs):
            layer.kv = kv
            layer.is_initialized = kv is not None
        self.graphs, self.graph_pool, self._bad_write = left.graphs, left.graph_pool, left.bad_write
        self._weights = left.weights

    def note_weights(self) -> None:
        """Record the decoder's tensors (at the first allocation and at every capture): if they
        ever differ, this cache's pools and graphs are not handed on."""
        if self._reuse is None:
            return
        now = self._reuse.fingerprint()
        if self._weights is None and not any(layer.kv is not None for layer in self.layers):
            self._weights = now
        elif now != self._weights:
            self._weights = ()  # mixed: never equal to a real fingerprint

    def __copy__(self):
        # A shallow copy shares the layers (and so the pools): neither may hand them on.
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        self._reuse = clone._reuse = None
        return clone

    def __del__(self):
        reuse = getattr(self, "_reuse", None)
        if reuse is None:
            return
        try:
            kvs = [layer.kv for layer in self.layers]
            device = next((kv.device for kv in kvs if kv is not None), None)
            if device is not None:
                # A graph pool with no live graph is never joined again (torch's allocator
                # asserts), so it goes only with its graphs.
                pool = self.graph_pool if self.graphs else None
                left = Leftovers(
                    kvs=kvs,
                    weights=self._weights or None,
                    num_pages=self.pages.num_pages,
                    page_size=self.page_size,
                    device=device,
                    graphs=self.graphs,
                    graph_pool=pool,
                    bad_write=self._bad_write,
                )
                reuse.give(left)
        except Exception:  # noqa: BLE001  (a finalizer must not raise: the pools are just freed)
            pass

    def _grow(self, num_pages: int) -> None:
        self.graphs.clear()
        self.graph_pool = None
        for layer in self.layers:
            if layer.kv is not None:
                layer.kv.resize(num_pages)

    # -- per-layer work -----------------------------------------------------------------
    def _allocate_layer(self, layer: _PagedLayer, key_states: torch.Tensor) -> None:
        if self._weights is None:  # the first pool of a fresh cache
            self.note_weights()
        m = self.kv_config.model
        if key_states.shape[1] != m.num_kv_heads:
            raise ConfigError(
                f"layer {layer.layer_idx} produced {key_states.shape[1]} KV heads but the "
                f"sawquant config holds {m.num_kv_heads}: a model split by tensor parallelism "
                "must be patched after it is split (sawquant.from_pretrained(..., tp_plan=...) "
                "does that), with as many KV heads as ranks or more"
            )
        layer.kv = LayerKV.allocate(
            self.kv_config.layers[layer.layer_idx],
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            num_pages=self.pages.num_pages,
            page_size=self.pages.page_size,
            values_folded=self.kv_config.values_folded,
            device=key_states.device,
            dtype=key_states.dtype,
        )
        layer.is_initialized = True

    def _update_layer(
        self, layer: _PagedLayer, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [B, H_kv, T, D] post-RoPE
        b, h, t, d = key_states.shape
        plan = self._plan
        stale = plan is None or layer.layer_idx in plan.done or plan.length != t
        if stale and not self.reuse_plan:
            # No pre-forward hook ran for this step (the cache was passed to a bare model).
            plan = self.prepare_step(t, batch_size=b, device=key_states.device)
        if layer.kv is None:
            self._allocate_layer(layer, key_states)
        k = key_states.transpose(1, 2).reshape(b * t, h, d)  # [B*T, H_kv, D]
        v = value_states.transpose(1, 2).reshape(b * t, h, d)
        if self._bad_write is None or self._bad_write.device != k.device:
            self._bad_write = torch.zeros(1, dtype=torch.int32, device=k.device)
        dispatch.write_kv(
            layer.kv, k, v, plan.on(k.device).slots,
            flag=self._bad_write, flag_value=layer.layer_idx + 1,
        )  # fmt: skip
        self.calls["write"] += 1
        plan.done.add(layer.layer_idx)  # (a captured step reports its layers through it)
        if not self.reuse_plan:
            layer.seen += t
        layer.last_key = weakref.ref(key_states)
        # A mark the attention function checks when it finds no cache in the patch state: a
        # forward that skipped the pre-hook (a direct ``decoder.forward(...)`` call) would
        # otherwise attend to this step's new tokens only, with no error.
        key_states._sawquant_stored = True
        return key_states, value_states

    def __repr__(self) -> str:
        return (
            f"SawquantCache(layers={len(self.layers)}, page_size={self.page_size}, "
            f"num_pages={self.num_pages}, batch={self.batch_size})"
        )
