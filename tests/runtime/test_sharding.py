"""Tensor parallelism: which KV heads each rank holds and the per-head config that follows
them (fallback heads, centering and smoothing rows)."""

from __future__ import annotations

import pytest

from sawquant.config import KVConfig, LayerConfig, ModelFacts, SideConfig
from sawquant.errors import ConfigError
from sawquant.runtime.sharding import local_config, local_heads


def test_heads_split_evenly_or_replicate():
    assert [local_heads(8, 4, r) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [local_heads(2, 4, r) for r in range(4)] == [[0], [0], [1], [1]]  # replicated
    assert [local_heads(1, 2, r) for r in range(2)] == [[0], [0]]
    assert local_heads(3, 1, 0) == [0, 1, 2]


@pytest.mark.parametrize("heads, tp", [(6, 4), (3, 2), (2, 3)])
def test_uneven_splits_are_refused_with_the_fix(heads, tp):
    with pytest.raises(ConfigError, match="tensor-parallel"):
        local_heads(heads, tp, 0)


def test_rank_config_keeps_each_heads_own_settings():
    rows = [[float(h)] * 16 for h in range(4)]  # row h marks head h
    k = SideConfig(rotation_block=16, fallback_heads={1: 8, 2: 16}, center=rows, smooth=None)
    v = SideConfig(fallback_heads={3: 8}, smooth=[[1.0 + h] * 16 for h in range(4)])
    config = KVConfig(model=ModelFacts(1, 4, 16, "llama"), layers=(LayerConfig(k=k, v=v),))
    r0, r1 = (local_config(config, 2, r) for r in range(2))
    assert r0.model.num_kv_heads == r1.model.num_kv_heads == 2
    assert dict(r0.layers[0].k.fallback_heads) == {1: 8}
    assert dict(r1.layers[0].k.fallback_heads) == {0: 16}  # global head 2 is rank 1's head 0
    assert dict(r1.layers[0].v.fallback_heads) == {1: 8}
    assert [row[0] for row in r1.layers[0].k.center] == [2.0, 3.0]
    assert [row[0] for row in r0.layers[0].v.smooth] == [1.0, 2.0]
    assert r0.layers[0].k.rotation_block == 16
    assert local_config(config, 1, 0) is config
    # Bits per element over the ranks add up to the whole config's.
    total = sum(local_config(config, 2, r).average_bits() for r in range(2)) / 2
    assert total == pytest.approx(config.average_bits())
