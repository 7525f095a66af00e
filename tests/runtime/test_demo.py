"""The demo model end to end on CPU: export a KV config, load it with ``from_pretrained``,
greedy-generate 64 tokens for 8 left-padded prompts, and compare with full precision.

Also checks that decoding reads the INT4 pages: flipping one page's codes changes the logits.
"""

from __future__ import annotations

import time

import pytest
import torch

from sawquant.config import KVConfig, SideConfig
from sawquant.runtime import SawquantCache, from_pretrained
from sawquant.runtime.hf.compat import cache_kwargs, returned_cache

NUM_PROMPTS, NEW_TOKENS = 8, 64


def _prompts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """8 KJV windows of 20..34 tokens, left-padded: ids [8, 34], mask [8, 34]."""
    from sawquant.data import evaluation_text, token_windows

    windows = token_windows(tokenizer, evaluation_text(), num=NUM_PROMPTS, seq_len=34)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full_like(windows, pad)
    mask = torch.zeros_like(windows)
    for i in range(NUM_PROMPTS):
        n = 20 + 2 * i
        ids[i, -n:] = windows[i, :n]
        mask[i, -n:] = 1
    return ids, mask


@pytest.mark.slow
def test_demo_exported_checkpoint_greedy_agreement(demo_model, tmp_path):
    from sawquant.architectures import model_facts
    from sawquant.demo import demo_checkpoint_dir
    from sawquant.export import export_checkpoint

    model, tokenizer = demo_model
    ids, mask = _prompts(tokenizer)
    pad = int(ids[0, 0])
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    kw["pad_token_id"] = pad
    start = time.perf_counter()
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1] :]  # [8, 64]
    t_full = time.perf_counter() - start

    # A fixed block-32 rotation for K and V: what an exported checkpoint carries.
    facts = model_facts(model.config)
    side = SideConfig(rotation_block=32)
    config = KVConfig.uniform(facts, k=side, v=side)
    export_checkpoint(demo_checkpoint_dir(), config, tmp_path / "demo-sawquant")
    quant = from_pretrained(tmp_path / "demo-sawquant", dtype=torch.float32, device_map="cpu")
    mem = quant.sawquant_memory()

    start = time.perf_counter()
    with torch.no_grad():
        out = quant.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1] :]
    t_quant = time.perf_counter() - start

    # Teacher forcing: feed the full-precision continuation, compare next-token argmax.
    start = time.perf_counter()
    with torch.no_grad():
        prompt_pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate sets them
        step = quant(ids, attention_mask=mask, position_ids=prompt_pos, use_cache=True)
        cache = returned_cache(step)
        assert isinstance(cache, SawquantCache)
        lengths = mask.sum(1)  # [8] real prompt tokens
        agree = [step.logits[:, -1].argmax(-1) == ref[:, 0]]
        full_mask = torch.cat([mask, torch.ones(NUM_PROMPTS, NEW_TOKENS, dtype=mask.dtype)], 1)
        for t in range(1, NEW_TOKENS):
            step = quant(
                ref[:, t - 1 : t],
                **cache_kwargs(quant, cache),
                attention_mask=full_mask[:, : ids.shape[1] + t],
                position_ids=(lengths + t - 1)[:, None],
                use_cache=True,
            )
            agree.append(step.logits[:, -1].argmax(-1) == ref[:, t])
    t_forced = time.perf_counter() - start
    forced = torch.stack(agree, 1)  # [8, 64]

    same = out == ref
    first_diff = [int(r.nonzero()[0]) if r.any() else NEW_TOKENS for r in ~same]
    print(
        f"\ndemo greedy {NUM_PROMPTS}x{NEW_TOKENS}: free-running token agreement "
        f"{same.float().mean():.3f}, identical sequences {int(same.all(1).sum())}/8, "
        f"first divergence {first_diff}, teacher-forced top-1 agreement "
        f"{forced[:, 1:].float().mean():.3f} (decode steps only), first token "
        f"{int(forced[:, 0].sum())}/8; KV ratio {mem.ratio:.4f}; "
        f"time full {t_full:.1f}s, sawquant generate {t_quant:.1f}s, forced {t_forced:.1f}s"
    )
    # prompt + the 63 fed tokens, pads never stored
    assert cache.seq_lens().tolist() == (lengths + NEW_TOKENS - 1).tolist()
    assert mem.ratio <= 0.29
    # The prompt attends to its K/V as stored (INT4), so its first token may differ from full
    # precision; generate() and a plain forward must pick the same one from the same prefill.
    assert torch.equal(same[:, 0], forced[:, 0])
    assert forced.float().mean() >= 0.8  # measured 0.924 (2026-12-02, CPU)

    # The decode step reads the INT4 pages: flip every code of sequence 0's first page.
    with torch.no_grad():
        a = returned_cache(quant(ids, attention_mask=mask, position_ids=prompt_pos))
        b = returned_cache(quant(ids, attention_mask=mask, position_ids=prompt_pos))
        page = int(b.plan.block_table[0, 0])
        for layer in range(facts.num_layers):
            for store in b.stores(layer):
                store.pools[4].codes[page] = ~store.pools[4].codes[page]
        nxt = dict(attention_mask=full_mask[:, : ids.shape[1] + 1], use_cache=True)
        nxt["position_ids"] = lengths[:, None]
        clean = quant(ref[:, :1], **cache_kwargs(quant, a), **nxt).logits[:, -1]
        broken = quant(ref[:, :1], **cache_kwargs(quant, b), **nxt).logits[:, -1]
    moved = (broken - clean).abs().amax(-1)  # [8]
    print(f"corrupted page: sequence 0 logits moved {moved[0]:.2f}, others {moved[1:].max()}")
    assert moved[0] > 1.0
    assert moved[1:].max() == 0.0
