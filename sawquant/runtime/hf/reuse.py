"""Hand a finished cache's pools and captured decode graphs to the next ``generate`` call.

Each ``generate`` call gets a fresh :class:`SawquantCache`, and CUDA graphs bake the addresses
of the pools they were captured on, so every call used to allocate its pools and capture its
decode graphs again (about 1 ms per token over 128 new tokens of an 8B model: a chat loop pays
it every turn). When a cache the runtime created dies (``generate`` returned and nothing holds
it), it leaves its pools, graphs, graph memory pool and bad-write flag here, and the next cache
created for the same model takes them: same shapes, same graphs, no capture.

What a graph bakes besides the pools is the model's weights, so the leftovers are taken only
while every parameter and buffer of the decoder is the tensor it was when the pools were
allocated and when each graph was captured (same address, dtype and shape): ``model.to(...)``,
``model.half()`` or swapped modules, even while the cache was still held, drop them. In-place
weight updates keep the addresses and the graphs read the new values. A cache the user still
holds (``return_dict_in_generate=True``) leaves nothing, and a shallow copy of a cache turns the
hand-over off for both, so no two live caches ever share pools.

The price: between calls the last cache's pools and the graphs' memory stay allocated on the
device. ``model.sawquant_release()`` frees them (and ``unpatch``); ``cuda_graphs=False`` turns
graphs and this reuse off.
"""

from __future__ import annotations

import atexit
import itertools
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from sawquant.runtime.layer import LayerKV

__all__ = ["CacheReuse", "Leftovers"]


@dataclass
class Leftovers:
    """What a dead cache leaves: the graphs are only valid with exactly these tensors."""

    kvs: list[LayerKV | None]  # one per layer (pools of both sides)
    weights: tuple | None  # the decoder's tensors at allocation and every capture (None: mixed)
    num_pages: int
    page_size: int
    device: torch.device
    graphs: dict  # key -> captured step (sawquant.runtime.hf.graphs)
    graph_pool: Any  # the memory pool those graphs share
    bad_write: torch.Tensor | None  # the flag the captured writes set


def _release(ref: weakref.ref) -> None:
    reuse = ref()
    if reuse is not None:
        reuse.release()


def _fingerprint(module: torch.nn.Module) -> tuple:
    tensors = itertools.chain(module.parameters(), module.buffers())
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.device) for t in tensors)


class CacheReuse:
    """One model's spare leftovers: at most one set, the last cache to die (the likeliest to
    match the model as it is now)."""

    def __init__(self, decoder: torch.nn.Module):
        self._decoder = weakref.ref(decoder)  # (the decoder holds the patch state, which holds us)
        self.spare: Leftovers | None = None
        self.reused = 0  # how many caches took leftovers (tests and benchmarks read it)
        # Free the spare graphs at exit while CUDA is still up, not in module teardown order.
        atexit.register(_release, weakref.ref(self))

    def fingerprint(self) -> tuple | None:
        """The decoder's parameters and buffers as tensors (address, dtype, shape, device)."""
        decoder = self._decoder()
        return None if decoder is None else _fingerprint(decoder)

    def give(self, leftovers: Leftovers) -> None:
        if leftovers.weights is None or not any(kv is not None for kv in leftovers.kvs):
            return  # nothing allocated, or graphs captured with other weights: just freed
        self.spare = leftovers

    def take(self, device: torch.device, page_size: int) -> Leftovers | None:
        """The spare leftovers if they fit a new cache on ``device`` with ``page_size`` pages
        and the decoder still has the tensors they were made with; handed over once."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        if spare.device != torch.device(device) or spare.page_size != page_size:
            return None
        if spare.weights != self.fingerprint():
            return None  # the model moved or changed: its graphs would read stale weights
        if spare.bad_write is not None:
            spare.bad_write.zero_()  # the dead cache's problem was its own
        self.reused += 1
        return spare

    def release(self) -> None:
        """Drop the spare leftovers (their device memory is freed)."""
        self.spare = None
