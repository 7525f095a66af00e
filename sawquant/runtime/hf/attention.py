"""The attention function registered with ``transformers.AttentionInterface`` as "sawquant".

Per step of a layer, after ``SawquantCache.update`` wrote the new K/V into the pages, every
attention sees K/V exactly as the cache stores them, the step's own tokens included (as in
vLLM's backend, and as the simulated perplexity that calibration optimises assumes):

* first chunk (nothing cached before it): attention of the chunk on itself through
  transformers' SDPA path with the model's mask, on the chunk's K/V round-tripped through the
  cache format (``stored_round_trip``, bit-identical to reading the pages; left padding, which is
  never stored, stays masked);
* one new token per sequence: ``paged_decode_attention`` over the INT4 pages;
* a later multi-token chunk: ``paged_prefill_attention`` (the earlier tokens from the pages, the
  chunk's own K/V round-tripped the same way).

So a token's result does not depend on how its prompt was split into chunks.

The mask registered with ``AttentionMaskInterface`` under the same name is transformers' SDPA
mask (boolean, or None for a plain causal chunk); only the first-chunk path uses it, the paged
kernels mask by ``seq_lens``. Sliding windows and logit soft-caps arrive as the keyword
arguments ``sliding_window``/``softcap`` the models already pass and go to the kernels as is.
The function finds the step's cache through the patch state installed on every attention
module (``module._sawquant_state``, set by the pre-forward hook), never through a global. A
forward without a cache (``use_cache=False``) attends in full precision, as the model would; a
forward with a sawquant cache whose K/V did not come from that cache's update raises
RuntimeBypassError instead of silently attending to something else.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from sawquant.errors import RuntimeBypassError
from sawquant.format import SideStore
from sawquant.quant.attention import stored_round_trip
from sawquant.runtime import dispatch

__all__ = ["ATTN_NAME", "register", "sawquant_attention"]

ATTN_NAME = "sawquant"


def register() -> None:
    """Register the attention function and its mask under ``ATTN_NAME`` (idempotent)."""
    AttentionInterface.register(ATTN_NAME, sawquant_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _dense_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float,
    dropout: float,
    softcap: float | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    """Full-precision attention of ``query`` over ``key``/``value``: returns [B, T, H_q, D]."""
    if softcap is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # SDPA has no soft-cap: explicit float32 attention. q: [B, H_q, T, D]; k: [B, H_kv, S, D]
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1).float()
    v = value.repeat_interleave(group, dim=1).float()
    s = (query.float() @ k.transpose(-1, -2)) * scaling  # [B, H_q, T, S]
    s = softcap * torch.tanh(s / softcap)
    t, n = s.shape[-2], s.shape[-1]
    if attention_mask is None:
        allowed = torch.ones(t, n, dtype=torch.bool, device=s.device).tril(n - t)
        s = s.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        s = s.masked_fill(~attention_mask[..., :n], float("-inf"))
    else:
        s = s + attention_mask[..., :n].float()
    out = torch.softmax(s, dim=-1) @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _as_stored(x: torch.Tensor, store: SideStore) -> torch.Tensor:
    """[B, H_kv, T, D] K or V of this step as the pages hold them, in x's dtype."""
    b, h, t, d = x.shape
    flat = x.transpose(1, 2).reshape(b * t, h, d)
    return stored_round_trip(flat, store).to(x.dtype).reshape(b, t, h, d).transpose(1, 2)


def sawquant_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function. query: [B, H_q, T, D] (post-RoPE), key/value:
    [B, H_kv, T, D] as returned by the cache's ``update``. Returns ([B, T, H_q, D], None)."""
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    softcap = kwargs.pop("softcap", None)
    window = kwargs.get("sliding_window")
    state = getattr(module, "_sawquant_state", None)
    cache = None if state is None else state.cache
    if cache is None:
        if getattr(key, "_sawquant_stored", False):
            raise RuntimeBypassError(
                "a sawquant cache stored this step's keys, but the runtime's pre-forward hook "
                "did not hand it to the attention layers (the call was decoder.forward(...) "
                "instead of decoder(...), passed the cache positionally, or set "
                "use_cache=False), so attention would see the new tokens only; call the model "
                "with past_key_values=cache and use_cache=True"
            )
        # No cache in this step (use_cache=False, or a model that is not patched): plain
        # attention on what we got, as the unpatched model would compute it.
        return _dense_attention(
            module, query, key, value, attention_mask,
            scaling=scale, dropout=dropout, softcap=softcap, kwargs=kwargs,
        )  # fmt: skip
    layer_idx = int(module.layer_idx)
    if not cache.layers[layer_idx].returned(key):
        raise RuntimeBypassError(
            f"layer {layer_idx}'s attention got keys that the sawquant cache did not store in "
            "this step (the model or transformers routed them elsewhere); refusing to attend "
            "to anything but the INT4 pages"
        )
    plan = cache.plan.on(query.device)
    layer = cache.layer_kv(layer_idx)
    kw = dict(softmax_scale=scale, sliding_window=window, softcap=softcap)
    if plan.past == 0:
        cache.calls["first_chunk"] += 1
        # First chunk: it is the whole context; attend to it as stored (pads masked). With no
        # pads the kernels read it back from the pages it was just written to (one gather, no
        # round trip of its own); the twins' dense path computes the same attention.
        if not plan.padded and dispatch.use_triton(query):
            out = dispatch.prefill_attention_stored(
                query, layer, plan.block_table, plan.cached_lens, **kw
            )  # [B, H_q, T, D]
            return out.transpose(1, 2).contiguous(), None
        return _dense_attention(
            module, query, _as_stored(key, layer.k), _as_stored(value, layer.v), attention_mask,
            scaling=scale, dropout=dropout, softcap=softcap, kwargs=kwargs,
        )  # fmt: skip
    if query.shape[2] == 1:
        cache.calls["decode"] += 1
        out = dispatch.decode_attention(
            query[:, :, 0], layer, plan.block_table, plan.seq_lens, **kw
        )  # [B, H_q, D]
        return out[:, None], None  # [B, 1, H_q, D]
    cache.calls["prefill"] += 1
    if not plan.padded:  # the chunk is contiguous in the pages: read it back with the prefix
        out = dispatch.prefill_attention_stored(
            query, layer, plan.block_table, plan.cached_lens, **kw
        )
    else:
        out = dispatch.prefill_attention(
            query, _as_stored(key, layer.k), _as_stored(value, layer.v), layer,
            plan.block_table, plan.cached_lens, **kw,
        )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None  # [B, T, H_q, D]
