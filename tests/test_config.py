import json

import pytest

from sawquant.config import KVConfig, LayerConfig, ModelFacts, SideConfig
from sawquant.errors import ConfigError
from sawquant.format import FORMAT_VERSION

FACTS = ModelFacts(num_layers=2, num_kv_heads=4, head_dim=64, model_type="llama")


def _config(**k_side) -> KVConfig:
    return KVConfig.uniform(FACTS, k=SideConfig(**k_side))


def test_json_round_trip_is_exact():
    layers = (
        LayerConfig(
            k=SideConfig(rotation_block=32, sign_seed=3, fallback_heads={2: 8, 0: 16}),
            v=SideConfig(rotation_block=64, group_size=32),
        ),
        LayerConfig(),
    )
    cfg = KVConfig(model=FACTS, layers=layers, values_folded=True)
    text = cfg.to_json()
    back = KVConfig.from_json(text)
    assert back == cfg
    assert back.to_json() == text
    assert json.loads(text)["format_version"] == FORMAT_VERSION


def test_average_bits_counts_scales_and_fallbacks():
    assert _config().average_bits() == pytest.approx(4.5)  # 4 + 32/64
    # one of four K heads at INT8: K side (3*4.5 + 8.5)/4 = 5.5, V side 4.5 -> 5.0
    assert _config(fallback_heads={1: 8}).average_bits() == pytest.approx(5.0)
    assert _config(group_size=32).average_bits() == pytest.approx((5.0 + 4.5) / 2)


@pytest.mark.parametrize(
    "side,match",
    [
        (dict(rotation_block=48), "rotation_block is 48"),
        (dict(rotation_block=128), "does not divide head_dim 64"),
        (dict(bits=3), "bits is 3"),
        (dict(fallback_heads={4: 8}), "head 4, out of range"),
        (dict(fallback_heads={1: 4}), "use 8 \\(INT8\\) or 16"),
        (dict(group_size=24), "group_size 24 must be even and divide"),
        (dict(sign_seed=-1), "sign_seed"),
    ],
)
def test_bad_side_fields_are_named(side, match):
    with pytest.raises(ConfigError, match=match) as err:
        _config(**side)
    assert "layers[0].k" in str(err.value)
    assert "\n" not in str(err.value)


def test_newer_version_is_refused_with_upgrade_hint():
    data = _config().to_dict()
    data["format_version"] = FORMAT_VERSION + 1
    data["some_future_field"] = 1
    with pytest.raises(ConfigError, match="newer than this sawquant.*upgrade"):
        KVConfig.from_dict(data)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d["layers"][0]["k"].update(clip=0.9), "layers\\[0\\].k: unknown field"),
        (lambda d: d["layers"].pop(), "layers has 1 entries"),
        (lambda d: d.update(method="kivi"), "not a sawquant KV config"),
        (lambda d: d.update(layout="paged-v9"), "layout 'paged-v9' is unknown"),
        (lambda d: d.pop("model"), "missing 'model'"),
        (lambda d: d["model"].update(head_dim=0), "model.head_dim must be positive"),
        (lambda d: d["layers"][1]["v"].update(fallback_heads={"x": 8}), "head indices"),
    ],
)
def test_bad_documents_are_refused(mutate, match):
    data = _config().to_dict()
    mutate(data)
    with pytest.raises(ConfigError, match=match):
        KVConfig.from_dict(data)


def test_invalid_json_text():
    with pytest.raises(ConfigError, match="not valid JSON"):
        KVConfig.from_json("{not json")


def test_check_model_refuses_other_shapes():
    cfg = _config()
    cfg.check_model(2, 4, 64)
    with pytest.raises(ConfigError, match="made for .* but the model has"):
        cfg.check_model(3, 4, 64)
