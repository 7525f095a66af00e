"""Tiny random-weight models for the calibration tests (seconds on 2 CPU cores)."""

from __future__ import annotations

import pytest
import torch


def _tiny(kind: str, **extra):
    import transformers

    torch.manual_seed(0)
    config_cls = getattr(transformers, f"{kind}Config")
    model_cls = getattr(transformers, f"{kind}ForCausalLM")
    config = config_cls(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        **extra,
    )
    return model_cls(config).eval()


@pytest.fixture(scope="module")
def tiny_llama_gqa():
    """Llama, 2 layers, 4 query / 2 KV heads, head_dim 32."""
    return _tiny("Llama")


@pytest.fixture(scope="module")
def tiny_qwen3():
    """Qwen3 (q/k RMSNorm before RoPE), 2 layers, 4 query / 2 KV heads, head_dim 32."""
    return _tiny("Qwen3")


@pytest.fixture(scope="module")
def tiny_mistral_sliding():
    """Mistral with a sliding window of 8 tokens on every layer."""
    return _tiny("Mistral", sliding_window=8)
