"""The capture hook sees exactly what the KV cache stores, and leaves the model's output alone."""

from __future__ import annotations

import pytest
import torch

from sawquant.calibration.capture import intercept_attention
from sawquant.runtime.hf.compat import returned_cache


@pytest.mark.parametrize("fixture", ["tiny_llama_gqa", "tiny_qwen3", "tiny_mistral_sliding"])
def test_captured_kv_equals_cache_and_output_is_unchanged(fixture, request):
    model = request.getfixturevalue(fixture)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    seen = {}

    def observe(call):
        seen[call.layer_idx] = call

    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=True)
        with intercept_attention(model, observe):
            out = model(input_ids=ids, use_cache=False)
    diff = (out.logits - ref.logits).abs().max().item()
    print(f"{fixture}: max logit change from the hook {diff:.2e}")
    assert diff == 0.0
    assert model.config._attn_implementation == "sdpa"  # restored
    assert sorted(seen) == [0, 1]
    for layer, call in seen.items():
        cache = returned_cache(ref).layers[layer]
        # Post-RoPE (and post k-norm) keys, one per KV head: what the cache stores.
        assert call.key.shape == (2, 2, 24, 32) and call.query.shape == (2, 4, 24, 32)
        kept = cache.keys.shape[2]  # a sliding-window cache keeps only the last tokens
        torch.testing.assert_close(call.key[:, :, -kept:], cache.keys, rtol=0, atol=0)
        torch.testing.assert_close(call.value[:, :, -kept:], cache.values, rtol=0, atol=0)


def test_mask_follows_the_sliding_window(tiny_mistral_sliding):
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    masks = []
    with (
        torch.inference_mode(),
        intercept_attention(tiny_mistral_sliding, lambda c: masks.append(c.mask)),
    ):
        tiny_mistral_sliding(input_ids=ids, use_cache=False)
    i = torch.arange(20)[:, None]
    j = torch.arange(20)[None, :]
    want = (j <= i) & (j > i - 8)
    assert torch.equal(masks[0][0], want)


def test_replacing_kv_changes_the_output(tiny_llama_gqa):
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = tiny_llama_gqa(input_ids=ids).logits
        with intercept_attention(tiny_llama_gqa, lambda c: (c.key, torch.zeros_like(c.value))):
            out = tiny_llama_gqa(input_ids=ids).logits
    assert (out - ref).abs().max() > 1e-3
