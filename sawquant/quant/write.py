"""The fused write path in pure torch: rotate (block Hadamard) -> quantize -> store into paged
slots, for K and V of one layer step. The specification of the Triton writer (bit-exact) and what
the runtime runs on the CPU.
"""

from __future__ import annotations

import torch

from sawquant.config import SUPPORTED_BLOCKS
from sawquant.errors import InputError
from sawquant.format import SideStore
from sawquant.quant.paged import check_storable, paged_write_ref
from sawquant.quant.transforms import transform

__all__ = ["check_write_inputs", "rotate_quantize_paged_ref"]

INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rotate_quantize_paged_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    *,
    flag: torch.Tensor | None = None,
    flag_value: int = 1,
) -> None:
    """Rotate, quantize and store K and V of T new tokens into their page slots, in place.

    k, v: [T, H_kv, D] post-RoPE (bf16/fp16/fp32); slot_mapping: [T] int64
    (``page * page_size + offset``, -1 skips the token). Each KV head goes to its pool in the
    store: INT4/INT8 pools get rotated quantized codes + fp16 scale/zero, a 16-bit pool the
    rotated vectors in its dtype; a store's center / smooth apply first
    (``sawquant.quant.transforms``).

    Equivalent to ``sawquant.quant.paged_write_ref(x[:, heads], slot_mapping, pool, block=...,
    signs=...)`` for every pool of each side (pure torch; the CPU path of the runtime). Raises
    ``InputError`` on mismatched shapes, dtypes or devices and NonFiniteKVError on values that
    cannot be stored (``flag``/``flag_value``: accepted for parity with the kernel, which
    flags instead of raising). NaN/Inf inputs are refused before anything is written.
    """
    del flag, flag_value
    check_write_inputs(k, v, slot_mapping, k_store, v_store)
    keep = slot_mapping >= 0
    for x in (k, v):
        check_storable(x[keep].float(), 16, torch.float32)  # NaN/Inf: nothing written yet
    for x, store in ((k, k_store), (v, v_store)):
        for bits, pool in store.pools.items():
            heads = store.heads[bits].to(device=x.device, dtype=torch.long)
            c = None if store.center is None else store.center[heads]
            m = None if store.inv_smooth is None else store.inv_smooth[heads]
            xt = transform(x[:, heads], c, m)  # [T, Hp, D] float32, centered and smoothed
            paged_write_ref(xt, slot_mapping, pool, block=store.block, signs=store.signs)


def check_write_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
) -> None:
    for name, x, store in (("k", k, k_store), ("v", v, v_store)):
        if x.dim() != 3:
            raise InputError(f"{name} must be [T, H_kv, D], got shape {tuple(x.shape)}")
        if x.dtype not in INPUT_DTYPES:
            raise InputError(f"{name} dtype {x.dtype} is not supported; pass bf16, fp16 or fp32")
        if (x.shape[1], x.shape[2]) != (store.num_kv_heads, store.head_dim):
            raise InputError(
                f"{name} has {x.shape[1]} heads of dim {x.shape[2]} but its store holds "
                f"{store.num_kv_heads} heads of dim {store.head_dim}; pass the matching store"
            )
        if store.block not in SUPPORTED_BLOCKS or store.head_dim % store.block:
            raise InputError(
                f"{name} store rotation block {store.block} must be one of {SUPPORTED_BLOCKS} "
                f"and divide head_dim {store.head_dim}"
            )
        if store.signs is not None and tuple(store.signs.shape) != (store.head_dim,):
            raise InputError(
                f"{name} store signs must be [{store.head_dim}], got {tuple(store.signs.shape)}"
            )
    if k.shape[0] != v.shape[0]:
        raise InputError(f"k has {k.shape[0]} tokens but v has {v.shape[0]}; pass the same T")
    if slot_mapping.dtype != torch.int64 or tuple(slot_mapping.shape) != (k.shape[0],):
        raise InputError(
            f"slot_mapping must be int64 [{k.shape[0]}], got {slot_mapping.dtype} "
            f"{tuple(slot_mapping.shape)}"
        )
    sizes = {p.spec.page_size for s in (k_store, v_store) for p in s.pools.values()}
    if len(sizes) != 1:
        raise InputError(f"k and v pools must share one page size, got {sorted(sizes)}")
    device = k.device
    for name, t in _tensors(k, v, slot_mapping, k_store, v_store):
        if t.device != device:
            raise InputError(f"{name()} is on {t.device} but k is on {device}; move it there")


def _tensors(k, v, slot_mapping, k_store, v_store):
    """(name, tensor) of every tensor the write touches; names are built only when needed."""
    yield lambda: "v", v
    yield lambda: "slot_mapping", slot_mapping
    for side, store in (("k", k_store), ("v", v_store)):
        if store.signs is not None:
            yield lambda side=side: f"{side}_store.signs", store.signs
        for name in ("center", "inv_smooth"):
            if getattr(store, name) is not None:
                yield lambda side=side, name=name: f"{side}_store.{name}", getattr(store, name)
        for bits, pool in store.pools.items():
            yield lambda side=side, bits=bits: f"{side}_store.heads[{bits}]", store.heads[bits]
            for field in ("codes", "scale", "zero"):
                t = getattr(pool, field)
                if t is not None:
                    yield lambda s=side, b=bits, f=field: f"{s}_store.pools[{b}].{f}", t
