"""Shared fixtures: the demo model and tokenizer (loaded once per session), tiny random models.

The demo fixtures convert the packaged GGUF on the first run of a machine (about 20 s) and then
load the cached dense copy (well under a second after transformers is imported).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def demo_model():
    """``(model, tokenizer)`` of the demo SmolLM2-135M, float32, on the CPU, in eval mode.

    Shared by every test of the session: do not modify it in place (patch attention, change
    weights); use ``fresh_demo_model`` for that.
    """
    from sawquant.models import load_demo

    model, tokenizer = load_demo(torch.float32, device_map="cpu")
    return model, tokenizer


@pytest.fixture
def fresh_demo_model():
    """A private ``(model, tokenizer)`` copy of the demo model that a test may modify."""
    from sawquant.models import load_demo

    return load_demo(torch.float32, device_map="cpu")


@pytest.fixture(scope="session")
def demo_tokenizer():
    """The demo tokenizer alone (no model load)."""
    from transformers import AutoTokenizer

    from sawquant.demo import demo_checkpoint_dir

    return AutoTokenizer.from_pretrained(demo_checkpoint_dir(), local_files_only=True)


@pytest.fixture(scope="session")
def tiny_llama():
    """A seeded random-weight Llama (2 layers, hidden 64, 4 q / 2 KV heads, head_dim 16)."""
    from _builders import tiny_causal_lm

    return tiny_causal_lm("Llama")
