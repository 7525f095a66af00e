"""Hand a finished cache's pools and captured decode graphs to the next ``generate`` call.

Each ``generate`` call gets a fresh :class:`SawquantCache`, and CUDA graphs bake the addresses
of the pools they were captured on, so every call used to allocate its pools and capture its
decode graphs again (about 1 ms per token over 128 new tokens of an 8B model: a chat loop pays
it every turn). When a cache the runtime created dies (``generate`` returned and nothing holds
it), it leaves its pools, graphs, graph memory pool and bad-write flag here, and the next cache
created for the same model takes them: same shapes, same graphs, no capture.

What a graph bakes besides the pools is the model's weights, so the leftovers are taken only
while every parameter and buffer of the decoder is the tensor it was (same address, dtype and
shape): ``model.to(...)``, ``model.half()`` or swapped modules drop them. In-place weight
updates keep the addresses and the graphs read the new values. A cache the user still holds
(``return_dict_in_generate=True``) leaves nothing, so no two caches ever share pools.

The price: between calls the last cache's pools and the graphs' memory stay allocated on the
device. ``model.sawquant_release()`` frees them (and ``unpatch``); ``cuda_graphs=False`` turns
graphs and this reuse off.
"""

from __future__ import annotations

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
    num_pages: int
    page_size: int
    device: torch.device
    graphs: dict  # key -> captured step (sawquant.runtime.hf.graphs)
    graph_pool: Any  # the memory pool those graphs share
    bad_write: torch.Tensor | None  # the flag the captured writes set


def _fingerprint(module: torch.nn.Module) -> tuple:
    tensors = itertools.chain(module.parameters(), module.buffers())
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.device) for t in tensors)


class CacheReuse:
    """One model's spare leftovers (at most one set: the largest pools win)."""

    def __init__(self, decoder: torch.nn.Module):
        self._decoder = weakref.ref(decoder)  # (the decoder holds the patch state, which holds us)
        self.spare: Leftovers | None = None
        self._weights: tuple | None = None  # the decoder's tensors when the spare was left
        self.reused = 0  # how many caches took leftovers (tests and benchmarks read it)

    def give(self, leftovers: Leftovers) -> None:
        if not any(kv is not None for kv in leftovers.kvs):
            return  # nothing was allocated
        if self.spare is not None and self.spare.num_pages > leftovers.num_pages:
            return  # keep the larger pools; these are freed with their cache
        decoder = self._decoder()
        if decoder is None:
            return
        self.spare, self._weights = leftovers, _fingerprint(decoder)

    def take(self, device: torch.device, page_size: int) -> Leftovers | None:
        """The spare leftovers if they fit a new cache on ``device`` with ``page_size`` pages
        and the decoder still has the same tensors; they are handed over once."""
        spare, weights = self.spare, self._weights
        self.spare = self._weights = None
        decoder = self._decoder()
        if spare is None or decoder is None:
            return None
        if spare.device != torch.device(device) or spare.page_size != page_size:
            return None
        if weights != _fingerprint(decoder):
            return None  # the model moved or changed: its graphs would read stale weights
        if spare.bad_write is not None:
            spare.bad_write.zero_()  # the dead cache's problem was its own
        self.reused += 1
        return spare

    def release(self) -> None:
        """Drop the spare leftovers (their device memory is freed)."""
        self.spare = self._weights = None
