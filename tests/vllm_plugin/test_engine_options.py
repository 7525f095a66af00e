"""What vLLM's scheduler and options do around the plugin: preemption and recompute, sliding
windows with blocks recycled out of the window, a plain checkpoint left alone, and every bad
input refused at engine start with one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _vllm_helpers import export_with, shutdown

from sawquant.config import KVConfig, ModelFacts, SideConfig


def _exact(facts: ModelFacts) -> KVConfig:
    """16-bit pools with rotations: sawquant's layout and basis, no rounding (outputs comparable
    across schedules token for token)."""
    return KVConfig.uniform(
        facts,
        SideConfig(bits=16, rotation_block=16, sign_seed=0),
        SideConfig(bits=16, rotation_block=32),
    )


def _greedy(llm, prompts, n):
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_preempted_requests_recompute_into_new_blocks(tmp_path):
    """10 blocks of 32 tokens for four requests that need 4 each: vLLM preempts and later
    recomputes requests into other blocks. Every request must still produce what it produces
    alone."""
    from sawquant.runtime.vllm.score import engine

    path = export_with(_exact(ModelFacts(30, 3, 64, "llama")), tmp_path / "exact")
    llm = engine(path, max_model_len=256, num_gpu_blocks_override=10, max_num_seqs=4,
                 disable_log_stats=False)  # fmt: skip
    try:
        prompts = [f"{i}. And it came to pass in those days, that there went out a decree " * 3
                   for i in range(4)]  # fmt: skip
        together = _greedy(llm, prompts, 48)
        preemptions = sum(
            m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"
        )  # fmt: skip
        alone = [_greedy(llm, [p], 48)[0] for p in prompts]
    finally:
        shutdown(llm)
    print(f"preemptions: {preemptions}")
    assert preemptions >= 1
    assert together == alone


def test_sliding_window_layers_attend_within_the_window(tmp_path, demo_tokenizer):
    """A Mistral with a 16-token window: vLLM hands later chunks block tables whose
    out-of-window blocks are the null block; the result must still equal sawquant's
    transformers runtime on the same config."""
    from _builders import save_tiny_checkpoint

    from sawquant.export import export_checkpoint
    from sawquant.runtime import from_pretrained
    from sawquant.runtime.vllm.score import engine, prompt_scores

    src = save_tiny_checkpoint(tmp_path / "swa-src", demo_tokenizer, kind="Mistral",
                               sliding_window=16, initializer_range=0.2)  # fmt: skip
    out = tmp_path / "swa"
    export_checkpoint(src, _exact(ModelFacts(2, 2, 32, "mistral")), out, check_weights=False)
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(100, 20000, (2, 120), generator=gen)
    llm = engine(out, max_model_len=160, max_num_batched_tokens=32)
    try:
        got = prompt_scores(llm, windows.tolist(), 1)
    finally:
        shutdown(llm)
    model = from_pretrained(out, dtype=torch.float32)
    with torch.inference_mode():
        logp = model(input_ids=windows, use_cache=True).logits[:, :-1].float().log_softmax(-1)
    ref = -logp.gather(-1, windows[:, 1:, None])[..., 0]
    diff = (torch.tensor(got.nll) - ref).abs().max().item()
    print(f"sliding window 16: max |dNLL| vLLM vs transformers runtime {diff:.2e}")
    assert diff < 2e-3


def test_a_plain_checkpoint_is_served_by_vllm_itself():
    from sawquant.demo import demo_checkpoint_dir
    from sawquant.runtime.vllm.score import engine, served_calls

    llm = engine(demo_checkpoint_dir(), max_model_len=256)
    try:
        text = _greedy(llm, ["In the beginning God created"], 12)
        calls = served_calls(llm)  # the plugin is loaded (the worker method exists)...
    finally:
        shutdown(llm)
    assert len(text[0]) == 12
    assert calls == {"write": 0, "decode": 0, "prefill": 0}  # ...and stayed out of the way


def _copy_with_config(src, dst, config: dict):
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("*.safetensors"))
    for weights in src.glob("*.safetensors"):
        (dst / weights.name).symlink_to(weights)
    (dst / "sawquant_kv.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "case, match",
    [
        ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype fp8 cannot apply"),
        ({"kv_cache_dtype": "int4_per_token_head"}, "--kv-cache-dtype int4_per_token_head"),
        ({"kv_cache_dtype": "int8_per_token_head"}, "--kv-cache-dtype int8_per_token_head"),
        ("layers", "= (2, 3, 64) but the model has (30, 3, 64)"),
        ("heads", "= (30, 4, 64) but the model has (30, 3, 64)"),
    ],
)
def test_bad_input_fails_at_start_with_one_line(case, match, demo_export_path, tmp_path):
    from sawquant.runtime import read_kv_config
    from sawquant.runtime.vllm.score import engine

    path, options = demo_export_path, {}
    if isinstance(case, dict):
        options = case
    else:
        config = read_kv_config(demo_export_path).to_dict()
        if case == "layers":
            config["model"]["num_layers"] = 2
            config["layers"] = config["layers"][:2]
        else:
            config = KVConfig.uniform(ModelFacts(30, 4, 64, "llama")).to_dict()
        path = _copy_with_config(demo_export_path, tmp_path / case, config)
    with pytest.raises(ValueError) as err:
        engine(path, max_model_len=256, **options)
    lines = [line for line in str(err.value).splitlines() if "sawquant:" in line]
    print(lines)
    assert len(lines) == 1 and match in lines[0]
