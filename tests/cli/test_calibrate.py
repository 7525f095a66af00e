"""``sawquant calibrate`` end to end on a tiny checkpoint, and every bad input: exit 2, one line."""

from __future__ import annotations

import importlib.util
import json

import pytest
from _builders import save_tiny_checkpoint
from click.testing import CliRunner

from sawquant.cli.main import cli


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, demo_tokenizer):
    """A random-weight 2-layer Llama (head_dim 32, GQA) with the demo tokenizer, saved to disk."""
    path = tmp_path_factory.mktemp("tiny_llama")
    return save_tiny_checkpoint(path, demo_tokenizer, max_position_embeddings=256,
                                tie_word_embeddings=True)  # fmt: skip


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    from sawquant import data

    path.write_text(data.calibration_text()[:20000])
    return path


def _run(*args):
    result = CliRunner().invoke(cli, ["calibrate", *map(str, args)])
    print(result.output)
    return result


def _assert_user_error(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    # Progress lines ("[   0.3s] loading the model...") aside, the error is one line.
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip() and ln[0] != "["]
    assert len(lines) <= 3


def test_calibrate_tiny_checkpoint(tiny_checkpoint, text_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: ci\nblocks: [1, 16, 32]\ngroup_sizes: [null, 16]\nquery_samples: 16\n")
    out = tmp_path / "calibration.json"
    args = [tiny_checkpoint, "--data", text_file, "--samples", 2, "--seq-len", 48]
    args += ["--recipe", recipe, "--device", "cpu", "-o", out]
    plot = importlib.util.find_spec("matplotlib") is not None
    if plot:
        args += ["--plot", tmp_path / "outliers.png"]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["config"]["model"]["num_layers"] == 2 and data["avg_bits"] <= 5.0
    assert data["stats"]["windows"] == 2 and data["recipe"]["name"] == "ci"
    assert (
        "average bits per cached element" in result.output
        and "attention-output error" in result.output
    )
    if plot:
        assert (tmp_path / "outliers.png").stat().st_size > 1000


def test_missing_model_path(tmp_path):
    _assert_user_error(_run(tmp_path / "nope"), "does not exist")


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig

    config = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2)
    config.architectures = ["BertModel"]  # an encoder checkpoint, as saved by BertModel
    config.save_pretrained(tmp_path)
    _assert_user_error(_run(tmp_path), "is not a decoder-only causal language model")


def test_mla_is_refused(tmp_path):
    from transformers import DeepseekV3Config

    DeepseekV3Config(num_hidden_layers=1, hidden_size=64).save_pretrained(tmp_path)
    _assert_user_error(_run(tmp_path), "multi-head latent attention")


def test_text_too_short(tiny_checkpoint, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("In the beginning God created the heaven and the earth.\n")
    result = _run(
        tiny_checkpoint,
        "--data",
        short,
        "--samples",
        4,
        "--seq-len",
        256,
        "-o",
        tmp_path / "c.json",
    )
    _assert_user_error(result, "lower --samples/--seq-len or give more text")


def test_recipe_with_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsampels: 8\n")
    _assert_user_error(_run("--recipe", bad), "unknown key(s) ['sampels']")


def test_unknown_recipe_name():
    _assert_user_error(_run("--recipe", "nonexistent"), "unknown recipe 'nonexistent'")


def test_missing_data_file(tiny_checkpoint, tmp_path):
    _assert_user_error(_run(tiny_checkpoint, "--data", tmp_path / "none.txt"), "is not a file")


def test_the_command_line_makes_openmp_threads_wait_passively():
    """A spinning OpenMP thread holds the core the thread it waits for needs: on a 2-core
    machine with one core busy, calibrating the demo took 5:00 with 2 spinning threads and
    0:55 with sleeping ones. The CLI sets the policy before torch loads OpenMP, unless the user
    chose one."""
    import os
    import subprocess
    import sys

    code = "import os, sawquant.cli.main; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "PASSIVE", run.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "ACTIVE", run.stderr
    from sawquant.devices import prefer_passive_waiting

    assert "torch" in sys.modules and not prefer_passive_waiting()  # too late: no effect
