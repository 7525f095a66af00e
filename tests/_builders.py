"""Shared test builders: tiny random-weight models and checkpoints (seconds on 2 CPU cores)."""

from __future__ import annotations

import torch


def tiny_causal_lm(kind: str = "Llama", *, seed: int = 0, **overrides):
    """A seeded random ``{kind}ForCausalLM``: 2 layers, hidden 64, 4 q / 2 KV heads, vocab 128.

    ``overrides`` replace or add config fields (head_dim, initializer_range, sliding_window...).
    """
    import transformers

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    fields.update(overrides)
    config = getattr(transformers, f"{kind}Config")(**fields)
    return getattr(transformers, f"{kind}ForCausalLM")(config).eval()


def save_tiny_checkpoint(path, tokenizer, *, kind: str = "Llama", seed: int = 0, **overrides):
    """Save a tiny random ``{kind}ForCausalLM`` with ``tokenizer``'s vocabulary and files to
    ``path`` (a Hugging Face checkpoint directory a CLI command can load). Returns the path."""
    fields = dict(vocab_size=len(tokenizer), head_dim=32, max_position_embeddings=512)
    fields.update(overrides)
    model = tiny_causal_lm(kind, seed=seed, **fields)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# The paged-cache builders live in sawquant.testing, shared with the GPU benchmarks.
from sawquant.testing import copy_side, paged_cache, poisoned_side  # noqa: E402, F401
