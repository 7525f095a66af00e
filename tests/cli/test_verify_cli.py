"""``sawquant verify`` exit codes (0 pass, 1 fail, 2 bad input) and the JSON report.

A tiny random Llama (with the demo tokenizer, so the demo evaluation text tokenizes) exported
with a real KV config goes through the whole verify path, real runtime included, in seconds.
Its perplexities are meaningless (random weights), so the pass/fail cases set thresholds that
do not depend on them; the demo model's verdicts are tested in tests/test_verify_demo.py.
"""

from __future__ import annotations

import json

import pytest
from _builders import save_tiny_checkpoint
from click.testing import CliRunner

from sawquant.cli.main import cli
from sawquant.config import KVConfig, LayerConfig, SideConfig

SMALL = ["--tokens", "256", "--seq-len", "128", "--prefix", "112"]
LOOSE = ["--max-ppl-increase", "1000", "--min-recovery", "-1000000"]


def tiny_config(model_config) -> KVConfig:
    from sawquant.architectures import model_facts

    facts = model_facts(model_config)
    layer = LayerConfig(
        k=SideConfig(rotation_block=16, sign_seed=3, fallback_heads={1: 8}),
        v=SideConfig(rotation_block=16),
    )
    return KVConfig(model=facts, layers=(layer,) * facts.num_layers)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, demo_tokenizer):
    """A plain HF checkpoint of a tiny random Llama that uses the demo tokenizer."""
    path = tmp_path_factory.mktemp("tiny-plain")
    return save_tiny_checkpoint(path, demo_tokenizer, head_dim=16, initializer_range=0.1)


@pytest.fixture(scope="module")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    from transformers import AutoConfig

    from sawquant.export import export_checkpoint

    out = tmp_path_factory.mktemp("tiny-export") / "out"
    config = tiny_config(AutoConfig.from_pretrained(tiny_checkpoint))
    export_checkpoint(tiny_checkpoint, config, out)
    return out


def invoke(*args: str):
    result = CliRunner().invoke(cli, ["verify", *args])
    print(result.output)
    return result


def test_default_prefix_follows_the_window_length(tiny_export, tmp_path):
    """Without --prefix, each window decodes its last 63 positions whatever --seq-len is
    (a fixed default prefix would reject shorter windows)."""
    from sawquant.verify import DEFAULT_SEQ_LEN, DEFAULT_TOKENS, default_prefix

    assert (DEFAULT_TOKENS // DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN) == (16, 1024)
    assert [default_prefix(n) for n in (1024, 128, 65, 3)] == [960, 64, 1, 1]
    report = tmp_path / "report.json"
    result = invoke(str(tiny_export), "--tokens", "160", "--seq-len", "80", *LOOSE,
                    "--no-runtime-baseline", "--json", str(report))  # fmt: skip
    assert result.exit_code == 0, result.output
    d = json.loads(report.read_text())
    assert d["prefix"] == 16 and d["scored_positions"] == 2 * 63


def test_pass_writes_the_json_report(tiny_export, tmp_path):
    report = tmp_path / "report.json"
    result = invoke(str(tiny_export), *SMALL, *LOOSE, "--json", str(report))
    assert result.exit_code == 0, result.output
    d = json.loads(report.read_text())
    assert d["passed"] is True and d["tokens"] == 256 and d["config_source"] == "checkpoint"
    for case in ("full", "naive_int4", "saw_fixed", "sawquant"):
        assert d["simulated"][case]["ppl"] > 1
    rt = d["runtime"]["sawquant"]
    print(rt)
    # Every scored position went through the paged INT4 decode path: not bit-equal to fp32.
    assert 0 < rt["kl"] < 0.1 and 0.5 < rt["top1_agreement"] <= 1
    assert d["scored_positions"] == 2 * (128 - 112 - 1)
    # Proof the paged INT4 decode served every scored position of every layer.
    assert rt["decode_calls"] == (128 - 112 - 1) * 2  # one batch of 2 windows, 2 layers
    assert d["simulated"]["sawquant"]["avg_bits"] == pytest.approx(
        KVConfig.from_json((tiny_export / "sawquant_kv.json").read_text()).average_bits()
    )
    assert "PASS" in result.output


def test_unmet_threshold_exits_1(tiny_export):
    result = invoke(str(tiny_export), *SMALL, "--max-ppl-increase", "1000", "--min-recovery", "1e6")
    assert result.exit_code == 1
    assert "FAIL" in result.output


def test_missing_checkpoint_exits_2(tmp_path):
    result = invoke(str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_checkpoint_without_config_says_how_to_compare(tiny_checkpoint):
    result = invoke(str(tiny_checkpoint), *SMALL)
    assert result.exit_code == 2
    assert "not a sawquant export" in result.output and "--config" in result.output


def test_plain_checkpoint_with_config_option_runs_the_comparison(tiny_checkpoint, tmp_path):
    report = tmp_path / "r.json"
    result = invoke(
        str(tiny_checkpoint), *SMALL, *LOOSE, "--config", "fixed", "--json", str(report)
    )
    assert result.exit_code == 0, result.output
    d = json.loads(report.read_text())
    assert d["config_source"] == "fixed"
    # The fixed config is the saw_fixed baseline: the same simulated perplexity.
    assert d["simulated"]["sawquant"]["ppl"] == pytest.approx(d["simulated"]["saw_fixed"]["ppl"])


def test_text_shorter_than_requested_exits_2(tiny_export, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("In the beginning God created the heaven and the earth.\n")
    result = invoke(str(tiny_export), "--data", str(short), *SMALL)
    assert result.exit_code == 2
    assert "--tokens" in result.output


def test_bad_options_exit_2(tiny_export):
    assert invoke(str(tiny_export), "--tokens", "100", "--seq-len", "128").exit_code == 2
    assert invoke(str(tiny_export), "--prefix", "1100").exit_code == 2  # default windows: 1024
    assert invoke(str(tiny_export), *SMALL[:4], "--prefix", "127").exit_code == 2
    assert invoke(str(tiny_export), "--tokens", "abc").exit_code == 2


def test_config_file_on_a_plain_checkpoint(tiny_checkpoint, tmp_path):
    from transformers import AutoConfig

    cfg = tiny_config(AutoConfig.from_pretrained(tiny_checkpoint))
    path = tmp_path / "kv.json"
    path.write_text(cfg.to_json())
    report = tmp_path / "r.json"
    result = invoke(
        str(tiny_checkpoint), *SMALL, *LOOSE, "--config", str(path), "--json", str(report)
    )
    assert result.exit_code == 0, result.output
    d = json.loads(report.read_text())
    assert d["config_source"] == str(path)
    assert d["simulated"]["sawquant"]["avg_bits"] == pytest.approx(cfg.average_bits())
    missing = invoke(str(tiny_checkpoint), *SMALL, "--config", str(tmp_path / "none.json"))
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_a_runtime_that_did_not_decode_through_the_pages_is_an_error(tiny_export, monkeypatch):
    """Scores are only the INT4 cache's if its decode served every step; otherwise verify stops
    (exit 3: a defect, not a failed accuracy check)."""
    import sawquant.verify

    real = sawquant.verify._runtime_logprobs

    def lost(*args, **kwargs):
        real(*args, **kwargs)
        return 0  # as if transformers had routed the steps around the cache

    monkeypatch.setattr(sawquant.verify, "_runtime_logprobs", lost)
    result = invoke(str(tiny_export), *SMALL, *LOOSE)
    assert result.exit_code == 3
    assert "runtime served 0 of 30 decode" in result.output


def test_engine_vllm_without_vllm_or_with_config_exits_2(tiny_export, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))  # fmt: skip
    result = invoke(str(tiny_export), "--engine", "vllm")
    assert result.exit_code == 2 and 'pip install "sawquant[vllm]"' in result.output
    result = invoke(str(tiny_export), "--engine", "vllm", "--config", "fixed")
    assert result.exit_code == 2 and "--config applies to --engine transformers" in result.output
    assert invoke("--engine", "vllm").exit_code == 2  # the demo needs an export path
