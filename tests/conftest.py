"""Shared fixtures: the demo model and tokenizer (loaded once per session), tiny random models.

The demo fixtures convert the packaged GGUF on the first run of a machine (about 20 s) and then
load the cached dense copy (well under a second after transformers is imported).
"""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. Set before anything imports triton
# (the JIT decorator reads it), which conftest.py guarantees by loading first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One torch thread per test process, CLI commands included (they choose their own count): the
# suite is many small ops, and with 2 threads on a busy 2-core machine they wait on each other
# (the demo verify test took 30 min instead of 2).
os.environ.setdefault("SAWQUANT_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["SAWQUANT_NUM_THREADS"]))


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
