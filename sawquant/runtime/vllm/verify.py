"""``sawquant verify OUT --engine vllm``: the accuracy report measured through vLLM.

The same held-out windows as the transformers verify, teacher-forced through three vLLM engines
on the same weights: the checkpoint's sawquant cache, vLLM's own full-precision cache (the
sawquant config hidden from the plugin) and vLLM's FP8 cache for comparison. Every position of
every window after the first is scored from its prompt log-probs (each attention reading K/V
as the cache stores them). Also reports how many KV tokens each cache fits in the same memory
and the layer calls sawquant served (the proof its path ran). Needs vLLM installed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sawquant.accuracy import ppl_increase_with_ci
from sawquant.errors import InputError, RuntimeBypassError

__all__ = ["VllmReport", "verify_vllm"]

Progress = Callable[[str, int, int], None]


@dataclass
class VllmReport:
    model: str
    data: str
    windows: int
    seq_len: int
    dtype: str
    kv_cache_bytes: int
    rows: dict[str, dict[str, Any]]  # mode -> ppl, increase %, CI, top-1 vs full, KV tokens
    served_calls: dict[str, int]
    max_ppl_increase_pct: float
    ppl_increase_pct: float
    passed: bool
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": "vllm", **self.__dict__}


def verify_vllm(
    model_path: str | Path,
    *,
    data: str | Path = "demo",
    tokens: int = 16 * 1024,
    seq_len: int = 1024,
    dtype: str = "auto",
    kv_cache_bytes: int = 256 << 20,
    max_ppl_increase: float = 5.0,
    progress: Progress | None = None,
) -> VllmReport:
    """Score ``model_path`` (a sawquant export) through vLLM; see the module doc."""
    from transformers import AutoTokenizer

    from sawquant.checkpoint import read_kv_config
    from sawquant.runtime.vllm.score import MODES, engine, prompt_scores, served_calls
    from sawquant.verify import held_out_text, held_out_windows

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json; pass a checkpoint directory from export")
    if read_kv_config(path) is None:
        raise InputError(
            f"{path} is not a sawquant export (no KV config in it); export it first with "
            f"`sawquant export MODEL -c calibration.json -o OUT`"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    text, label = held_out_text(data)
    windows = held_out_windows(tokenizer, text, tokens=tokens, seq_len=seq_len).tolist()
    scores, capacity, seconds, calls = {}, {}, {}, {}
    for i, mode in enumerate(MODES):
        if progress is not None:
            progress("vllm", i, len(MODES))
        t0 = time.perf_counter()
        llm = engine(
            path, mode, dtype=dtype, max_model_len=seq_len + 8, kv_cache_bytes=kv_cache_bytes,
            max_num_batched_tokens=max(seq_len, 512),
        )  # fmt: skip
        try:
            scores[mode] = prompt_scores(llm, windows, 1)
            capacity[mode] = int(llm.llm_engine.vllm_config.cache_config.num_gpu_blocks or 0)
            capacity[mode] *= llm.llm_engine.vllm_config.cache_config.block_size
            if mode == "sawquant":
                calls = served_calls(llm)
            if dtype == "auto":
                dtype = str(llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
        seconds[mode] = time.perf_counter() - t0
    if progress is not None:
        progress("vllm", len(MODES), len(MODES))
    num_layers = read_kv_config(path).model.num_layers
    if calls.get("prefill", 0) < len(windows) * num_layers:
        raise RuntimeBypassError(
            f"vLLM served {calls.get('prefill', 0)} sawquant prefill calls for {len(windows)} "
            f"windows x {num_layers} layers: its INT4 path did not run (is the plugin installed "
            "in this environment?)"
        )
    per_window = {m: torch.tensor([sum(w) for w in s.nll], dtype=torch.float64)
                  for m, s in scores.items()}  # fmt: skip
    rows = {}
    for mode, s in scores.items():
        row: dict[str, Any] = {"ppl": s.ppl, "kv_tokens": capacity[mode]}
        if mode != "full":
            inc, ci = ppl_increase_with_ci(per_window["full"], per_window[mode], seq_len - 1)
            row.update(ppl_increase_pct=inc, ppl_increase_ci95=ci,
                       top1_agreement=s.agreement(scores["full"]))  # fmt: skip
        rows[mode] = row
    increase = rows["sawquant"]["ppl_increase_pct"]
    return VllmReport(
        model=str(path), data=label, windows=len(windows), seq_len=seq_len, dtype=dtype,
        kv_cache_bytes=kv_cache_bytes, rows=rows, served_calls=calls,
        max_ppl_increase_pct=max_ppl_increase, ppl_increase_pct=increase,
        passed=increase <= max_ppl_increase, seconds=seconds,
    )  # fmt: skip
