"""Tensor parallelism through transformers' ``tp_plan``: two CPU processes on the gloo backend,
each with half of the KV heads, against the unsplit run. One layer has a fallback head on each
side of the split (INT8 on rank 0, BF16 on rank 1), so a wrong renumbering shows up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sawquant.config import KVConfig, LayerConfig, ModelFacts, SideConfig

WORKER = Path(__file__).with_name("_tp_worker.py")


def _config() -> KVConfig:
    gen = torch.Generator().manual_seed(1)
    center = (torch.randn(4, 32, generator=gen) * 0.1).tolist()
    k0 = SideConfig(rotation_block=16, sign_seed=3, fallback_heads={1: 8, 2: 16}, center=center)
    v1 = SideConfig(rotation_block=32, fallback_heads={0: 16, 3: 8}, group_size=16)
    layers = (LayerConfig(k=k0, v=SideConfig(rotation_block=16)),
              LayerConfig(k=SideConfig(rotation_block=32), v=v1))  # fmt: skip
    return KVConfig(model=ModelFacts(2, 4, 32, "llama"), layers=layers)


def _run(args: list[str], env: dict, timeout: int = 300) -> None:
    run = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, demo_tokenizer):
    from _builders import save_tiny_checkpoint

    from sawquant.export import export_checkpoint

    tmp = tmp_path_factory.mktemp("tp")
    src = save_tiny_checkpoint(tmp / "src", demo_tokenizer, num_attention_heads=8,
                               num_key_value_heads=4, initializer_range=0.2)  # fmt: skip
    out = export_checkpoint(src, _config(), tmp / "export", check_weights=False).out
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    (tmp / "one").mkdir()
    (tmp / "two").mkdir()
    _run([sys.executable, str(WORKER), str(out), str(tmp / "one")], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
          "--standalone", str(WORKER), str(out), str(tmp / "two")], env)  # fmt: skip
    one = torch.load(tmp / "one" / "rank0.pt")
    two = [torch.load(tmp / "two" / f"rank{r}.pt") for r in range(2)]
    return one, two


def test_each_rank_stores_its_heads_with_their_own_precision(ranks):
    one, two = ranks
    assert one["head_bits"][0][0] == [4, 8, 16, 4]  # layer 0 K, unsplit
    assert [r["head_bits"][0][0] for r in two] == [[4, 8], [16, 4]]
    assert [r["head_bits"][1][1] for r in two] == [[16, 4], [4, 8]]  # layer 1 V
    for r in two:
        assert r["calls"]["write"] > 0 and r["calls"]["decode"] > 0  # the INT4 path ran
    # KV memory adds up over the ranks (the block table is each rank's own).
    table = 4 / 16
    split = sum(r["bytes_per_token"] - table for r in two)
    assert split == pytest.approx(one["bytes_per_token"] - table)


def test_split_run_equals_the_unsplit_run(ranks):
    one, two = ranks
    # What each rank's cache reads back is the unsplit cache's rows of its heads; layer 0 sees
    # the same inputs, so its K/V match to float rounding of the split projections.
    for side in range(2):
        whole = one["stored"][0][side]
        mine = torch.cat([r["stored"][0][side] for r in two])
        torch.testing.assert_close(mine, whole, rtol=1e-5, atol=1e-5)
    # Both ranks compute the same logits (the all-reduce), equal to the unsplit run's within
    # float rounding (an INT4 code flipped by a last-bit difference would show here first).
    torch.testing.assert_close(two[0]["logits"], two[1]["logits"], rtol=0, atol=0)
    err = (two[0]["logits"] - one["logits"]).norm() / one["logits"].norm()
    assert err < 1e-4, err
    assert torch.equal(two[0]["tokens"], one["tokens"])
    assert torch.equal(two[1]["tokens"], one["tokens"])


def test_tp_arguments_travel_as_a_distributed_config():
    from transformers import DistributedConfig

    from sawquant.errors import InputError
    from sawquant.runtime.hf.compat import distributed_kwargs

    got = distributed_kwargs({"tp_plan": "auto", "tp_size": 2, "dtype": torch.float32})
    assert set(got) == {"distributed_config", "dtype"}
    assert isinstance(got["distributed_config"], DistributedConfig)
    assert (got["distributed_config"].tp_plan, got["distributed_config"].tp_size) == ("auto", 2)
    plain = {"device_map": "cpu"}
    assert distributed_kwargs(plain) is plain
    with pytest.raises(InputError, match="not both"):
        distributed_kwargs({"tp_plan": "auto", "distributed_config": DistributedConfig()})
