"""Chunked-prefill attention in pure torch: T new queries over the quantized cache plus their
own chunk. The specification of the Triton prefill path and what the runtime runs on the CPU.

Each sequence is computed on its own (so its result never depends on the rest of the batch):
the cached positions are dequantized and un-rotated back to the original basis, the chunk's own
K/V are appended in full precision, and float32 attention runs with the causal (and sliding
window) mask.
"""

from __future__ import annotations

import torch

from sawquant.errors import InputError
from sawquant.format import SideStore
from sawquant.quant.attention import (
    attention_fp32,
    check_stores,
    check_table,
    gather_heads,
    prefill_allowed,
    read_positions,
)
from sawquant.quant.hadamard import unrotate
from sawquant.quant.transforms import restore

__all__ = [
    "check_prefill_inputs",
    "check_stored_prefill_inputs",
    "paged_prefill_attention_ref",
    "paged_prefill_attention_stored_ref",
]


def check_prefill_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    block_table: torch.Tensor,
    cached_lens: torch.Tensor,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> None:
    """Raise InputError naming the argument unless the prefill inputs fit together (shared by
    the twin and the kernel launcher)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise InputError(
            f"q must be [B, H_q, T, D] and k, v [B, H_kv, T, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h_q, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        raise InputError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in B, T or D")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InputError(f"q dtype {q.dtype} is not supported; pass fp16, bf16 or fp32")
    if k.shape[1] != k_store.num_kv_heads:
        raise InputError(
            f"the chunk has {k.shape[1]} KV heads, the stores {k_store.num_kv_heads}; pass this "
            "layer's stores"
        )
    check_stored_prefill_inputs(
        q, k_store, v_store, block_table, cached_lens,
        sliding_window=sliding_window, softcap=softcap, stored=0,
    )  # fmt: skip


def check_stored_prefill_inputs(
    q: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    block_table: torch.Tensor,
    cached_lens: torch.Tensor,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    stored: int | None = None,
) -> None:
    """The checks of :func:`check_prefill_inputs` that do not involve the chunk's own K/V.
    ``stored``: tokens per sequence the pages must hold beyond cached_lens (default T, the
    chunk itself, as the ``*_stored`` attentions read it from the pages)."""
    if q.dim() != 4:
        raise InputError(f"q must be [B, H_q, T, D], got {tuple(q.shape)}")
    b, h_q, t, d = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InputError(f"q dtype {q.dtype} is not supported; pass fp16, bf16 or fp32")
    check_stores(k_store, v_store, h_q, d, q.device)
    check_table(block_table, cached_lens, b, q.device, "cached_lens")
    extra = t if stored is None else stored
    cap = block_table.shape[1] * k_store.page_size
    if extra and b and int(cached_lens.max()) + extra > cap:
        raise InputError(
            f"cached_lens + {extra} chunk tokens exceed the block table ({cap} positions); "
            "allocate the chunk's pages before attending"
        )
    if sliding_window is not None and sliding_window < 1:
        raise InputError(f"sliding_window must be >= 1, got {sliding_window}; or pass None")
    if softcap is not None and softcap <= 0:
        raise InputError(f"softcap must be > 0, got {softcap}; or pass None")


def _per_head(store: SideStore) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """center / smooth shaped [H_kv, 1, D] to broadcast over [H_kv, L, D]."""
    return tuple(None if t is None else t[:, None, :] for t in (store.center, store.smooth))


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    block_table: torch.Tensor,
    cached_lens: torch.Tensor,
    *,
    softmax_scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Equivalent to float32 causal attention over [dequantized cache, chunk] per sequence.

    q: [B, H_q, T, D]; k, v: [B, H_kv, T, D] (the chunk, full precision, not rotated);
    cached_lens: [B] int32 tokens already in the pages. Query t of sequence b sees the cached
    positions < cached_lens[b] and chunk positions <= t (within ``sliding_window`` of it when
    given). Returns [B, H_q, T, D] in q.dtype.
    """
    check_prefill_inputs(
        q, k, v, k_store, v_store, block_table, cached_lens,
        sliding_window=sliding_window, softcap=softcap,
    )  # fmt: skip
    b, h_q, t, _ = q.shape
    group = h_q // k.shape[1]
    keys = gather_heads(k_store, block_table, cached_lens)  # B x [H_kv, C, D] rotated
    values = gather_heads(v_store, block_table, cached_lens)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i, cached in enumerate(cached_lens.tolist()):
        # Cached vectors back in the original basis (un-rotate, then undo the transforms).
        ck = restore(unrotate(keys[i], k_store.block, k_store.signs), *_per_head(k_store))
        cv = restore(unrotate(values[i], v_store.block, v_store.signs), *_per_head(v_store))
        kk = torch.cat([ck, k[i].float()], dim=1)
        vv = torch.cat([cv, v[i].float()], dim=1)
        allowed = prefill_allowed(cached, t, cached + t, sliding_window, q.device)
        out[i] = attention_fp32(
            q[i],
            kk.repeat_interleave(group, dim=0),
            vv.repeat_interleave(group, dim=0),
            allowed,
            softmax_scale=softmax_scale,
            softcap=softcap,
        )
    return out.to(q.dtype)


def paged_prefill_attention_stored_ref(
    q: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    block_table: torch.Tensor,
    cached_lens: torch.Tensor,
    *,
    softmax_scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """:func:`paged_prefill_attention_ref` for a chunk whose T tokens the pages already hold at
    positions [cached_lens[b], cached_lens[b] + T): the chunk attends to its own K/V as stored
    (read back in q.dtype), exactly as it would had they come from the prefix cache. The
    kernel reads them from the pages in the same pass as the prefix."""
    check_stored_prefill_inputs(
        q, k_store, v_store, block_table, cached_lens,
        sliding_window=sliding_window, softcap=softcap,
    )  # fmt: skip
    t = q.shape[2]
    sides = []
    for store in (k_store, v_store):
        rows = [
            read_positions(store, block_table[i : i + 1], c, c + t)
            for i, c in enumerate(cached_lens.tolist())
        ]
        shape = (0, store.num_kv_heads, t, store.head_dim)
        sides.append(torch.stack(rows).to(q.dtype) if rows else q.new_empty(shape))
    return paged_prefill_attention_ref(
        q, *sides, k_store, v_store, block_table, cached_lens,
        softmax_scale=softmax_scale, sliding_window=sliding_window, softcap=softcap,
    )  # fmt: skip
