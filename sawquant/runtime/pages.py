"""The page allocator of sawquant's own runtime: which pages each sequence owns, and where each
step's new tokens go. No engine import: the transformers adapter drives it (a serving engine
such as vLLM brings its own block manager and passes block tables and slots directly).

Bookkeeping lives on the CPU (lengths, owned pages, the block table, the free list); each step
produces a :class:`StepPlan` with the device tensors every layer of that step uses. Left-padding
columns of a batched prompt (0 in the 2D attention mask) get slot -1 and are never stored, so
every sequence keeps its own length and the kernels' ``seq_lens`` do the masking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sawquant.errors import SawquantError

__all__ = ["CacheFullError", "PageTable", "StepPlan"]


class CacheFullError(SawquantError):
    """The fixed-size KV cache has no free page left."""


@dataclass
class StepPlan:
    """Where one forward step's tokens go, shared by every layer of that step."""

    past: int  # logical tokens before this step (pad columns included)
    length: int  # T, new tokens per sequence in this step
    slots: torch.Tensor  # [B * T] int64, -1 = padding (not stored)
    cached_lens: torch.Tensor  # [B] int32, tokens stored before this step
    seq_lens: torch.Tensor  # [B] int32, tokens stored after this step
    block_table: torch.Tensor  # [B, max_pages] int32
    # Some of this step's tokens are padding (not stored): its chunk is not contiguous in the
    # pages, so attention cannot read it back from them (host-side; decode steps never are).
    padded: bool = False
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
                self.padded,
            )
        return self._moved[key]


class PageTable:
    """Pages of a batch of sequences. ``grow(new_num_pages)`` is called when more pages are
    needed (the caller reallocates its pools); ``grow=None`` keeps the page count fixed and a
    step that needs more raises CacheFullError."""

    def __init__(
        self,
        *,
        page_size: int,
        num_pages: int = 0,
        grow: Callable[[int], None] | None = None,
    ):
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self.page_size = page_size
        self.num_pages = int(num_pages)
        self._grow = grow
        self.reset()

    def reset(self) -> None:
        """Forget every sequence (pages return to the free list)."""
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))  # pop() -> lowest id
        self.device: torch.device | None = None
        self.lens: torch.Tensor | None = None  # [B] int64: tokens stored per sequence
        self.owned: torch.Tensor | None = None  # [B] int64: pages owned per sequence
        self.table: torch.Tensor | None = None  # [B, cols] int32 block table
        self._table_dev: torch.Tensor | None = None  # device copy, refreshed on change
        self.planned = 0  # logical tokens covered by plans so far

    @property
    def batch_size(self) -> int:
        return -1 if self.lens is None else int(self.lens.shape[0])

    def free_pages(self) -> int:
        return len(self._free)

    def plan(
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
        if self.lens is None:
            self.device = torch.device(device)
            self.lens = torch.zeros(batch_size, dtype=torch.int64)
            self.owned = torch.zeros(batch_size, dtype=torch.int64)
            self.table = torch.zeros(batch_size, 0, dtype=torch.int32)
        elif batch_size != self.lens.shape[0]:
            raise SawquantError(
                f"the cache holds {self.lens.shape[0]} sequences but the input has {batch_size}; "
                "start a new cache for a different batch"
            )
        real = None
        if (
            attention_mask is not None
            and attention_mask.dim() == 2
            and length > 1
            and attention_mask.shape[-1] == self.planned + length
        ):
            real = attention_mask[:, -length:].to("cpu", torch.bool)  # [B, T]
            if bool(real.all()):
                real = None
        if real is None:
            new_lens = self.lens + length
            pos = self.lens[:, None] + torch.arange(length)  # [B, T]
        else:
            new_lens = self.lens + real.sum(1)
            pos = self.lens[:, None] + real.long().cumsum(1) - 1
        changed = self._ensure_pages(new_lens)
        ps = self.page_size
        pos = pos.clamp(min=0)
        pages = self.table.long().gather(1, pos // ps)  # [B, T]
        slots = pages * ps + pos % ps
        if real is not None:
            slots[~real] = -1
        if changed or self._table_dev is None:
            self._table_dev = self.table.to(self.device)
        dev = self.device
        plan = StepPlan(
            past=self.planned,
            length=length,
            slots=slots.reshape(-1).to(dev),
            cached_lens=self.lens.to(dev, torch.int32),
            seq_lens=new_lens.to(dev, torch.int32),
            block_table=self._table_dev,
            padded=real is not None,
        )
        self.lens = new_lens
        self.planned += length
        return plan

    def _ensure_pages(self, new_lens: torch.Tensor) -> bool:
        """Give every sequence the pages ``new_lens`` needs; True if the block table changed."""
        need = (new_lens + self.page_size - 1) // self.page_size
        short = need - self.owned
        missing = int(short.clamp(min=0).sum())
        if missing == 0:
            return False
        if missing > len(self._free):
            self._add_pages(missing - len(self._free), batch=int(new_lens.shape[0]))
        cols = int(need.max())
        if cols > self.table.shape[1]:
            grow_to = max(cols, 2 * self.table.shape[1])
            pad = torch.zeros(self.table.shape[0], grow_to - self.table.shape[1])
            self.table = torch.cat([self.table, pad.to(torch.int32)], dim=1)
        for b in torch.nonzero(short > 0).flatten().tolist():
            have, want = int(self.owned[b]), int(need[b])
            ids = [self._free.pop() for _ in range(want - have)]
            self.table[b, have:want] = torch.tensor(ids, dtype=torch.int32)
            self.owned[b] = want
        return True

    def _add_pages(self, extra: int, *, batch: int) -> None:
        if self._grow is None:
            raise CacheFullError(
                f"KV cache full: {extra} more page(s) of {self.page_size} tokens needed, "
                f"{self.num_pages} allocated; raise the KV memory budget or lower the batch"
            )
        # Doubling keeps the total copy cost linear; the headroom avoids regrowing every step.
        old = self.num_pages
        new = max(2 * old, old + extra + batch * max(1, 128 // self.page_size))
        self._grow(new)
        self._free = list(range(new - 1, old - 1, -1)) + self._free
        self.num_pages = new

    def reorder(self, beam_idx: torch.Tensor) -> tuple[list[int], list[int]] | None:
        """Beam search: sequence b continues what sequence ``beam_idx[b]`` holds.

        Every kept sequence gets fresh pages; returns ``(src, dst)`` page lists the caller
        copies (all layers, all pools) before the old pages are reused, or None when nothing
        moves. Simple and always correct, at the cost of one copy per beam step.
        """
        if self.lens is None:
            return None
        idx = beam_idx.to("cpu", torch.int64)
        if torch.equal(idx, torch.arange(idx.shape[0])):
            return None
        owned = self.owned[idx]
        missing = int(owned.sum()) - len(self._free)
        if missing > 0:
            self._add_pages(missing, batch=int(idx.shape[0]))
        old_table, old_owned = self.table, self.owned
        table = torch.zeros_like(old_table)
        src, dst = [], []
        for b, n in enumerate(owned.tolist()):
            ids = [self._free.pop() for _ in range(n)]
            table[b, :n] = torch.tensor(ids, dtype=torch.int32)
            src += old_table[idx[b], :n].tolist()
            dst += ids
        for b, n in enumerate(old_owned.tolist()):
            self._free.extend(old_table[b, :n].tolist())
        self.table, self.owned, self.lens = table, owned, self.lens[idx]
        self._table_dev = self.table.to(self.device)
        return src, dst
