"""Folding each layer's value rotation R into v_proj/o_proj at export (``--fold-values``).

The written config then says ``values_folded: true`` with identity V rotations, so the runtime
stores V exactly as the model produces it and never un-rotates. Per KV head h and query head j
(D = head_dim, rows/columns of that head only)::

    v'_h = v_h @ R           ->  W_v'[h] = R.T @ W_v[h]   ([D, hidden]),  b_v'[h] = b_v[h] @ R
    o_j' = o_j @ R (GQA)     ->  W_o'[:, j] = W_o[:, j] @ R   ([hidden, D]), so
    o_j' @ W_o'[:, j].T = o_j @ R @ R.T @ W_o[:, j].T = o_j @ W_o[:, j].T   (R orthonormal)

The softmax weights only depend on q and k, so the attention output of head j is the
(rotated) mix of its KV head's rotated values and the model's output is unchanged in exact
arithmetic; the fold is computed in float64 and cast back to the checkpoint's dtype. Only the
safetensors shards holding a folded v_proj/o_proj are rewritten; the others stay hard links.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from sawquant.config import KVConfig, LayerConfig, SideConfig
from sawquant.errors import InputError, UnsupportedModelError
from sawquant.quant.hadamard import block_hadamard
from sawquant.weights import weight_map

__all__ = [
    "fold_value_rotation",
    "folded_config",
    "needs_fold",
    "plan_fold",
    "write_folded_shard",
]


def needs_fold(side: SideConfig) -> bool:
    return side.rotation_block != 1 or side.sign_seed is not None


# Each tensor folds on its own (W_v', b_v' and W_o' each depend only on their own tensor and R),
# so shards stream one at a time: memory is one shard, never the whole model.
def _fold_v_weight(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # w: [H_kv * D, hidden] -> per KV head R.T @ W_v[h], in float64
    d = r.shape[0]
    wv = w.to(torch.float64).reshape(-1, d, w.shape[-1])  # [H_kv, D, hidden]
    return torch.einsum("de,hdi->hei", r.to(torch.float64), wv).reshape(w.shape)


def _fold_v_bias(b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # b: [H_kv * D] -> per KV head b_v[h] @ R
    d = r.shape[0]
    return (b.to(torch.float64).reshape(-1, d) @ r.to(torch.float64)).reshape(b.shape)


def _fold_o_weight(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # w: [hidden, H_q * D] -> per query head W_o[:, j] @ R
    d = r.shape[0]
    wo = w.to(torch.float64).reshape(w.shape[0], -1, d)  # [hidden, H_q, D]
    return (wo @ r.to(torch.float64)).reshape(w.shape)


_FOLDERS = {
    "v_proj.weight": _fold_v_weight,
    "v_proj.bias": _fold_v_bias,
    "o_proj.weight": _fold_o_weight,
}


def fold_value_rotation(
    w_v: torch.Tensor,
    b_v: torch.Tensor | None,
    w_o: torch.Tensor,
    r: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Fold the value rotation R into one layer's v_proj and o_proj, in float64.

    w_v: [H_kv * D, hidden] (nn.Linear layout), b_v: [H_kv * D] or None, w_o: [hidden, H_q * D],
    r: [D, D] orthonormal. Returns (w_v', b_v', w_o') in float64 such that the projected values
    become ``v @ R`` per KV head and ``o_proj`` maps rotated head outputs to the same result.
    Equivalent to ``W_v'[h] = R.T @ W_v[h]``, ``b_v'[h] = b_v[h] @ R`` per KV head h and
    ``W_o'[:, j] = W_o[:, j] @ R`` per query head j.
    """
    b_new = None if b_v is None else _fold_v_bias(b_v, r)
    return _fold_v_weight(w_v, r), b_new, _fold_o_weight(w_o, r)


def _probe_fold(part: str, old: torch.Tensor, new: torch.Tensor, r: torch.Tensor, where: str):
    """Check in float64 on random inputs that a folded tensor does what the rotation promises."""
    r = r.to(torch.float64)
    d = r.shape[0]
    old, new = old.to(torch.float64), new.to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    if part == "v_proj.bias":
        got, want = new.reshape(-1, d), old.reshape(-1, d) @ r
    else:
        x = torch.randn(4, old.shape[-1], generator=gen, dtype=torch.float64)  # [4, in]
        if part == "v_proj.weight":  # x @ W_v'.T == (x @ W_v.T) @ R per KV head
            got, want = (x @ new.T).reshape(4, -1, d), (x @ old.T).reshape(4, -1, d) @ r
        else:  # rotated head outputs through W_o' == plain ones through W_o
            got = ((x.reshape(4, -1, d) @ r).reshape(4, -1)) @ new.T
            want = x @ old.T
    if not torch.allclose(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max() + 1)):
        raise RuntimeError(f"internal error: value folding check failed for {where}")


def _apply_fold(name: str, tensor: torch.Tensor, fold: tuple[str, torch.Tensor]) -> torch.Tensor:
    """The folded tensor in the original dtype (float64 math, one final rounding)."""
    part, r = fold
    new = _FOLDERS[part](tensor, r)
    _probe_fold(part, tensor, new, r, name)
    return new.to(tensor.dtype).contiguous()


def _attention_names(model_type: str, weight_names: set[str], num_layers: int) -> list[str]:
    """The safetensors prefix of each layer's attention (``...self_attn``), or a clear error."""
    from sawquant.architectures import ARCHITECTURES

    arch = ARCHITECTURES.get(model_type)
    if arch is None or not arch.foldable:
        foldable = sorted(t for t, a in ARCHITECTURES.items() if a.foldable)
        raise UnsupportedModelError(
            f"--fold-values does not know where v_proj/o_proj live in model type {model_type!r} "
            f"(supported: {', '.join(foldable)}); export without --fold-values"
        )
    for prefix in arch.attention_prefixes:
        names = [prefix.format(i=i) for i in range(num_layers)]
        if all(f"{n}.v_proj.weight" in weight_names for n in names):
            if all(f"{n}.o_proj.weight" in weight_names for n in names):
                return names
    raise UnsupportedModelError(
        f"no separate v_proj/o_proj weights found for model type {model_type!r} (fused qkv?); "
        "export without --fold-values"
    )


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def plan_fold(
    source: Path, config: KVConfig, hf_json: dict, num_q_heads: int
) -> tuple[dict[str, dict[str, tuple[str, torch.Tensor]]], list[int]]:
    """What to fold where: {shard file: {tensor name: (part, R)}}, and the folded layers.

    Reads only tensor headers (shapes, dtypes), so every refusal happens before any write.
    """
    from safetensors import safe_open

    for key in ("quantization_config", "compression_config"):
        if key in hf_json or key in (hf_json.get("text_config") or {}):
            raise InputError(
                f"the source weights are quantized ({key} in config.json) and cannot be folded; "
                "export without --fold-values"
            )
    layers = [i for i, layer in enumerate(config.layers) if needs_fold(layer.v)]
    if not layers:
        return {}, []
    # V's centering and smoothing rows are per channel of the unrotated basis the calibration
    # measured; in the folded basis they would still be exact but no longer fit the data.
    shaped = [i for i in layers if config.layers[i].v.center or config.layers[i].v.smooth]
    if shaped:
        raise InputError(
            f"layers {shaped} center or smooth their values, which --fold-values cannot carry "
            "into the folded basis; export without --fold-values (the rotation then stays in "
            "the cache, at the same accuracy)"
        )
    mapping = weight_map(source)
    if mapping is None:
        raise InputError(
            f"{source} has no safetensors weights; --fold-values needs model.safetensors "
            "(re-save with save_pretrained) or export without --fold-values"
        )
    # The top-level type names the weight layout (a multimodal wrapper nests the text model).
    model_type = str(hf_json.get("model_type", ""))
    prefixes = _attention_names(model_type, set(mapping), config.model.num_layers)
    d, h_kv = config.model.head_dim, config.model.num_kv_heads
    want_shape = {
        "v_proj.weight": lambda s: len(s) == 2 and s[0] == h_kv * d,
        "v_proj.bias": lambda s: list(s) == [h_kv * d],
        "o_proj.weight": lambda s: len(s) == 2 and s[1] == num_q_heads * d,
    }
    plan: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for i in layers:
        side = config.layers[i].v
        r = block_hadamard(d, side.rotation_block, seed=side.sign_seed, dtype=torch.float64)
        for part, ok in want_shape.items():
            name = f"{prefixes[i]}.{part}"
            if name not in mapping:  # only a bias may be absent (checked above for weights)
                continue
            if not (source / mapping[name]).is_file():
                raise InputError(
                    f"{source} index names {mapping[name]} for {name}, but that file is "
                    "missing; re-download the checkpoint"
                )
            with safe_open(str(source / mapping[name]), framework="pt") as f:
                info = f.get_slice(name)
                shape, dtype = info.get_shape(), info.get_dtype()
            if dtype not in _FLOAT_DTYPES:
                raise InputError(
                    f"{name} is {dtype}, not floating point (quantized weights?); "
                    "export without --fold-values"
                )
            if not ok(shape):
                raise UnsupportedModelError(
                    f"{name} has shape {list(shape)}, which does not match {h_kv} KV heads / "
                    f"{num_q_heads} query heads of head_dim {d}; export without --fold-values"
                )
            plan.setdefault(mapping[name], {})[name] = (part, r)
    return plan, layers


def folded_config(config: KVConfig) -> KVConfig:
    """values_folded=True and identity V rotations: no consumer can rotate V a second time."""
    identity = [
        LayerConfig(k=layer.k, v=replace(layer.v, rotation_block=1, sign_seed=None))
        for layer in config.layers
    ]
    return replace(config, layers=tuple(identity), values_folded=True)


def write_folded_shard(src: Path, dst: Path, folds: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Write a copy of safetensors file ``src`` to ``dst`` with the ``folds`` applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        tensors = {}
        for name in f.keys():
            tensor = f.get_tensor(name)
            tensors[name] = _apply_fold(name, tensor, folds[name]) if name in folds else tensor
    save_file(tensors, str(dst), metadata=metadata)
    shutil.copymode(src, dst)  # same permissions as the linked files beside it
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
