"""Measure a checkpoint through vLLM: engines for the three caches verify compares, teacher-forced
scoring with prompt log-probs, and the count of layer calls sawquant served.

Needs vLLM installed (imports it on use). Scripts that build engines need an
``if __name__ == "__main__"`` guard: vLLM spawns its engine processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["MODES", "PromptScores", "engine", "prompt_scores", "served_calls"]

# What each mode serves: the checkpoint's sawquant cache, the same weights with vLLM's own
# full-precision cache (the sawquant config hidden from the plugin), and vLLM's FP8 cache.
MODES = ("sawquant", "full", "fp8")


def engine(
    path: str,
    mode: str = "sawquant",
    *,
    dtype: str = "float32",
    max_model_len: int = 1024,
    block_size: int = 32,
    kv_cache_bytes: int = 64 << 20,
    max_num_batched_tokens: int | None = None,
    max_num_seqs: int = 8,
    **kwargs: Any,
):
    """A vLLM ``LLM`` on ``path`` serving ``mode``'s cache (eager, seeded, a fixed KV size)."""
    from vllm import LLM

    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    options: dict[str, Any] = dict(
        model=str(path), enforce_eager=True, dtype=dtype, max_model_len=max_model_len,
        block_size=block_size, kv_cache_memory_bytes=kv_cache_bytes, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens or max(max_model_len, 256), seed=0,
    )  # fmt: skip
    if mode != "sawquant":
        options["hf_overrides"] = {"kv_cache_quantization": None}
    if mode == "fp8":
        options["kv_cache_dtype"] = "fp8"
    options.update(kwargs)
    return LLM(**options)


@dataclass
class PromptScores:
    """Teacher-forced scores of every window's positions ``start..L-1`` (each predicted from all
    tokens before it, in one prompt)."""

    nll: list[list[float]]  # per window, per scored position: -log p(actual token)
    top1: list[list[int]]  # per window, per scored position: the engine's most likely token

    @property
    def positions(self) -> int:
        return sum(len(w) for w in self.nll)

    @property
    def ppl(self) -> float:
        return math.exp(sum(map(sum, self.nll)) / self.positions)

    def window_ppls(self) -> list[float]:
        return [math.exp(sum(w) / len(w)) for w in self.nll]

    def agreement(self, other: PromptScores) -> float:
        """Share of positions where both engines' most likely next tokens agree."""
        same = sum(a == b for x, y in zip(self.top1, other.top1) for a, b in zip(x, y))
        return same / self.positions


def prompt_scores(llm, windows: list[list[int]], start: int) -> PromptScores:
    """Score ``windows`` (token ids) through ``llm``: positions ``start..L-1`` of each."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    prompts = [{"prompt_token_ids": list(map(int, w))} for w in windows]
    outs = llm.generate(prompts, params, use_tqdm=False)
    nll, top1 = [], []
    for out, ids in zip(outs, windows):
        rows_nll, rows_top = [], []
        for j in range(max(start, 1), len(ids)):
            entry = out.prompt_logprobs[j]  # {token: Logprob}: the actual one and the top-1
            rows_nll.append(-entry[int(ids[j])].logprob)
            rows_top.append(next(t for t, lp in entry.items() if lp.rank == 1))
        nll.append(rows_nll)
        top1.append(rows_top)
    return PromptScores(nll, top1)


def served_calls(llm) -> dict[str, int]:
    """Layer calls sawquant served so far, summed over the workers: writes, decode rows and
    prefill requests (all zero when the engine does not run sawquant's backend)."""
    total = {"write": 0, "decode": 0, "prefill": 0}
    for calls in llm.collective_rpc("sawquant_calls"):
        for key, value in calls.items():
            total[key] += value
    return total
