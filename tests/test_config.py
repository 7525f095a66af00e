import json

import pytest

from sawquant.config import CONFIG_VERSION as FORMAT_VERSION
from sawquant.config import KVConfig, LayerConfig, ModelFacts, SideConfig
from sawquant.errors import ConfigError

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
    # Nothing of version 2 is used: written as version 1, which older releases read.
    assert json.loads(text)["format_version"] == 1


def _rows(value: float, heads: int = 4, dim: int = 64) -> list[list[float]]:
    return [[value + 0.01 * h + 1e-7 * c for c in range(dim)] for h in range(heads)]


def test_transforms_round_trip_exactly_as_version_2():
    k = SideConfig(rotation_block=32, center=_rows(-3.25), smooth=_rows(1.5))
    cfg = KVConfig.uniform(FACTS, k=k, v=SideConfig(center=_rows(0.125)))
    text = cfg.to_json()
    data = json.loads(text)
    assert data["format_version"] == FORMAT_VERSION == 2
    assert len(data["layers"][0]["k"]["center"]) == 4 and "smooth" not in data["layers"][0]["v"]
    back = KVConfig.from_json(text)
    assert back == cfg and back.layers[0].k.center == cfg.layers[0].k.center
    # A version-1 document cannot carry version-2 fields, and v1 documents still load.
    data["format_version"] = 1
    with pytest.raises(ConfigError, match="needs version 2"):
        KVConfig.from_dict(data)
    v1 = json.loads(_config().to_json())
    assert v1["format_version"] == 1 and KVConfig.from_dict(v1) == _config()


@pytest.mark.parametrize(
    "field,rows,match",
    [
        ("center", _rows(0.0, heads=3), "must hold 4 rows of 64"),
        ("center", [[float("nan")] * 64] * 4, "NaN/Inf"),
        ("smooth", _rows(-1.0), "smooth must be > 0"),
        ("smooth", [["x"] * 64] * 4, "list of per-head lists of numbers"),
    ],
)
def test_bad_transforms_are_refused(field, rows, match):
    with pytest.raises(ConfigError, match=match):
        _config(**{field: rows})


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
        (dict(group_size=24), "group_size is 24 for head_dim 64; use null .* or one of"),
        (dict(sign_seed=-1), "sign_seed"),
        # Values that compare equal to valid ones but are not of the type the schema says.
        (dict(bits=4.0), "bits must be an integer, got 4.0"),
        (dict(rotation_block=True), "rotation_block must be an integer, got True"),
        (dict(group_size=32.0), "group_size must be an integer, got 32.0"),
        (dict(fallback_heads={1: 8.0}), "fallback_heads\\[1\\] is 8.0"),
        (dict(fallback_heads={1: True}), "fallback_heads\\[1\\] is True"),
        # torch's generator takes a signed 64-bit seed: 2**70 used to pass, then overflow.
        (dict(sign_seed=2**70), "sign_seed .* outside 0..2\\*\\*63-1"),
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
        (lambda d: d.update(values_folded="no"), "values_folded must be true or false"),
        (lambda d: d.update(values_folded=0), "values_folded must be true or false"),
        (lambda d: d["model"].update(num_layers=2.0), "model.num_layers must be an integer"),
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


def test_group_rule_is_the_kernels_rule():
    """head_dim 96 with group 24 used to validate, then the Triton writer refused it at the
    first GPU write: the config now applies the one rule every kernel follows."""
    from sawquant.config import check_group

    facts = ModelFacts(num_layers=1, num_kv_heads=1, head_dim=96)
    with pytest.raises(ConfigError, match="use null .* or one of \\[16, 32\\]"):
        KVConfig.uniform(facts, k=SideConfig(group_size=24))
    for ok in (None, 16, 32, 96):
        check_group(96, ok)


def test_config_is_immutable_and_hashable():
    cfg = _config(fallback_heads={1: 8})
    side = cfg.layers[0].k
    with pytest.raises(TypeError):
        side.fallback_heads[2] = 16  # a frozen config holds no mutable dict
    assert side.fallback_heads == {1: 8} and hash(cfg) == hash(KVConfig.from_json(cfg.to_json()))


def test_config_module_imports_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from sawquant.config import KVConfig, ModelFacts\n"
        "from sawquant.checkpoint import read_kv_config\n"
        "print(KVConfig.uniform(ModelFacts(2, 2, 64)).average_bits())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    print(out.stdout, out.stderr)
    assert out.returncode == 0 and out.stdout.strip() == "4.5"
