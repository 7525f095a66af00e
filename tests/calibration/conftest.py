"""Tiny random-weight models for the calibration tests (seconds on 2 CPU cores)."""

from __future__ import annotations

import pytest
from _builders import tiny_causal_lm


def _tiny(kind: str, **extra):
    return tiny_causal_lm(kind, head_dim=32, max_position_embeddings=512, **extra)


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
