"""verify: recovery math, the verdict, baselines, the runtime scorer and the report shape.

The runtime scorer is tested on a tiny random Llama with stand-in "runtimes" (a no-op patch
must score exactly like full precision; a patch that breaks attention must be caught), so these
tests do not depend on the runtime's speed; the real runtime runs in the end-to-end tests.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from sawquant.config import KVConfig, ModelFacts
from sawquant.errors import InputError
from sawquant.verify import (
    VerifyReport,
    fixed_config,
    naive_config,
    recovery,
    runtime_scores,
    verdict,
)

FACTS = ModelFacts(num_layers=2, num_kv_heads=2, head_dim=16, model_type="llama")


def test_recovery_is_the_share_of_naive_loss_won_back():
    assert recovery(10.0, 11.0, 10.25) == pytest.approx(0.75)
    assert recovery(10.0, 11.0, 11.0) == pytest.approx(0.0)
    assert recovery(10.0, 11.0, 10.0) == pytest.approx(1.0)
    assert recovery(10.0, 11.0, 11.5) == pytest.approx(-0.5)  # worse than naive: negative
    # Nothing to recover when naive INT4 loses nothing: pass unless the config is worse.
    assert recovery(10.0, 10.0, 10.0) == 1.0
    assert recovery(10.0, 10.0, 10.5) == 0.0


def test_verdict_names_each_failed_check():
    ok = verdict(ppl_increase_pct=1.0, recovery_=0.6, max_ppl_increase=5, min_recovery=40)
    assert ok == []
    both = verdict(ppl_increase_pct=9.0, recovery_=0.1, max_ppl_increase=5, min_recovery=40)
    assert len(both) == 2 and "9.00%" in both[0] and "10.0%" in both[1]
    nan = verdict(ppl_increase_pct=math.nan, recovery_=0.6, max_ppl_increase=5, min_recovery=40)
    assert len(nan) == 1  # a NaN perplexity never passes


def test_baselines_match_their_definitions():
    naive = naive_config(FACTS)
    assert all(
        (lc.k.rotation_block, lc.v.rotation_block, lc.k.bits, lc.v.bits) == (1, 1, 4, 4)
        for lc in naive.layers
    )
    assert not any(lc.k.fallback_heads or lc.v.fallback_heads for lc in naive.layers)
    fixed = fixed_config(FACTS)
    assert {(lc.k.rotation_block, lc.v.rotation_block) for lc in fixed.layers} == {(16, 1)}
    # head_dim 80 is no power of two: the largest supported block that divides it.
    odd = fixed_config(ModelFacts(num_layers=1, num_kv_heads=1, head_dim=80))
    assert odd.layers[0].k.rotation_block == 16
    assert naive.average_bits() == pytest.approx(4 + 32 / 16)  # fp16 scale + zero per 16


def _windows(n: int, length: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (n, length), generator=gen)


def test_runtime_scores_of_a_no_op_runtime_equal_full_precision(tiny_llama):
    windows = _windows(3, 40, tiny_llama.config.vocab_size)
    calls = []
    both = runtime_scores(
        tiny_llama,
        windows,
        prefix=20,
        patches={"a": lambda m: calls.append("a"), "b": lambda m: calls.append("b")},
        unpatch=lambda m: calls.append("unpatch"),
        batch_size=2,
    )
    print(both)
    scores = both["a"]
    assert both["b"] == scores
    assert scores.positions == 3 * (40 - 20 - 1)
    assert scores.ppl == pytest.approx(scores.ppl_full, rel=1e-5)
    assert scores.kl < 1e-6
    assert scores.top1_agreement == 1.0
    assert calls == ["a", "unpatch", "b", "unpatch"] * 2  # two batches, always unpatched
    # The reference forward also yields the simulated full-precision perplexity.
    from sawquant.simulate import simulated_perplexity

    assert scores.ppl_full_windows == pytest.approx(
        simulated_perplexity(tiny_llama, windows, None), rel=1e-6
    )


@pytest.fixture
def sharp_llama():
    """A random Llama with larger weights (init 0.1): next-token distributions far from uniform."""
    from _builders import tiny_causal_lm

    return tiny_causal_lm("Llama", initializer_range=0.1)


def test_runtime_scores_catch_a_runtime_that_breaks_attention(sharp_llama):
    """A 'runtime' that corrupts the keys must show up in KL, agreement and perplexity."""
    windows = _windows(2, 40, sharp_llama.config.vocab_size)
    k_proj = sharp_llama.model.layers[0].self_attn.k_proj
    saved = k_proj.weight.detach().clone()

    def corrupt(model):
        with torch.no_grad():
            k_proj.weight.mul_(-3.0)

    def restore(model):
        with torch.no_grad():
            k_proj.weight.copy_(saved)

    scores = runtime_scores(
        sharp_llama, windows, prefix=10, patches={"x": corrupt}, unpatch=restore
    )["x"]
    print(scores)
    assert torch.equal(k_proj.weight, saved)  # unpatched after scoring
    assert scores.kl > 0.05  # measured 0.46
    assert scores.top1_agreement < 0.5  # measured 0.07
    assert scores.ppl != pytest.approx(scores.ppl_full, rel=1e-3)


def test_runtime_scores_reject_a_prefix_that_leaves_nothing_to_decode(tiny_llama):
    windows = _windows(1, 10, tiny_llama.config.vocab_size)
    with pytest.raises(InputError, match="prefix 9"):
        runtime_scores(tiny_llama, windows, prefix=9, patches={}, unpatch=lambda m: None)


def test_report_has_exactly_the_documented_keys():
    report = VerifyReport(
        model="m",
        tokens=1024,
        simulated={
            "full": {"ppl": 10.0},
            "naive_int4": {"ppl": 11.0},
            "saw_fixed": {"ppl": 10.5},
            "sawquant": {"ppl": 10.3, "avg_bits": 4.5},
        },
        runtime={
            "full": {"ppl": 9.0},
            "sawquant": {"ppl": 9.2, "kl": 0.01, "top1_agreement": 0.95, "decode_calls": 508},
        },
        recovery=0.7,
        passed=True,
        ppl_increase_pct=2.2,
        max_ppl_increase_pct=5.0,
        min_recovery_pct=40.0,
        windows=2,
        seq_len=512,
        prefix=384,
        scored_positions=254,
        data="demo",
        config_source="checkpoint",
        config_summary={"avg_bits": 4.5},
        device="cpu",
    )
    d = json.loads(json.dumps(report.to_dict()))
    required = {"model", "tokens", "simulated", "runtime", "recovery", "passed"}
    assert required <= set(d)
    assert set(d["simulated"]) == {"full", "naive_int4", "saw_fixed", "sawquant"}
    assert set(d["simulated"]["sawquant"]) == {"ppl", "avg_bits"}
    assert set(d["runtime"]) == {"full", "sawquant"}
    assert set(d["runtime"]["sawquant"]) == {"ppl", "kl", "top1_agreement", "decode_calls"}
    assert isinstance(d["passed"], bool) and isinstance(d["tokens"], int)


def test_naive_config_round_trips_through_json():
    cfg = naive_config(FACTS)
    assert KVConfig.from_json(cfg.to_json()) == cfg


# -- the demo, end to end ---------------------------------------------------------------------
def _read_keys_with_another_rotation(monkeypatch) -> None:
    """Plant the failure a config/runtime mismatch at load produces: the decode path rotates
    the query (and reads the keys) with a different rotation than the keys were written with."""
    import dataclasses

    from sawquant.runtime import dispatch

    real = dispatch.decode_attention

    def wrong(q, layer, block_table, seq_lens, **kwargs):
        other = 16 if layer.k.block != 16 else 64
        k_wrong = dataclasses.replace(layer.k, block=other, signs=None)
        return real(q, dataclasses.replace(layer, k=k_wrong), block_table, seq_lens, **kwargs)

    monkeypatch.setattr(dispatch, "decode_attention", wrong)


@pytest.mark.slow
def test_demo_passes_and_a_wrong_runtime_rotation_fails(monkeypatch, tmp_path):
    """The calibrated demo export passes with the default thresholds, its runtime perplexity
    lies between full precision and naive INT4, and the same checkpoint fails (exit 1) once
    the runtime reads keys with the wrong rotation."""
    from click.testing import CliRunner

    from sawquant.cli.main import cli
    from sawquant.verify import demo_export, verify

    path = demo_export()  # built once per cache (calibration), then reused
    report = verify(path, tokens=1024, seq_len=512, prefix=384)
    d = report.to_dict()
    print(json.dumps(d, indent=1))
    sim, rt = d["simulated"], d["runtime"]
    assert d["passed"], d["failures"]
    # Direction: sawquant between full precision and naive INT4, simulated and at runtime
    # (measured on these 2 windows: runtime +1.8% vs naive +7.6%, KL 0.015 vs 0.062).
    assert sim["full"]["ppl"] < sim["sawquant"]["ppl"] < sim["naive_int4"]["ppl"]
    assert rt["sawquant"]["ppl"] < rt["naive_int4"]["ppl"]
    assert rt["sawquant"]["kl"] < rt["naive_int4"]["kl"] / 2
    assert rt["sawquant"]["kl"] < 0.05 and rt["sawquant"]["top1_agreement"] > 0.9
    # The recovery's bootstrap interval over the windows brackets the point value; simulated
    # perplexities are the per-window NLLs' (the full one from the runtime's reference forward).
    low, high = d["recovery_ci95"]
    assert low <= d["recovery"] <= high and high - low > 0

    _read_keys_with_another_rotation(monkeypatch)
    result = CliRunner().invoke(
        cli,
        ["verify", str(path), "--tokens", "512", "--seq-len", "512", "--prefix", "384"]
        + ["--no-runtime-baseline"]
        + ["--json", str(tmp_path / "r.json")],
    )
    print(result.output)
    assert result.exit_code == 1
    broken = json.loads((tmp_path / "r.json").read_text())
    # measured: runtime perplexity +78,000%, KL 6.5 nats, top-1 agreement 0%
    assert broken["runtime"]["sawquant"]["kl"] > 10 * rt["sawquant"]["kl"]
    assert broken["failures"] and "runtime perplexity increase" in broken["failures"][0]
