"""Simulated KV quantization: what the paged INT4 cache does to K/V, applied in a plain forward.

``fake_quant_side`` is the cache round trip of one side (rotate -> quantize each head at its
precision -> dequantize -> unrotate); ``simulated_perplexity`` runs a model with every layer's K
and V replaced by that round trip, through the model's own attention path. Both run on any
device and need no kernels, so calibration and verification can measure a config anywhere.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sawquant.config import KVConfig, SideConfig
from sawquant.quant.hadamard import random_signs, rotate, unrotate
from sawquant.quant.int4 import dequantize, quantize
from sawquant.quant.transforms import restore, transform

__all__ = [
    "fake_quant_side",
    "input_device",
    "next_token_nll",
    "simulated_perplexity",
    "window_nlls",
]


def fake_quant_side(x: torch.Tensor, side: SideConfig) -> torch.Tensor:
    """Round-trip x through the cache format of ``side``; returns float32, same shape.

    x: [..., H_kv, S, D] (dim -3 indexes KV heads, so ``side.fallback_heads`` applies per head).
    Equivalent to ``paged_write_ref`` followed by ``paged_gather_ref``, the un-rotation and the
    undone transforms (centering, smoothing): INT4/INT8 heads are quantized per token (or per
    group), BF16 heads are rounded to bfloat16.
    """
    d, h = x.shape[-1], x.shape[-3]
    signs = random_signs(d, side.sign_seed).to(x.device) if side.sign_seed is not None else None
    center, smooth = (
        None if rows is None else torch.tensor(rows, dtype=torch.float32, device=x.device)[:, None]
        for rows in (side.center, side.smooth)
    )  # [H_kv, 1, D]: broadcast over the tokens
    inv = None if smooth is None else 1.0 / smooth
    xr = rotate(transform(x, center, inv), side.rotation_block, signs)  # float32
    head_bits = side.head_bits(h)
    if len(set(head_bits)) == 1:
        out = _round_trip(xr, head_bits[0], side.group_size)
    else:
        out = torch.empty_like(xr)
        for bits in sorted(set(head_bits)):
            idx = torch.tensor([i for i, b in enumerate(head_bits) if b == bits], device=x.device)
            out.index_copy_(-3, idx, _round_trip(xr.index_select(-3, idx), bits, side.group_size))
    return restore(unrotate(out, side.rotation_block, signs), center, smooth)


def _round_trip(x: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    if bits == 16:
        return x.to(torch.bfloat16).float()
    q, scale, zero = quantize(x, bits=bits, group_size=group_size)
    return dequantize(q, scale, zero, group_size=group_size)


@torch.inference_mode()
def window_nlls(
    model: Any,
    windows: torch.Tensor,
    config: KVConfig | None,
    *,
    batch_size: int = 1,
) -> torch.Tensor:
    """Summed next-token NLL of each window ([N] float64, L - 1 predictions each) with every
    cached K/V quantized as ``config`` says (None = full precision).

    Each window is one full forward in which every layer attends to fake-quantized K and V:
    the cache a decoder would read after a prefill (the papers' convention).
    """
    from sawquant.calibration.capture import intercept_attention

    sides = None
    if config is not None:
        from sawquant.architectures import check_exact_for, model_facts

        facts = model_facts(model.config)
        config.check_model(facts.num_layers, facts.num_kv_heads, facts.head_dim)
        check_exact_for(config, model.config)
        sides = [(layer.k, layer.v) for layer in config.layers]

    def quantize_kv(call):
        k_side, v_side = sides[call.layer_idx]
        k = fake_quant_side(call.key, k_side).to(call.key.dtype)
        v = fake_quant_side(call.value, v_side).to(call.value.dtype)
        return k, v

    device = input_device(model)
    out = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        if sides is None:
            logits = model(input_ids=ids, use_cache=False).logits
        else:
            with intercept_attention(model, quantize_kv):
                logits = model(input_ids=ids, use_cache=False).logits
        # Predict token t+1 from the prefix up to t.
        target = ids[:, 1:].to(logits.device)
        out.append(next_token_nll(logits[:, :-1], target).double().sum(-1).cpu())
        del logits
    return torch.cat(out)


NLL_CHUNK = 128  # positions per log-softmax in next_token_nll


def next_token_nll(
    logits: torch.Tensor, target: torch.Tensor, *, chunk: int = NLL_CHUNK
) -> torch.Tensor:
    """``-log softmax(logits)[target]`` per position ([..., n, V], [..., n] -> [..., n] float32),
    ``chunk`` positions at a time: the float32 log-softmax of the whole window (at vocabulary
    152k and 1024 positions, 622 MB on top of the logits) never exists at once; each row's
    value is the same as the unchunked computation's."""
    flat = logits.reshape(-1, logits.shape[-1])
    tgt = target.reshape(-1)
    out = torch.empty(tgt.shape, dtype=torch.float32, device=logits.device)
    for lo in range(0, flat.shape[0], chunk):
        logp = flat[lo : lo + chunk].float().log_softmax(-1)
        out[lo : lo + chunk] = -logp.gather(-1, tgt[lo : lo + chunk, None])[:, 0]
    return out.view(target.shape)


def simulated_perplexity(
    model: Any,
    windows: torch.Tensor,
    config: KVConfig | None,
    *,
    batch_size: int = 1,
) -> float:
    """Perplexity over ``windows`` ([N, L] token ids) with every cached K/V quantized (see
    :func:`window_nlls`); tokens are weighted equally over all N * (L - 1) predictions."""
    nll = window_nlls(model, windows, config, batch_size=batch_size)
    return math.exp(float(nll.sum()) / (windows.shape[0] * (windows.shape[1] - 1)))


def input_device(model: Any) -> torch.device:
    """Where the token ids go: the embedding's device (CPU when accelerate offloaded it)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device
