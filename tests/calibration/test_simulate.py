"""fake_quant_side is the paged cache round trip; simulated perplexity orders configs sensibly."""

from __future__ import annotations

import pytest
import torch

from sawquant.config import KVConfig, ModelFacts, SideConfig
from sawquant.errors import ConfigError
from sawquant.format import allocate_side
from sawquant.quant import paged_gather_ref, paged_write_ref, random_signs, unrotate
from sawquant.simulate import fake_quant_side, simulated_perplexity


def test_fake_quant_equals_paged_write_then_gather():
    torch.manual_seed(0)
    h, s, d = 3, 37, 64
    x = torch.randn(h, s, d) * torch.linspace(0.1, 4, d)
    side = SideConfig(rotation_block=32, sign_seed=5, group_size=32, fallback_heads={1: 8, 2: 16})
    signs = random_signs(d, 5)
    store = allocate_side(
        num_kv_heads=h,
        head_dim=d,
        head_bits=side.head_bits(h),
        num_pages=3,
        page_size=16,
        block=32,
        signs=signs,
        group_size=32,
    )
    slots = torch.arange(s, dtype=torch.int64)
    tokens = x.transpose(0, 1)  # [T, H, D]
    for bits, pool in store.pools.items():
        heads = store.heads[bits].long()
        paged_write_ref(tokens[:, heads], slots, pool, block=32, signs=signs)
    table = torch.arange(3, dtype=torch.int32)[None]
    want = torch.empty(h, s, d)
    for bits, pool in store.pools.items():
        got = paged_gather_ref(pool, table, torch.tensor([s]))[0]  # [H_pool, S, D] rotated
        want[store.heads[bits].long()] = unrotate(got, 32, signs)
    out = fake_quant_side(x, side)
    print("max |fake_quant - paged round trip|:", (out - want).abs().max().item())
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_simulated_perplexity_orders_precisions(tiny_llama_gqa):
    facts = ModelFacts(num_layers=2, num_kv_heads=2, head_dim=32, model_type="llama")
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    fp = simulated_perplexity(tiny_llama_gqa, ids, None)
    int8 = simulated_perplexity(
        tiny_llama_gqa, ids, KVConfig.uniform(facts, SideConfig(bits=8), SideConfig(bits=8))
    )
    int4 = simulated_perplexity(tiny_llama_gqa, ids, KVConfig.uniform(facts))
    print(f"fp {fp:.5f} int8 {int8:.5f} int4 {int4:.5f}")
    assert abs(int8 - fp) < abs(int4 - fp)
    assert abs(int4 - fp) > 1e-4  # the quantization is really applied
    bf16 = KVConfig.uniform(
        facts, SideConfig(fallback_heads={0: 16, 1: 16}), SideConfig(fallback_heads={0: 16, 1: 16})
    )
    assert abs(simulated_perplexity(tiny_llama_gqa, ids, bf16) - fp) < 1e-2 * fp
    other = KVConfig.uniform(ModelFacts(num_layers=3, num_kv_heads=2, head_dim=32))
    with pytest.raises(ConfigError, match="calibrate this model"):
        simulated_perplexity(tiny_llama_gqa, ids, other)


def test_chunked_next_token_nll_equals_the_full_log_softmax():
    from sawquant.simulate import next_token_nll

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 37, 1000, generator=gen) * 4
    target = torch.randint(0, 1000, (2, 37), generator=gen)
    full = -logits.log_softmax(-1).gather(-1, target[..., None])[..., 0]
    for chunk in (1, 5, 128):
        assert torch.equal(next_token_nll(logits, target, chunk=chunk), full)
    assert torch.equal(next_token_nll(logits.bfloat16(), target), next_token_nll(
        logits.bfloat16().float(), target))  # fmt: skip
