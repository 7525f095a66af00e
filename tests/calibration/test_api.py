"""calibrate() end to end on tiny models: config shape, JSON round trip, loader, bounded memory."""

from __future__ import annotations

import json

import pytest
import torch

from sawquant.calibration import CalibrationResult, Recipe, calibrate, load_calibration
from sawquant.config import KVConfig
from sawquant.errors import ConfigError, InputError

RECIPE = Recipe(name="tiny", blocks=(1, 16, 32), group_sizes=(None, 16), query_samples=16)


@pytest.fixture(scope="module")
def result(tiny_qwen3):
    windows = torch.randint(0, 128, (3, 64), generator=torch.Generator().manual_seed(0))
    calls = []
    res = calibrate(tiny_qwen3, None, windows, RECIPE, progress=lambda d, t: calls.append((d, t)))
    # One cheap window of channel statistics for the transforms, then the three measured.
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    return res


def test_result_config_and_stats(result, tiny_qwen3):
    cfg = result.config
    assert isinstance(cfg, KVConfig) and cfg.model.num_layers == 2 and cfg.model.head_dim == 32
    assert result.avg_bits <= RECIPE.max_avg_bits
    st = result.stats
    assert st["tokens"] == 3 * 64 and st["windows"] == 3 and st["seq_len"] == 64
    assert st["objective"] == "fisher" and st["fisher_windows"] == 3
    pred = st["predicted_loss_increase"]
    print("predicted loss increase (nats/token):", pred)
    assert 0 <= pred["chosen"] < pred["naive"]
    # The Fisher pass froze the weights only while it ran.
    assert all(p.requires_grad for p in tiny_qwen3.parameters())
    assert len(st["candidates"]) == len(st["layers"][0]["k"]["attn_err"])
    # Statistics are per-head sums: a few KiB, independent of the number of tokens.
    assert st["peak_memory"]["stats_bytes"] < 64 * 1024
    for row in result.layer_summaries():
        print(row)
        assert row.chosen_err <= row.naive_err + 1e-9


def test_json_round_trip_and_loader(result, tmp_path):
    path = result.save(tmp_path / "calibration.json")
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]  # no temp file left
    loaded = load_calibration(path)
    assert loaded.config == result.config and loaded.recipe == result.recipe
    assert loaded.stats == json.loads(result.to_json())["stats"]
    bare = tmp_path / "sawquant_kv.json"
    bare.write_text(result.config.to_json())
    assert load_calibration(bare).config == result.config
    assert CalibrationResult.from_json(loaded.to_json()).to_dict() == loaded.to_dict()


def test_loader_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_calibration(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_calibration(tmp_path / "bad.json")


@pytest.mark.parametrize("fixture", ["tiny_llama_gqa", "tiny_mistral_sliding"])
def test_other_architectures(fixture, request):
    model = request.getfixturevalue(fixture)
    windows = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    res = calibrate(model, None, windows, RECIPE.replace(fisher_windows=1))
    assert res.stats["objective"] == "fisher" and res.avg_bits <= 5.0
    for row in res.layer_summaries():
        assert row.chosen_err <= row.naive_err + 1e-9
