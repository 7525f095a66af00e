"""Loading checkpoints: local Hugging Face directories, offline models by name (and the demo),
with one-line errors.

Everything here is offline: from_pretrained is always called with ``local_files_only=True``.
Weights that cannot be read (a truncated or empty safetensors file, a missing shard) and
architectures sawquant cannot serve are refused with a one-line error before any work starts.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sawquant.architectures import check_loaded_model, check_supported
from sawquant.demo import demo_checkpoint_dir
from sawquant.devices import default_device_map
from sawquant.errors import InputError, UnsupportedModelError

__all__ = ["load_demo", "load_model", "no_progress_bars", "parse_max_memory", "weights_error"]


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


def weights_error(path: Any, err: BaseException) -> InputError:
    """The one-line error for weights that cannot be read (truncated, empty, corrupt)."""
    return InputError(
        f"cannot read the weights in {str(path)!r} ({_first_line(err)}); the file is corrupt, "
        "truncated or empty: re-download or re-save the checkpoint (model.safetensors, or "
        "sharded *.safetensors with their index)"
    )


def _is_weights_error(err: BaseException) -> bool:
    from safetensors import SafetensorError

    return isinstance(err, (OSError, SafetensorError)) or (
        # torch.load of a corrupt pytorch_model.bin
        isinstance(err, RuntimeError) and "PytorchStreamReader" in str(err)
    )


def load_model(
    path: str | Path | None = None,
    *,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    dtype: Any = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local checkpoint directory or an offline model's name
    (``gemma3-270m``: :mod:`sawquant.offline`); ``None`` = the demo model.

    device_map None puts the model on the first CUDA device when there is one, else the CPU;
    ``"auto"`` (or any max_memory) spreads it with accelerate. dtype None = bfloat16 on CUDA,
    float32 on CPU. The model is returned in eval mode.
    """
    import torch

    from sawquant.offline import OFFLINE_MODELS, resolve_model

    path = resolve_model(path) if path is not None else demo_checkpoint_dir()
    if not path.exists():
        raise InputError(
            f"model path {str(path)!r} does not exist; pass a local Hugging Face checkpoint "
            f"directory, an offline model ({', '.join(OFFLINE_MODELS)}), or no model for the demo"
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
        device_map = default_device_map()
    on_cuda = torch.cuda.is_available() and _targets_cuda(device_map)
    dtype = _resolve_dtype(dtype, on_cuda=on_cuda)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = dict(dtype=dtype, device_map=device_map, local_files_only=True)
    if memory is not None:
        kwargs["max_memory"] = memory
    try:
        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    except ImportError as err:  # e.g. a pre-quantized checkpoint whose backend is not installed
        raise InputError(
            f"loading {str(path)!r} needs a package that is missing ({_first_line(err)}); "
            "install it, or use a checkpoint with plain bf16/fp16/fp32 weights"
        ) from err
    except Exception as err:  # noqa: BLE001 - only weight-reading failures are translated
        if _is_weights_error(err):
            raise weights_error(path, err) from err
        raise
    check_loaded_model(model)
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
def no_progress_bars() -> Iterator[None]:
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
