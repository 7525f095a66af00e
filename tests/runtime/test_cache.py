"""SawquantCache bookkeeping: slots, padding, page growth, a fixed budget; memory report."""

from __future__ import annotations

import pytest
import torch

from sawquant.config import KVConfig, ModelFacts, SideConfig
from sawquant.quant import paged_gather_ref, rotate
from sawquant.runtime import CacheFullError, SawquantCache, kv_memory

FACTS = ModelFacts(num_layers=2, num_kv_heads=2, head_dim=16, model_type="llama")


def _config(**k) -> KVConfig:
    return KVConfig.uniform(FACTS, k=SideConfig(**k), v=SideConfig(**k))


def test_left_padding_is_not_stored_and_lengths_are_per_sequence():
    cache = SawquantCache(_config(), page_size=4)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    plan = cache.prepare_step(5, batch_size=2, device=torch.device("cpu"), attention_mask=mask)
    print("slots", plan.slots.tolist(), "seq_lens", plan.seq_lens.tolist())
    slots = plan.slots.view(2, 5)
    assert slots[0, :2].tolist() == [-1, -1]
    assert plan.seq_lens.tolist() == [3, 5]
    assert plan.cached_lens.tolist() == [0, 0]
    # Real tokens take consecutive positions 0.. of their own pages; pages are not shared.
    pages0 = set((slots[0, 2:] // 4).tolist())
    pages1 = set((slots[1] // 4).tolist())
    assert not pages0 & pages1
    assert (slots[0, 2:] % 4).tolist() == [0, 1, 2]
    # A decode step: one slot each, right after the stored tokens.
    plan = cache.prepare_step(1, batch_size=2, device=torch.device("cpu"))
    table = plan.block_table.long()
    assert plan.slots.tolist() == [int(table[0, 0]) * 4 + 3, int(table[1, 1]) * 4 + 1]
    assert plan.seq_lens.tolist() == [4, 6]


def test_growth_keeps_stored_tokens():
    torch.manual_seed(0)
    cache = SawquantCache(_config(rotation_block=16), page_size=4, num_pages=2)
    x = torch.randn(1, 2, 6, 16)  # [B, H_kv, T, D]
    cache.update(x, x, 0)  # 6 tokens: 2 pages, no growth
    before = cache.num_pages
    for t in range(20):  # decode steps force several regrowths
        cache.update(x[:, :, t % 6 : t % 6 + 1], x[:, :, :1], 0)
    print("pages", before, "->", cache.num_pages)
    assert cache.num_pages > before
    k_store, _ = cache.stores(0)
    plan = cache.plan
    got = paged_gather_ref(k_store.pools[4], plan.block_table, plan.seq_lens)[0]  # [H, L, D]
    want = rotate(x[0], 16)  # the first six tokens, rotated
    err = (got[:, :6] - want).abs().max().item()
    print("max abs error of the first 6 tokens after growth", err)
    assert got.shape[1] == 26
    assert err < 0.5 * (want.amax() - want.amin()).item() / 15 + 1e-3  # half an INT4 step
    assert cache.get_seq_length() == 26


def test_fixed_budget_raises_cache_full():
    cache = SawquantCache(_config(), page_size=4, num_pages=3, grow=False)
    x = torch.randn(2, 2, 4, 16)
    cache.update(x, x, 0)  # 2 pages
    with pytest.raises(CacheFullError, match="KV cache full"):
        cache.update(x, x, 0)


def test_memory_ratio_plain_int4_and_fallbacks():
    for head_dim, limit in ((128, 0.27), (64, 0.29)):
        facts = ModelFacts(num_layers=36, num_kv_heads=8, head_dim=head_dim)
        mem = kv_memory(KVConfig.uniform(facts))
        print(f"head_dim {head_dim}: {mem.bytes_per_token} B/token, ratio {mem.ratio:.4f}")
        assert mem.ratio <= limit
        # INT4 codes + fp16 scale and zero per head per side + the block table.
        assert mem.bytes_per_token == 36 * 8 * 2 * (head_dim // 2 + 4) + 4 / 16
    facts = ModelFacts(num_layers=2, num_kv_heads=2, head_dim=64)
    fb = KVConfig.uniform(facts, k=SideConfig(fallback_heads={1: 16}), v=SideConfig())
    mem = kv_memory(fb)
    assert mem.per_layer == (36 + 128 + 2 * 36,) * 2  # K: one INT4 + one BF16 head; V: two INT4
