"""The serving benchmark's continuous-batching engine (benchmarks/batching.py) serves every
request exactly as ``generate`` serves it alone: requests queue for pages, join and leave the
decode batch, padded batches write into the scratch page; greedy tokens must not change. Its
wall-clock numbers are only worth quoting if this holds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _builders import tiny_causal_lm

from sawquant.config import KVConfig, ModelFacts, SideConfig
from sawquant.runtime import patch
from sawquant.runtime.hf.patch import install_graphs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
batching = pytest.importorskip("batching")


def _model(graphs: bool):
    model = tiny_causal_lm("Qwen3", seed=0, head_dim=16)
    facts = ModelFacts(2, 2, 16, "qwen3")
    k = SideConfig(rotation_block=16, sign_seed=0, fallback_heads={1: 8})
    patch(model, KVConfig.uniform(facts, k=k, v=SideConfig(rotation_block=16)))
    if graphs:
        install_graphs(model._sawquant_state, model.model, simulate=True)
    return model


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_continuous_batching_serves_each_request_as_generate_alone(graphs):
    gen = torch.Generator().manual_seed(4)
    shapes = [(9, 6), (3, 9), (14, 4), (5, 7), (11, 5), (6, 8)]  # (prompt, new tokens)
    reqs = [batching.Request(torch.randint(0, 128, (p,), generator=gen), n) for p, n in shapes]
    model = _model(graphs)
    # 12 pages of 4 tokens: at most two or three requests at once, the rest queue.
    engine = batching.Engine(model, model.sawquant_config, num_pages=12, page_size=4, max_len=20)
    makespan = engine.serve(reqs)
    assert engine.steps["prefill"] == len(reqs)
    assert sorted(engine.free) == list(range(1, 12))  # every page back, the scratch page kept
    alone = _model(False)
    for req in reqs:
        with torch.no_grad():
            ids = req.prompt[None]
            out = alone.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=req.new_tokens,
                min_new_tokens=req.new_tokens, do_sample=False, pad_token_id=0,
            )  # fmt: skip
        assert req.tokens == out[0, req.prompt.numel() :].tolist()
    if graphs:
        assert engine.cache.calls["graph_replay"] == engine.steps["decode"]
    stats = batching.summarize(reqs, makespan)
    assert stats["requests"] == 6 and stats["tokens_per_s"] > 0
    assert stats["ttft_p50_s"] <= stats["ttft_p99_s"] <= makespan
