"""With 16-bit pools a sawquant config changes nothing but the layout and the basis (rotation,
signs, centering, smoothing): served through vLLM, the demo must then give the same
teacher-forced log-probs as sawquant's transformers runtime on the same config, through
chunked prefill (the earlier chunks read back from vLLM's blocks) and decode. This isolates the
plumbing (block layout, slots, block tables, the un-rotation and transforms) from INT4's
rounding, which makes any two float implementations drift apart (see test_int4_serving)."""

from __future__ import annotations

import math

import pytest
import torch
from _vllm_helpers import export_with, hf_scores, shutdown

from sawquant.config import KVConfig, ModelFacts, SideConfig

WINDOWS, LENGTH = 4, 200


def _exact_config() -> KVConfig:
    gen = torch.Generator().manual_seed(5)

    def rows(lo, hi):
        return (torch.rand(3, 64, generator=gen) * (hi - lo) + lo).tolist()

    facts = ModelFacts(30, 3, 64, "llama")
    k = SideConfig(bits=16, rotation_block=32, sign_seed=0, center=rows(-2, 2), smooth=rows(0.5, 2))
    v = SideConfig(bits=16, rotation_block=16, center=rows(-1, 1), smooth=rows(0.5, 2))
    return KVConfig.uniform(facts, k=k, v=v)


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    from sawquant.runtime.vllm.score import engine

    path = export_with(_exact_config(), tmp_path_factory.mktemp("exact") / "demo-exact")
    # Chunks of 64 tokens: every window's later chunks attend to pages written earlier.
    llm = engine(path, max_model_len=256, max_num_batched_tokens=64, enable_prefix_caching=False)
    yield path, llm
    shutdown(llm)


def test_vllm_teacher_forced_logprobs_equal_the_transformers_runtime(exact, demo_tokenizer):
    from sawquant import data
    from sawquant.runtime.vllm.score import prompt_scores, served_calls

    path, llm = exact
    windows = data.token_windows(demo_tokenizer, data.evaluation_text(), num=WINDOWS,
                                 seq_len=LENGTH)  # fmt: skip
    before = served_calls(llm)
    got = prompt_scores(llm, windows.tolist(), 1)
    calls = {k: v - before[k] for k, v in served_calls(llm).items()}
    ref_nll, ref_top = hf_scores(path, windows)
    diff = (torch.tensor(got.nll, dtype=torch.float64) - ref_nll.double()).abs()
    agree = (torch.tensor(got.top1) == ref_top).float().mean().item()
    ppl_ref = math.exp(ref_nll.double().mean().item())
    print(f"exact config: vLLM ppl {got.ppl:.5f} vs transformers {ppl_ref:.5f}, "
          f"max |dNLL| {diff.max():.2e}, top-1 agreement {agree:.4f}, calls {calls}")  # fmt: skip
    # Each window is 4 chunks of 64 (one of 8): 4 prefill requests per layer and window.
    assert calls["prefill"] >= 30 * WINDOWS * 3
    assert diff.max() < 2e-3
    assert agree >= 0.995
    assert abs(got.ppl / ppl_ref - 1) < 1e-4


def test_vllm_greedy_decode_equals_the_transformers_runtime(exact, demo_tokenizer):
    """Decode steps (one token per request, batched over requests) match transformers'
    ``generate`` through sawquant's runtime token for token."""
    from vllm import SamplingParams

    from sawquant.runtime import from_pretrained
    from sawquant.runtime.vllm.score import served_calls

    path, llm = exact
    prompts = ["In the beginning God created the heaven", "And the LORD spake unto Moses"]
    before = served_calls(llm)["decode"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    assert served_calls(llm)["decode"] - before >= 30 * 19  # every layer, every new token
    model = from_pretrained(path, dtype=torch.float32)
    for prompt, out in zip(prompts, outs):
        ids = demo_tokenizer(prompt, return_tensors="pt").input_ids
        assert list(out.prompt_token_ids) == ids[0].tolist()
        with torch.inference_mode():
            ref = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :]
        assert list(out.outputs[0].token_ids) == ref.tolist(), out.outputs[0].text
