"""Every bad input a new user hit on 2026-12-01 (issue 9): one line naming the problem and the
fix, exit code 2, checked before the long work starts, nothing lost. Internal bugs exit 3."""

from __future__ import annotations

import json
import time

import pytest
from _builders import save_tiny_checkpoint
from click.testing import CliRunner

from sawquant.cli.main import cli
from sawquant.config import KVConfig


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    print(result.output)
    return result


def _user_error(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    # Ours print "error: ...", click's usage errors "Error: ..."; one either way.
    errors = [ln for ln in result.output.splitlines() if ln.lower().startswith("error:")]
    assert len(errors) == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo_tokenizer):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", demo_tokenizer)


@pytest.fixture(scope="module")
def tiny_calibration(tiny, tmp_path_factory):
    from transformers import AutoConfig

    from sawquant.architectures import model_facts

    path = tmp_path_factory.mktemp("calib") / "calibration.json"
    config = KVConfig.uniform(model_facts(AutoConfig.from_pretrained(tiny)))
    path.write_text(config.to_json())
    return path


def test_calibrate_output_in_a_missing_directory_fails_before_loading(tiny, tmp_path):
    start = time.perf_counter()
    result = _run("calibrate", tiny, "-o", tmp_path / "nodir" / "x.json")
    _user_error(result, "does not exist")
    assert "loading the model" not in result.output  # refused before any work
    assert time.perf_counter() - start < 5


def test_calibrate_output_that_is_a_directory(tiny, tmp_path):
    _user_error(_run("calibrate", tiny, "-o", tmp_path), "is a directory")


def test_verify_json_in_a_missing_directory_fails_before_the_run(tiny, tmp_path):
    result = _run("verify", tiny, "--config", "fixed", "--json", tmp_path / "nodir" / "r.json")
    _user_error(result, "does not exist")
    assert "runtime" not in result.output


def test_calibrating_on_the_held_out_text_is_refused(tiny, tmp_path):
    result = _run("calibrate", tiny, "--data", "demo:evaluation", "-o", tmp_path / "c.json")
    _user_error(result, "held-out text verify measures accuracy on")


def test_a_binary_calibration_file(tiny, tmp_path):
    calib = tmp_path / "calibration.json"
    calib.write_bytes(bytes(range(256)) * 4)
    _user_error(_run("export", tiny, "-c", calib, "-o", tmp_path / "out"), "not a text JSON file")


def test_a_sign_seed_beyond_64_bits_is_refused_at_export(tiny, tiny_calibration, tmp_path):
    data = json.loads(tiny_calibration.read_text())
    data["layers"][0]["k"]["sign_seed"] = 2**70
    data["layers"][0]["k"]["rotation_block"] = 16
    calib = tmp_path / "calibration.json"
    calib.write_text(json.dumps(data))
    result = _run("export", tiny, "-c", calib, "-o", tmp_path / "out")
    _user_error(result, "sign_seed")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2, 3]", ""])
def test_verify_on_an_invalid_config_json(tiny, tmp_path, content):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    (ckpt / "config.json").write_text(content)
    _user_error(_run("verify", ckpt), "config.json")


def test_nan_weights_in_calibrate(tiny, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("nan")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    result = _run("calibrate", ckpt, "--samples", 1, "--seq-len", 32, "-o", tmp_path / "c.json")
    _user_error(result, "layer 1 produced NaN/Inf keys")
    assert not (tmp_path / "c.json").exists()


def test_corrupt_weights_with_fold_values(tiny, tiny_calibration, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    (ckpt / "model.safetensors").write_bytes(b"")
    args = ["export", ckpt, "-c", tiny_calibration, "-o", tmp_path / "out", "--fold-values"]
    _user_error(_run(*args), "cannot read the weights")


def test_a_budget_below_what_int4_costs(demo_tokenizer, tmp_path):
    """head_dim 16: INT4 plus an fp16 scale and zero costs 6 bits; a 5-bit budget used to
    come out at 6.0 bits without a word."""
    ckpt = save_tiny_checkpoint(tmp_path / "d16", demo_tokenizer, head_dim=16)
    result = _run(
        "calibrate", ckpt, "--samples", 1, "--seq-len", 32, "--max-bits", 5.0,
        "-o", tmp_path / "c.json",
    )  # fmt: skip
    _user_error(result, "costs 6 bits per element at head_dim 16, above the 5-bit budget")


def test_an_internal_error_is_exit_3_with_a_traceback(tiny, tmp_path, monkeypatch):
    import sawquant.export

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    calib = tmp_path / "c.json"
    calib.write_text(KVConfig.uniform(_facts(tiny)).to_json())
    monkeypatch.setattr(sawquant.export, "_source_files", bug)
    result = _run("export", tiny, "-c", calib, "-o", tmp_path / "out")
    assert result.exit_code == 3
    assert "Traceback" in result.output and "internal error" in result.output


def _facts(ckpt):
    from transformers import AutoConfig

    from sawquant.architectures import model_facts

    return model_facts(AutoConfig.from_pretrained(ckpt))


def test_progress_is_printed_as_lines_when_not_a_terminal(tiny, tmp_path):
    """Calibrating a 0.5B model printed nothing for an hour into a log: now each stage and
    window is a timestamped line."""
    text = tmp_path / "t.txt"
    from sawquant import data

    text.write_text(data.calibration_text()[:20000])
    result = _run(
        "calibrate", tiny, "--data", text, "--samples", 2, "--seq-len", 32,
        "-o", tmp_path / "c.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("[")]
    assert any("loading the model" in ln for ln in lines)
    # The two windows plus the channel-statistics pass of the transforms, counted to the end.
    capture = [ln.rsplit(": ", 1)[1] for ln in lines if "capturing K/V/Q (forward passes)" in ln]
    done, total = capture[-1].split("/")
    assert done == total and int(total) >= 2, capture


def test_thread_count_follows_the_idle_cores(monkeypatch):
    from sawquant.devices import choose_num_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SAWQUANT_NUM_THREADS", raising=False)
    assert choose_num_threads(cpus=2, load=0.1) == 2
    assert choose_num_threads(cpus=2, load=1.8) == 1  # a busy 2-core machine: one thread
    assert choose_num_threads(cpus=8, load=20.0) == 1
    monkeypatch.setenv("SAWQUANT_NUM_THREADS", "3")
    assert choose_num_threads(cpus=2, load=2.0) == 3


def test_info_names_the_backend_and_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAWQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "250")  # one table row per line
    result = _run("info")
    assert result.exit_code == 0
    assert "kernels that will run" in result.output and "torch twins" in result.output
    assert str(tmp_path / "cache") in result.output
    assert "converted on first use" in result.output
