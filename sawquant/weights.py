"""A checkpoint's weight files: which safetensors shard holds which tensor, and whether every
weight can be read and is finite (what export promises before it writes anything).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from sawquant.errors import InputError

__all__ = ["INDEX_FILE", "SINGLE_FILE", "check_weights", "weight_map"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _safe_open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (OSError, SafetensorError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(
            f"cannot read the weights in {path} ({first}); the file is corrupt, truncated or "
            "empty: re-download or re-save the checkpoint"
        ) from None


def weight_map(source: Path) -> dict[str, str] | None:
    """tensor name -> safetensors file (relative), or None if the weights are not safetensors."""
    index = source / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        mapping = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(mapping, dict):
            raise InputError(f"{index} has no readable weight_map; repair or re-download it")
        return {str(k): str(v) for k, v in mapping.items()}
    single = source / SINGLE_FILE
    if single.is_file():
        with _safe_open(single) as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    return None


def check_weights(
    source: Path, progress: Callable[[int, int], None] | None = None
) -> tuple[int, int]:
    """Read every tensor of the safetensors weights once and raise InputError on the first that
    cannot be read or holds NaN/Inf. One tensor in memory at a time.

    Returns (tensors checked, bytes read); (0, 0) when the weights are not safetensors.
    ``progress(done, total)`` is called per shard.
    """
    import torch

    mapping = weight_map(source)
    if mapping is None:
        return 0, 0
    shards = sorted(set(mapping.values()))
    tensors = nbytes = 0
    for done, shard in enumerate(shards):
        path = source / shard
        if not path.is_file():
            raise InputError(
                f"{source} index names {shard}, but that file is missing; re-download it"
            )
        with _safe_open(path) as f:
            for name in f.keys():
                try:
                    t = f.get_tensor(name)
                except Exception as err:  # noqa: BLE001 - safetensors raises its own types
                    raise InputError(
                        f"cannot read tensor {name} from {path} ({type(err).__name__}); the "
                        "file is corrupt: re-download or re-save the checkpoint"
                    ) from None
                tensors += 1
                nbytes += t.numel() * t.element_size()
                if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise InputError(
                        f"weight {name} in {path} has {bad} NaN/Inf value(s) of {t.numel()}; "
                        "the checkpoint is broken: re-download or re-train it"
                    )
        if progress is not None:
            progress(done + 1, len(shards))
    return tensors, nbytes


def describe_size(nbytes: int) -> str:
    """Bytes as a short human size (``1.2 GB``)."""
    if nbytes <= 0:
        return "0 B"
    units = ("B", "KB", "MB", "GB", "TB")
    i = min(int(math.log(nbytes, 1000)), len(units) - 1)
    return f"{nbytes / 1000**i:.1f} {units[i]}"
