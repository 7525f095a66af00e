"""The paged INT4 KV cache as a ``transformers.Cache``: per-layer K/V ``SideStore``s, one page
allocator and one block table shared by every layer, per-sequence lengths.

How a forward step uses it (the model code is unchanged):

1. ``prepare_step`` (called by the pre-forward hook ``patch`` installs, or lazily by the first
   layer's ``update``) decides where the step's new tokens go: it allocates pages for them and
   builds the slot mapping. Left-padding columns of a batched prompt (0 in the 2D attention
   mask) get slot -1 and are never stored, so every sequence keeps its own length and the
   kernels' ``seq_lens`` do the masking.
2. Each attention layer calls ``update(k, v, layer_idx)``: the new K/V are rotated, quantized
   and written into the pages (the fused write kernel on GPU) and returned unchanged; the
   sawquant attention function then reads the pages (see ``attention.py``).

Lengths reported to transformers (``get_seq_length``, ``get_mask_sizes``) are logical lengths,
pad columns included, so they match the 2D attention mask that ``generate`` grows.
Pages grow on demand (the pools are reallocated at twice the size) unless ``grow=False``, in
which case running out raises :class:`CacheFullError` (a fixed KV memory budget).
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from sawquant.config import KVConfig, SideConfig
from sawquant.errors import NonFiniteKVError, RuntimeBypassError, SawquantError
from sawquant.format import SideStore, allocate_side
from sawquant.quant import random_signs
from sawquant.runtime import dispatch

__all__ = [
    "CacheFullError",
    "RuntimeBypassError",
    "SawquantCache",
    "StepPlan",
    "last_update",
    "make_side_store",
]

# The attention function finds the cache through the last ``update`` call: the model calls
# ``past_key_values.update`` right before the attention function of the same layer, and the
# attention function receives no cache argument. Thread-local so two threads never mix.
_LAST = threading.local()


class CacheFullError(SawquantError):
    """The fixed-size KV cache has no free page left."""


def last_update() -> tuple[SawquantCache, int, torch.Tensor] | None:
    """Take (and clear) the ``(cache, layer_idx, key)`` of the most recent sawquant ``update``."""
    last = getattr(_LAST, "value", None)
    _LAST.value = None
    return last


def make_side_store(
    side: SideConfig,
    *,
    num_kv_heads: int,
    head_dim: int,
    num_pages: int,
    page_size: int,
    rotate: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> SideStore:
    """Allocate the pools of one side as the config says; ``rotate=False`` stores unrotated
    (a V side whose rotation was folded into the weights at export)."""
    signs = None
    if rotate and side.sign_seed is not None:
        signs = random_signs(head_dim, side.sign_seed)
    return allocate_side(
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        head_bits=side.head_bits(num_kv_heads),
        num_pages=num_pages,
        page_size=page_size,
        block=side.rotation_block if rotate else 1,
        signs=signs,
        group_size=side.group_size,
        device=device,
        dtype=dtype,
    )


def _resized(store: SideStore, num_pages: int) -> SideStore:
    """A copy of ``store`` with ``num_pages`` pages; the first pages keep their contents."""
    head_bits = tuple(bits for bits, _ in store.pool_of())
    pool = next(iter(store.pools.values()))
    dtype = store.pools[16].codes.dtype if 16 in store.pools else torch.bfloat16
    new = allocate_side(
        num_kv_heads=store.num_kv_heads,
        head_dim=store.head_dim,
        head_bits=head_bits,
        num_pages=num_pages,
        page_size=store.page_size,
        block=store.block,
        signs=store.signs,
        group_size=pool.spec.group_size,
        device=pool.codes.device,
        dtype=dtype,
    )
    keep = min(num_pages, store.num_pages)
    for bits, old in store.pools.items():
        dst = new.pools[bits]
        dst.codes[:keep] = old.codes[:keep]
        if old.scale is not None:
            dst.scale[:keep] = old.scale[:keep]
            dst.zero[:keep] = old.zero[:keep]
    return new


def _copy_pages(store: SideStore, src: list[int], dst: list[int]) -> None:
    """Copy pages ``src`` onto pages ``dst`` in every pool of ``store`` (codes, scales, zeros)."""
    device = store.pools[next(iter(store.pools))].codes.device
    s = torch.tensor(src, dtype=torch.int64, device=device)
    d = torch.tensor(dst, dtype=torch.int64, device=device)
    for pool in store.pools.values():
        for t in (pool.codes, pool.scale, pool.zero):
            if t is not None:
                t[d] = t[s]


@dataclass
class StepPlan:
    """Where one forward step's tokens go, shared by every layer of that step."""

    past: int  # logical tokens before this step (pad columns included)
    length: int  # T, new tokens per sequence in this step
    slots: torch.Tensor  # [B * T] int64, -1 = padding (not stored)
    cached_lens: torch.Tensor  # [B] int32, tokens stored before this step
    seq_lens: torch.Tensor  # [B] int32, tokens stored after this step
    block_table: torch.Tensor  # [B, max_pages] int32
    done: set[int] = field(default_factory=set)  # layers that already wrote this step
    _moved: dict = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> StepPlan:
        """This plan with its tensors on ``device`` (layers spread over several GPUs)."""
        if self.slots.device == device:
            return self
        key = str(device)
        if key not in self._moved:
            self._moved[key] = StepPlan(
                self.past,
                self.length,
                self.slots.to(device),
                self.cached_lens.to(device),
                self.seq_lens.to(device),
                self.block_table.to(device),
            )
        return self._moved[key]


class _PagedLayer(CacheLayerMixin):
    """One layer's stores; lengths and pages live in the parent cache."""

    is_sliding = False  # every token is kept; sliding windows are applied by the kernels

    def __init__(self, cache: SawquantCache, layer_idx: int):
        super().__init__()
        self._cache = weakref.ref(cache)  # no reference cycle: the pools free with the cache
        self.layer_idx = layer_idx
        self.k_store: SideStore | None = None
        self.v_store: SideStore | None = None
        self.seen = 0  # logical tokens processed by this layer

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

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in (self.k_store, self.v_store) if s is not None)


class SawquantCache(Cache):
    """Paged, quantized KV cache following a :class:`KVConfig` (one layer config per layer).

    ``num_pages`` fixes the initial page count (all layers share page ids); None sizes it from
    the first step. ``grow=False`` keeps it fixed: a step that needs more raises CacheFullError.
    """

    def __init__(
        self,
        kv_config: KVConfig,
        *,
        page_size: int = 16,
        num_pages: int | None = None,
        grow: bool = True,
    ):
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self.kv_config = kv_config
        self.page_size = page_size
        self.grow = grow
        self.num_pages = int(num_pages or 0)
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))  # pop() -> lowest id
        super().__init__(layers=[_PagedLayer(self, i) for i in range(kv_config.model.num_layers)])
        self._device: torch.device | None = None
        self._lens: torch.Tensor | None = None  # [B] int64 CPU: tokens stored per sequence
        self._owned: torch.Tensor | None = None  # [B] int64 CPU: pages owned per sequence
        self._table: torch.Tensor | None = None  # [B, cols] int32 CPU block table
        self._table_dev: torch.Tensor | None = None  # device copy, refreshed when pages change
        self._planned = 0  # logical tokens covered by plans so far
        self._plan: StepPlan | None = None
        # Set by a caller that replays one captured step (CUDA graphs): every update reuses the
        # current plan, whose tensors the caller refreshes in place, and no host work is done.
        self.reuse_plan = False
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
        return -1 if self._lens is None else int(self._lens.shape[0])

    def reset(self) -> None:
        """Forget every sequence (pages return to the free list; pools stay allocated)."""
        for layer in self.layers:
            layer.reset()
        self._free = list(range(self.num_pages - 1, -1, -1))
        self._lens = self._owned = self._table = self._table_dev = None
        self._planned = 0
        self._plan = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._lens is not None:
            self._unsupported("batch_repeat_interleave on a filled cache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence b continues what sequence ``beam_idx[b]`` holds.

        Every kept sequence gets fresh pages holding a copy of its source's pages (all layers,
        all pools), then the old pages return to the free list: simple and always correct, at
        the cost of copying the cache once per beam step (no copy-on-write sharing yet).
        """
        if self._lens is None:
            return
        idx = beam_idx.to("cpu", torch.int64)
        if torch.equal(idx, torch.arange(idx.shape[0])):
            return
        owned = self._owned[idx]
        missing = int(owned.sum()) - len(self._free)
        if missing > 0:
            self._add_pages(missing, batch=int(idx.shape[0]))
        old_table, old_owned = self._table, self._owned
        table = torch.zeros_like(old_table)
        src, dst = [], []
        for b, n in enumerate(owned.tolist()):
            ids = [self._free.pop() for _ in range(n)]
            table[b, :n] = torch.tensor(ids, dtype=torch.int32)
            src += old_table[idx[b], :n].tolist()
            dst += ids
        if dst:
            for layer in self.layers:
                for store in (layer.k_store, layer.v_store):
                    if store is not None:
                        _copy_pages(store, src, dst)
        for b, n in enumerate(old_owned.tolist()):
            self._free.extend(old_table[b, :n].tolist())
        self._table, self._owned, self._lens = table, owned, self._lens[idx]
        self._table_dev = self._table.to(self._device)
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

    def stores(self, layer_idx: int) -> tuple[SideStore, SideStore]:
        layer = self.layers[layer_idx]
        return layer.k_store, layer.v_store

    def seq_lens(self) -> torch.Tensor:
        """Tokens stored per sequence ([B] int64, CPU); pad columns are not counted."""
        return torch.zeros(0, dtype=torch.int64) if self._lens is None else self._lens.clone()

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

    def free_pages(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        """Bytes held by the pools of every layer (block table excluded)."""
        return sum(layer.nbytes() for layer in self.layers)

    # -- planning -----------------------------------------------------------------------
    def prepare_step(
        self,
        length: int,
        *,
        batch_size: int,
        device: torch.device,
        attention_mask: torch.Tensor | None = None,
    ) -> StepPlan:
        """Allocate pages for the next ``length`` tokens of every sequence and plan their slots.

        attention_mask: the 2D [B, past + length] mask of ``generate`` (0 = padding) or None.
        Padding is read only for multi-token steps; a decode step's token is always stored.
        """
        self.check_storable()  # a bad write of the previous step is never silently kept
        if self._lens is None:
            self._device = torch.device(device)
            self._lens = torch.zeros(batch_size, dtype=torch.int64)
            self._owned = torch.zeros(batch_size, dtype=torch.int64)
            self._table = torch.zeros(batch_size, 0, dtype=torch.int32)
        elif batch_size != self._lens.shape[0]:
            raise SawquantError(
                f"the cache holds {self._lens.shape[0]} sequences but the input has {batch_size}; "
                "start a new cache (past_key_values=None) for a different batch"
            )
        real = None
        if (
            attention_mask is not None
            and attention_mask.dim() == 2
            and length > 1
            and attention_mask.shape[-1] == self._planned + length
        ):
            real = attention_mask[:, -length:].to("cpu", torch.bool)  # [B, T]
            if bool(real.all()):
                real = None
        if real is None:
            new_lens = self._lens + length
            pos = self._lens[:, None] + torch.arange(length)  # [B, T]
        else:
            new_lens = self._lens + real.sum(1)
            pos = self._lens[:, None] + real.long().cumsum(1) - 1
        table_changed = self._ensure_pages(new_lens)
        ps = self.page_size
        pos = pos.clamp(min=0)
        pages = self._table.long().gather(1, pos // ps)  # [B, T]
        slots = pages * ps + pos % ps
        if real is not None:
            slots[~real] = -1
        if table_changed or self._table_dev is None:
            self._table_dev = self._table.to(self._device)
        dev = self._device
        self._plan = StepPlan(
            past=self._planned,
            length=length,
            slots=slots.reshape(-1).to(dev),
            cached_lens=self._lens.to(dev, torch.int32),
            seq_lens=new_lens.to(dev, torch.int32),
            block_table=self._table_dev,
        )
        self._lens = new_lens
        self._planned += length
        return self._plan

    def _ensure_pages(self, new_lens: torch.Tensor) -> bool:
        """Give every sequence the pages ``new_lens`` needs; True if the block table changed."""
        need = (new_lens + self.page_size - 1) // self.page_size
        short = need - self._owned
        missing = int(short.clamp(min=0).sum())
        if missing == 0:
            return False
        if missing > len(self._free):
            self._add_pages(missing - len(self._free), batch=int(new_lens.shape[0]))
        cols = int(need.max())
        if cols > self._table.shape[1]:
            grow_to = max(cols, 2 * self._table.shape[1])
            pad = torch.zeros(self._table.shape[0], grow_to - self._table.shape[1])
            self._table = torch.cat([self._table, pad.to(torch.int32)], dim=1)
        for b in torch.nonzero(short > 0).flatten().tolist():
            have, want = int(self._owned[b]), int(need[b])
            ids = [self._free.pop() for _ in range(want - have)]
            self._table[b, have:want] = torch.tensor(ids, dtype=torch.int32)
            self._owned[b] = want
        return True

    def _add_pages(self, extra: int, *, batch: int) -> None:
        if not self.grow:
            raise CacheFullError(
                f"KV cache full: {extra} more page(s) of {self.page_size} tokens needed, "
                f"{self.num_pages} allocated; raise the KV memory budget or lower the batch"
            )
        # Doubling keeps the total copy cost linear; the headroom avoids regrowing every step.
        old = self.num_pages
        new = max(2 * old, old + extra + batch * max(1, 128 // self.page_size))
        for layer in self.layers:
            if layer.k_store is not None:
                layer.k_store = _resized(layer.k_store, new)
                layer.v_store = _resized(layer.v_store, new)
        self._free = list(range(new - 1, old - 1, -1)) + self._free
        self.num_pages = new

    # -- per-layer work -----------------------------------------------------------------
    def _allocate_layer(self, layer: _PagedLayer, key_states: torch.Tensor) -> None:
        m = self.kv_config.model
        cfg = self.kv_config.layers[layer.layer_idx]
        common = dict(
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            num_pages=self.num_pages,
            page_size=self.page_size,
            device=key_states.device,
            dtype=key_states.dtype,
        )
        layer.k_store = make_side_store(cfg.k, **common)
        layer.v_store = make_side_store(cfg.v, rotate=not self.kv_config.values_folded, **common)
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
        if layer.k_store is None:
            self._allocate_layer(layer, key_states)
        k = key_states.transpose(1, 2).reshape(b * t, h, d)  # [B*T, H_kv, D]
        v = value_states.transpose(1, 2).reshape(b * t, h, d)
        if self._bad_write is None or self._bad_write.device != k.device:
            self._bad_write = torch.zeros(1, dtype=torch.int32, device=k.device)
        dispatch.write_kv(
            k, v, plan.on(k.device).slots, layer.k_store, layer.v_store,
            flag=self._bad_write, flag_value=layer.layer_idx + 1,
        )  # fmt: skip
        self.calls["write"] += 1
        if not self.reuse_plan:
            layer.seen += t
            plan.done.add(layer.layer_idx)
        _LAST.value = (self, layer.layer_idx, key_states)
        return key_states, value_states

    def __repr__(self) -> str:
        return (
            f"SawquantCache(layers={len(self.layers)}, page_size={self.page_size}, "
            f"num_pages={self.num_pages}, batch={self.batch_size})"
        )
