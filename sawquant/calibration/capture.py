"""See every layer's post-RoPE queries, keys and values through the model's own attention path.

transformers routes each attention layer through
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` with the query, key and value already
projected, normed (Qwen3/Gemma3 q/k norm) and rotated (RoPE), keys and values still one per KV
head (before GQA repetition): exactly what a KV cache stores. We register one extra
implementation that hands those tensors to a Python callback, lets it observe them or replace
K/V (simulated quantization), then calls the implementation the model was using. No modeling
code is copied, so every architecture transformers runs this way is covered.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sawquant.architectures import attention_modules

__all__ = ["AttentionCall", "intercept_attention"]

# Two registered names because the mask a model builds is chosen by the implementation name:
# eager-style inner functions need the additive float mask, the others the boolean/None one.
_HOOK = "sawquant_hook"
_HOOK_EAGER = "sawquant_hook_eagermask"
_INNER_ATTR = "_sawquant_inner"
_CALLBACK_ATTR = "_sawquant_callback"
_OUTPUT_ATTR = "_sawquant_on_output"


@dataclass
class AttentionCall:
    """One attention layer's inputs, as the model passes them to its attention function.

    query: [B, H_q, S_q, D]; key/value: [B, H_kv, S_kv, D] post-RoPE, one per KV head.
    ``mask`` is ``allowed[b, i, j]`` (bool [B, S_q, S_kv]): query i may attend key j.
    """

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    softcap: float | None
    raw_mask: torch.Tensor | None
    sliding_window: int | None

    @property
    def mask(self) -> torch.Tensor:
        b, s_q, s_kv = self.query.shape[0], self.query.shape[2], self.key.shape[2]
        m = self.raw_mask
        if m is not None:
            m = m[:, 0] if m.dim() == 4 else m  # [B, 1, S_q, S_kv] -> [B, S_q, S_kv]
            if m.dtype != torch.bool:
                m = m > torch.finfo(m.dtype).min / 2  # additive mask: 0 allowed, -inf/min not
            return m[..., -s_kv:].expand(b, s_q, s_kv)
        # No mask means plain causal (the query block sits at the end of the keys).
        i = torch.arange(s_q, device=self.key.device)[:, None] + (s_kv - s_q)
        j = torch.arange(s_kv, device=self.key.device)[None, :]
        allowed = j <= i
        if self.sliding_window:
            allowed &= j > i - self.sliding_window
        return allowed.expand(b, s_q, s_kv)


Callback = Callable[[AttentionCall], "tuple[torch.Tensor, torch.Tensor] | None"]


def _hooked_attention(module, query, key, value, attention_mask, **kwargs):
    callback = getattr(module, _CALLBACK_ATTR, None)
    inner = getattr(module, _INNER_ATTR)
    if callback is not None:
        call = AttentionCall(
            layer_idx=int(module.layer_idx),
            query=query,
            key=key,
            value=value,
            scaling=float(kwargs.get("scaling") or query.shape[-1] ** -0.5),
            softcap=kwargs.get("softcap"),
            raw_mask=attention_mask if isinstance(attention_mask, torch.Tensor) else None,
            sliding_window=kwargs.get("sliding_window"),
        )
        replaced = callback(call)
        if replaced is not None:
            key, value = replaced
    result = inner(module, query, key, value, attention_mask, **kwargs)
    on_output = getattr(module, _OUTPUT_ATTR, None)
    if on_output is not None:
        on_output(int(module.layer_idx), result[0])  # [B, S_q, H_q, D]
    return result


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(_HOOK, _hooked_attention)
    AttentionInterface.register(_HOOK_EAGER, _hooked_attention)
    AttentionMaskInterface.register(_HOOK, sdpa_mask)
    AttentionMaskInterface.register(_HOOK_EAGER, eager_mask)


def _inner_function(module: torch.nn.Module, needs_eager: bool) -> Callable:
    """The attention function the layer would have used (eager comes from its modeling file)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if needs_eager:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward")
        return eager
    # flash/flex/sdpa layers all get the sdpa-style mask from our registration; sdpa serves them.
    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _set_impl(model: Any, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    try:
        setter(name)
    except (AttributeError, TypeError, ValueError, KeyError):
        model.config._attn_implementation = name
    for m in model.modules():  # submodels that keep their own config object
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and m is not model:
            if getattr(cfg, "_attn_implementation", None) != name:
                cfg._attn_implementation = name


@contextlib.contextmanager
def intercept_attention(
    model: Any,
    callback: Callback | None,
    *,
    on_output: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[None]:
    """Within the block, every attention layer calls ``callback(AttentionCall)`` first.

    The callback may return ``(key, value)`` (same shapes) to replace what the layer attends to,
    or None to only observe. ``on_output(layer_idx, out)`` then sees the attention output
    ``[B, S_q, H_q, D]`` (before o_proj). The model's attention implementation is restored on
    exit.
    """
    _register()
    modules = attention_modules(model)
    if not modules:
        raise RuntimeError(f"{type(model).__name__} has no attention layers with a layer_idx")
    original = model.config._attn_implementation or "sdpa"
    softcap = any(getattr(m, "attn_logit_softcapping", None) for m in modules) or getattr(
        getattr(model.config, "get_text_config", lambda **_: model.config)(decoder=True),
        "attn_logit_softcapping",
        None,
    )
    # sdpa cannot soft-cap logits, so soft-capped models (Gemma2) run the eager path.
    needs_eager = original == "eager" or bool(softcap)
    for m in modules:
        setattr(m, _INNER_ATTR, _inner_function(m, needs_eager))
        setattr(m, _CALLBACK_ATTR, callback)
        setattr(m, _OUTPUT_ATTR, on_output)
    _set_impl(model, _HOOK_EAGER if needs_eager else _HOOK)
    try:
        yield
    finally:
        _set_impl(model, original)
        for m in modules:
            for attr in (_INNER_ATTR, _CALLBACK_ATTR, _OUTPUT_ATTR):
                if hasattr(m, attr):
                    delattr(m, attr)
