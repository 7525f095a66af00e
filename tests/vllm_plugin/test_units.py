"""Plugin pieces that need vLLM importable but no engine: refusals in the attention impl and
the idempotent install."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "kwargs, what",
    [
        ({"alibi_slopes": [0.5, 0.25]}, "ALiBi slopes"),
        ({"attn_type": "encoder_only"}, "attention type encoder_only"),
        ({"kv_sharing_target_layer_name": "model.layers.0.self_attn.attn"}, "KV sharing"),
        ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype fp8"),
    ],
)
def test_unsupported_attention_is_refused_by_name(kwargs, what):
    from sawquant.runtime.vllm.backend import SawquantAttentionImpl

    args = dict(num_heads=4, head_size=64, scale=0.125, num_kv_heads=2, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype="auto")  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"sawquant: this model's attention uses {what}"):
        SawquantAttentionImpl(**args)


def test_install_is_idempotent():
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.platforms import current_platform

    from sawquant.runtime.vllm.plugin import install

    install()
    cls = type(current_platform)
    hooks = (cls.check_and_update_config, cls.get_attn_backend_cls, Attention.get_kv_cache_spec)
    install()
    again = (cls.check_and_update_config, cls.get_attn_backend_cls, Attention.get_kv_cache_spec)
    assert [h.__func__ if hasattr(h, "__func__") else h for h in hooks] == [
        h.__func__ if hasattr(h, "__func__") else h for h in again
    ]
    assert all(getattr(getattr(h, "__func__", h), "_sawquant_wrapped", False) for h in again)
