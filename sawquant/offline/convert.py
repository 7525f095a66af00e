"""A GGUF file dequantized into a dense float32 Hugging Face checkpoint (transformers + gguf)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from sawquant.errors import InputError
from sawquant.offline.tokenizers import Meta, gguf_metadata

__all__ = ["convert_gguf"]


def convert_gguf(gguf: Path, out: Path, *, tokenizer: Any, name_or_path: str) -> None:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files of ``gguf`` to ``out``.

    ``tokenizer(meta)`` builds the tokenizer from the GGUF metadata
    (:mod:`sawquant.offline.tokenizers`). The weights are float32: every GGUF block type used
    here (Q4_0/1, Q4_K, Q5_0, Q6_K, Q8_0) dequantizes exactly into it; bf16 would round them.
    """
    import torch

    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise InputError(
            "converting a GGUF model needs the package gguf; install it with: pip install gguf"
        ) from err
    import transformers
    from transformers import AutoModelForCausalLM

    from sawquant.models import no_progress_bars

    kwargs: dict[str, Any] = dict(gguf_file=gguf.name, local_files_only=True)
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        # transformers >= 5.17 keeps GGUF blocks unless asked to dequantize them.
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    # The GGUF reader draws a raw tqdm bar on sys.stderr; library code stays silent.
    with no_progress_bars(), contextlib.redirect_stderr(io.StringIO()):
        meta: Meta = gguf_metadata(gguf)
        tok = tokenizer(meta)
        del meta  # the parsed metadata holds the whole vocabulary several times over
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        model.config.name_or_path = name_or_path
        tok.model_max_length = model.config.max_position_embeddings
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
