"""A minimal continuous-batching engine over sawquant's paged cache, for wall-clock serving
benchmarks (a benchmark harness, not a serving engine: greedy, one prefill at a time).

Requests wait in a queue; the engine admits one when the KV memory holds its prompt and its
new tokens, prefills it alone (prefill first, as common engines do by default), and otherwise
runs one decode step for every running request together. A request leaves after its last
token and its pages return to the free list, so the batch changes from step to step: real
prefills, real decode steps, the clock on the wall.

The transformers model is patched as a user would patch it; only planning changes hands:
:class:`ServingCache` takes each step's slots, lengths and block table from the engine's block
manager instead of its own page table (which knows only fixed batches). Decode batches are
padded to a power of two (padding rows write into a reserved scratch page and read one token),
so CUDA graphs are captured per bucket, as engines do, not per batch size.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from sawquant.config import KVConfig
from sawquant.runtime import SawquantCache
from sawquant.runtime.hf.compat import cache_kwargs
from sawquant.runtime.pages import StepPlan

__all__ = ["Engine", "Request", "ServingCache", "summarize"]

SCRATCH_PAGE = 0  # padding rows of a decode batch write and read here


class ServingCache(SawquantCache):
    """A fixed pool of pages whose steps are planned by the engine (:meth:`set_step`)."""

    def __init__(self, config: KVConfig, *, page_size: int, num_pages: int):
        super().__init__(config, page_size=page_size, num_pages=num_pages, grow=False)

    def set_step(self, plan: StepPlan) -> None:
        self._plan = plan
        for layer in self.layers:  # what transformers reads as tokens seen (0: a prefill)
            layer.seen = plan.past

    def prepare_step(self, length: int, **where) -> StepPlan:
        self.check_storable()
        if self._plan is None or self._plan.length != length or self._plan.done:
            raise RuntimeError("ServingCache: the engine must set_step() before each forward")
        return self._plan


@dataclass(eq=False)  # identity: requests are removed from lists by `is`, never by value
class Request:
    prompt: torch.Tensor  # [P] token ids
    new_tokens: int
    arrival_s: float = 0.0
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # wall clock of each new token
    pages: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:  # tokens in the cache
        return self.prompt.numel() + len(self.tokens) - 1 if self.tokens else 0


class Engine:
    """Serve requests through ``model`` (patched with the cache's config) in ``num_pages``
    pages of ``page_size`` tokens; ``max_len`` bounds prompt + new tokens of any request."""

    def __init__(self, model, config: KVConfig, *, num_pages: int, page_size: int, max_len: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.page_size = page_size
        self.cols = -(-max_len // page_size)
        self.cache = ServingCache(config, page_size=page_size, num_pages=num_pages)
        self.free = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # pop() -> lowest id
        self.steps = {"prefill": 0, "decode": 0}

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def fits(self, req: Request) -> bool:
        return self.pages_for(req.prompt.numel() + req.new_tokens) <= len(self.free)

    def _table(self, rows: list[list[int]]) -> torch.Tensor:
        table = torch.full((len(rows), self.cols), SCRATCH_PAGE, dtype=torch.int32)
        for i, pages in enumerate(rows):
            table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return table

    def _logits(self, ids, positions) -> torch.Tensor:
        out = self.model(
            input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
            **cache_kwargs(self.model, self.cache),
        )  # fmt: skip
        return out.logits[:, -1]

    def prefill(self, req: Request, clock) -> None:
        p = req.prompt.numel()
        req.pages = [self.free.pop() for _ in range(self.pages_for(p + req.new_tokens))]
        pos = torch.arange(p)
        pages = torch.tensor(req.pages)[pos // self.page_size]
        dev = self.device
        self.cache.set_step(
            StepPlan(
                past=0,
                length=p,
                slots=(pages * self.page_size + pos % self.page_size).to(dev),
                cached_lens=torch.zeros(1, dtype=torch.int32, device=dev),
                seq_lens=torch.tensor([p], dtype=torch.int32, device=dev),
                block_table=self._table([req.pages]).to(dev),
            )  # fmt: skip
        )
        logits = self._logits(req.prompt[None].to(dev), pos[None].to(dev))
        req.tokens.append(int(logits.argmax(-1)[0]))
        req.token_times.append(clock())
        self.steps["prefill"] += 1

    def decode(self, running: list[Request], clock) -> None:
        b = len(running)
        bucket = 1 << (b - 1).bit_length()
        lens = [r.length for r in running] + [0] * (bucket - b)  # tokens before this step
        ids = [r.tokens[-1] for r in running] + [0] * (bucket - b)
        rows = [r.pages for r in running] + [[SCRATCH_PAGE]] * (bucket - b)
        lens_t = torch.tensor(lens)
        page = torch.tensor([pages[n // self.page_size] for pages, n in zip(rows, lens)])
        dev = self.device
        self.cache.set_step(
            StepPlan(
                past=max(lens) or 1,
                length=1,  # past > 0: a decode step for the runtime
                slots=(page * self.page_size + lens_t % self.page_size).to(dev),
                cached_lens=lens_t.to(dev, torch.int32),
                seq_lens=(lens_t + 1).to(dev, torch.int32),
                block_table=self._table(rows).to(dev),
            )  # fmt: skip
        )
        ids_t = torch.tensor(ids, device=dev)[:, None]
        logits = self._logits(ids_t, lens_t[:, None].to(dev))
        now = clock()
        for r, token in zip(running, logits[:b].argmax(-1).tolist()):
            r.tokens.append(token)
            r.token_times.append(now)
        self.steps["decode"] += 1

    def release(self, req: Request) -> None:
        self.free.extend(req.pages)
        req.pages = []

    def serve(self, requests: list[Request]) -> float:
        """Serve every request (all arrive at time 0); returns the makespan in seconds."""
        waiting, running = list(requests), []
        start = time.perf_counter()

        def clock() -> float:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return time.perf_counter() - start

        with torch.no_grad():
            while waiting or running:
                if waiting and self.fits(waiting[0]):
                    req = waiting.pop(0)
                    self.prefill(req, clock)
                    running.append(req)
                elif running:
                    self.decode(running, clock)
                else:
                    raise RuntimeError("a request does not fit in the KV memory at all")
                for req in [r for r in running if len(r.tokens) >= r.new_tokens]:
                    running.remove(req)
                    self.release(req)
        return clock()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(requests: list[Request], makespan: float) -> dict:
    """Wall-clock figures: tokens/s, TTFT and inter-token latency (p50 / p99 / mean)."""
    ttft = [r.token_times[0] - r.arrival_s for r in requests]
    itl = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:])]
    tokens = sum(len(r.tokens) for r in requests)
    return {
        "requests": len(requests),
        "tokens_per_s": tokens / makespan,
        "makespan_s": makespan,
        "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p99_s": _pct(ttft, 0.99),
        "itl_p50_ms": 1000 * _pct(itl, 0.5) if itl else 0.0,
        "itl_p99_ms": 1000 * _pct(itl, 0.99) if itl else 0.0,
        "itl_mean_ms": 1000 * statistics.mean(itl) if itl else 0.0,
    }
