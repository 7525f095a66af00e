"""The runtime with the Triton kernels (interpreted on CPU) equals the runtime with the twins."""

from __future__ import annotations

import torch
from _builders import tiny_causal_lm

from sawquant.config import KVConfig, ModelFacts, SideConfig
from sawquant.runtime import dispatch, patch
from sawquant.runtime.hf.compat import cache_kwargs, returned_cache


def _run(model, ids: torch.Tensor) -> torch.Tensor:
    """Prefill 4, decode 4 one by one, then a 2-token chunk: logits [B, 10, vocab]."""
    with torch.no_grad():
        out = model(ids[:, :4], use_cache=True)
        cache, logits = returned_cache(out), [out.logits]
        for t in range(4, 8):
            logits.append(
                model(ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True).logits
            )
        logits.append(model(ids[:, 8:10], **cache_kwargs(model, cache), use_cache=True).logits)
    return torch.cat(logits, 1)


def test_triton_kernels_match_the_twins_through_the_model(monkeypatch):
    model = tiny_causal_lm("Llama", head_dim=16)
    # Signs, an INT8 fallback head and a rotated V: every branch of write and decode.
    k = SideConfig(rotation_block=16, sign_seed=1, fallback_heads={1: 8})
    kv = KVConfig.uniform(ModelFacts(2, 2, 16, "llama"), k=k, v=SideConfig(rotation_block=16))
    patch(model, kv)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    twins = _run(model, ids)
    monkeypatch.setattr(dispatch, "use_triton", lambda t: True)
    triton = _run(model, ids)
    err = (triton - twins).abs().max().item()
    print(f"max |logit difference| Triton (interpreted) vs twins: {err:.2e}")
    assert err < 1e-3
