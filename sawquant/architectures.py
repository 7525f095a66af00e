"""The one registry of architecture facts sawquant needs, and the KV-cache shape of a model.

Capture, export (value folding), recipes and the runtime all ask here: where each decoder
layer's attention lives in the weights, what its projections are called, whether q/k are normed
before RoPE, which config attributes hold the logit soft-cap, the query scale and the sliding
windows, and which recipe family calibrates it. An architecture that is not registered is
served when it has the standard shape (``num_hidden_layers``, ``num_attention_heads``,
per-layer attention modules with ``layer_idx`` and ``k_proj``/``v_proj``), which
:func:`check_loaded_model` verifies on the loaded model; value folding needs a registered one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sawquant.config import ModelFacts
from sawquant.errors import UnsupportedModelError

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "LayerAttention",
    "architecture_of",
    "attention_modules",
    "check_exact_for",
    "check_loaded_model",
    "check_supported",
    "layer_attention",
    "model_facts",
    "text_config",
]


@dataclass(frozen=True)
class Architecture:
    """What differs between decoder architectures, for calibration, export and the runtime."""

    model_type: str
    family: str = "default"  # the shipped recipe (recipes/<family>.yaml)
    qk_norm: bool = False  # q/k RMSNorm before RoPE (Qwen3, Gemma3): K is cached after it
    softcap_attr: str | None = None  # config attribute of the attention logit soft-cap
    query_scale_attr: str | None = None  # softmax scale = attr ** -0.5, not head_dim ** -0.5
    sliding_all_layers: bool = False  # config.sliding_window applies to every layer (Mistral)
    # Weight-name prefix of layer i's attention, tried in order (multimodal wrappers nest the
    # text model under another name, and the name moved between transformers releases).
    attention_prefixes: tuple[str, ...] = ("model.layers.{i}.self_attn",)
    # v_proj / o_proj are separate linear layers with nothing between them that a rotation of
    # the head dimension would not commute with: the V rotation can be folded into them.
    foldable: bool = True
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"


_GEMMA3_MULTIMODAL = (
    "model.language_model.layers.{i}.self_attn",  # transformers 5
    "language_model.model.layers.{i}.self_attn",  # transformers 4.x checkpoints
)

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", family="llama"),
        Architecture("mistral", family="llama", sliding_all_layers=True),
        Architecture("mixtral", family="llama"),
        Architecture("qwen2", family="qwen2"),
        Architecture("qwen2_moe", family="qwen2"),
        Architecture("qwen3", family="qwen3", qk_norm=True),
        Architecture("qwen3_moe", family="qwen3", qk_norm=True),
        Architecture("gemma", family="gemma"),
        Architecture(
            "gemma2",
            family="gemma",
            softcap_attr="attn_logit_softcapping",
            query_scale_attr="query_pre_attn_scalar",
        ),
        Architecture(
            "gemma3_text",
            family="gemma",
            qk_norm=True,
            softcap_attr="attn_logit_softcapping",
            query_scale_attr="query_pre_attn_scalar",
        ),
        Architecture(
            "gemma3",
            family="gemma",
            qk_norm=True,
            softcap_attr="attn_logit_softcapping",
            query_scale_attr="query_pre_attn_scalar",
            attention_prefixes=_GEMMA3_MULTIMODAL,
        ),
    )
}

# Multi-head latent attention caches a compressed latent, not per-head K/V: not servable here.
_MLA_MODEL_TYPES = frozenset({"deepseek_v2", "deepseek_v3", "kimi_k2", "minicpm3"})
_MLA_ATTRS = ("kv_lora_rank", "q_lora_rank")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def text_config(config: Any) -> Any:
    """The decoder text config (multimodal configs such as Gemma3 nest it)."""
    if not hasattr(config, "to_dict") and hasattr(config, "config"):  # a model was passed
        config = config.config
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def architecture_of(config: Any) -> Architecture:
    """The registered architecture of a config (text config for the layer facts, outer
    model_type for the weight layout), or a default for an unregistered model type."""
    if not hasattr(config, "to_dict") and hasattr(config, "config"):
        config = config.config
    for cfg in (config, text_config(config)):
        model_type = getattr(cfg, "model_type", "") or ""
        if model_type in ARCHITECTURES:
            return ARCHITECTURES[model_type]
    return Architecture(getattr(text_config(config), "model_type", "") or "", foldable=False)


def _check_attention(text: Any) -> None:
    model_type = getattr(text, "model_type", "") or ""
    mla = [a for a in _MLA_ATTRS if getattr(text, a, None)]
    if model_type in _MLA_MODEL_TYPES or mla:
        what = f"model_type {model_type!r}" + (
            f" ({mla[0]}={getattr(text, mla[0])})" if mla else ""
        )
        raise UnsupportedModelError(
            f"{what} uses multi-head latent attention (MLA); the sawquant runtime serves "
            "MHA/GQA/MQA attention only, use a model with per-head K/V projections"
        )


def model_facts(config: Any) -> ModelFacts:
    """The KV-cache shape of a transformers config (or model; the text config if multimodal).

    Raises UnsupportedModelError for attention the runtime cannot serve (MLA, heads that do not
    group evenly, a config missing the standard attention attributes).
    """
    text = text_config(config)
    _check_attention(text)
    model_type = getattr(text, "model_type", "") or ""
    num_layers = getattr(text, "num_hidden_layers", None)
    num_heads = getattr(text, "num_attention_heads", None)
    if not num_layers or not num_heads:
        raise UnsupportedModelError(
            f"config of model_type {model_type!r} has no num_hidden_layers/num_attention_heads; "
            "sawquant serves standard decoder-only transformers (Llama, Qwen, Mistral, Gemma...)"
        )
    num_kv = getattr(text, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text, "head_dim", None)
    if not head_dim:
        hidden = getattr(text, "hidden_size", None)
        if not hidden or hidden % num_heads:
            raise UnsupportedModelError(
                f"cannot infer head_dim of model_type {model_type!r} (hidden_size {hidden}, "
                f"{num_heads} heads); set head_dim in config.json"
            )
        head_dim = hidden // num_heads
    if num_heads % num_kv:
        raise UnsupportedModelError(
            f"{num_heads} query heads do not group evenly over {num_kv} KV heads; the runtime "
            "serves MHA/GQA/MQA where num_attention_heads is a multiple of num_key_value_heads"
        )
    facts = ModelFacts(
        num_layers=int(num_layers),
        num_kv_heads=int(num_kv),
        head_dim=int(head_dim),
        model_type=model_type,
    )
    facts.validate()
    return facts


@dataclass(frozen=True)
class LayerAttention:
    """Per-layer attention parameters the runtime passes to the kernels."""

    softmax_scale: float
    sliding_window: int | None = None  # HF semantics: the last `sliding_window` keys, self included
    softcap: float | None = None


def _sliding_window(text: Any, arch: Architecture, layer_idx: int) -> int | None:
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if arch.sliding_all_layers or getattr(text, "use_sliding_window", False):
        return window
    return None


def layer_attention(config: Any, layer_idx: int) -> LayerAttention:
    """Softmax scale, sliding window and logit soft-cap of one layer, from the config."""
    text = text_config(config)
    arch = architecture_of(config)
    facts = model_facts(config)
    if not 0 <= layer_idx < facts.num_layers:
        raise IndexError(f"layer {layer_idx} out of range for {facts.num_layers} layers")
    base = getattr(text, arch.query_scale_attr, None) if arch.query_scale_attr else None
    scale = float(base or facts.head_dim) ** -0.5
    softcap = getattr(text, arch.softcap_attr, None) if arch.softcap_attr else None
    return LayerAttention(
        softmax_scale=scale,
        sliding_window=_sliding_window(text, arch, layer_idx),
        softcap=float(softcap) if softcap else None,
    )


def check_supported(config: Any) -> ModelFacts:
    """Raise UnsupportedModelError unless the config is a decoder-only causal LM we can serve."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "") or ""
    archs = list(getattr(config, "architectures", None) or [])
    known = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    causal_arch = not archs or any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    if getattr(config, "is_encoder_decoder", False) or not known or not causal_arch:
        shown = ", ".join(archs) or f"model_type {model_type!r}"
        raise UnsupportedModelError(
            f"{shown} is not a decoder-only causal language model; sawquant serves "
            "*ForCausalLM checkpoints (Llama, Qwen, Mistral, Gemma...)"
        )
    return model_facts(config)


def attention_modules(model: Any) -> list[Any]:
    """The model's per-layer attention modules (with an int ``layer_idx`` and K/V
    projections, fused or not), in layer order."""
    arch = architecture_of(model)
    names = (arch.k_proj, "qkv_proj", "kv_proj")
    found = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int)
        and hasattr(m, "config")
        and any(hasattr(m, n) for n in names)
    ]
    return sorted(found, key=lambda m: m.layer_idx)


def check_loaded_model(model: Any) -> ModelFacts:
    """Raise UnsupportedModelError unless every decoder layer of the loaded ``model`` has an
    attention module sawquant can serve (a KV projection and a ``layer_idx``).

    Catches models that pass the config checks but attend differently (an encoder with a
    language-model head such as BertLMHeadModel, a new architecture with fused attention).
    """
    facts = model_facts(model.config)
    layers = sorted({m.layer_idx for m in attention_modules(model)})
    if layers != list(range(facts.num_layers)):
        raise UnsupportedModelError(
            f"{type(model).__name__} has {facts.num_layers} layers but sawquant found KV "
            f"attention (a module with layer_idx and k_proj/v_proj) in {len(layers)}; its "
            "attention is not the decoder kind sawquant serves (Llama, Qwen, Mistral, Gemma...)"
        )
    return facts


def check_exact_for(kv_config: Any, config: Any) -> None:
    """Raise ConfigError when ``kv_config`` uses a transform that is not exact for this model:
    key centering relies on the softmax ignoring a per-query constant, which a logit soft-cap
    (``softcap * tanh(s / softcap)``, Gemma 2) breaks. Smoothing stays exact everywhere."""
    from sawquant.errors import ConfigError

    for i, layer in enumerate(kv_config.layers):
        if layer.k.center is not None and layer_attention(config, i).softcap is not None:
            raise ConfigError(
                f"layers[{i}].k.center: key centering is not exact with this model's attention "
                "logit soft-cap; recalibrate (sawquant calibrate leaves it out for such models)"
            )
