"""Paged decode attention in pure torch: the specification of the Triton decode kernel, and what
the runtime runs on the CPU.

The context is read in fixed chunks of ``chunk`` positions (aligned to absolute positions, a
multiple of the page size) and merged by the online-softmax recurrence in float32, the same
split/merge structure as the kernel's flash-decoding. Every sequence sees the same sequence of
operations on the same shapes whatever else is in the batch: chunks past its end are fully
masked and leave its state bit-for-bit unchanged, and torch's batched matmuls compute each batch
element on its own. So a sequence's output does not depend on its batch neighbours (batch
invariance, which a serving engine's greedy decoding needs) while a step still costs a fixed
number of torch calls per chunk, not per sequence.
"""

from __future__ import annotations

import torch

from sawquant.errors import InputError
from sawquant.format import SideStore
from sawquant.quant.attention import check_stores, check_table, gather_pages
from sawquant.quant.hadamard import rotate, unrotate
from sawquant.quant.transforms import per_query_head, restore

__all__ = ["DECODE_CHUNK", "check_decode_inputs", "paged_decode_attention_ref"]

DECODE_CHUNK = 256  # positions per chunk (rounded up to a multiple of the page size)


def check_decode_inputs(
    q: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> None:
    """Raise InputError naming the argument unless the decode inputs fit together (shared by
    the twin and the kernel launcher)."""
    if q.dim() != 3:
        raise InputError(f"q must be [batch, q_heads, head_dim], got shape {tuple(q.shape)}")
    b, h_q, d = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InputError(f"q dtype {q.dtype} is not supported; pass fp16, bf16 or fp32")
    check_stores(k_store, v_store, h_q, d, q.device)
    check_table(block_table, seq_lens, b, q.device, "seq_lens")
    if sliding_window is not None and sliding_window < 1:
        raise InputError(f"sliding_window must be >= 1, got {sliding_window}; or pass None")
    if softcap is not None and softcap <= 0:
        raise InputError(f"softcap must be > 0, got {softcap}; or pass None")
    # Reading values back forces a device sync, so it is done only where they are on the CPU;
    # on a GPU the kernel clamps lengths to the block table instead (no out-of-bounds reads).
    if seq_lens.device.type == "cpu":
        cap = block_table.shape[1] * k_store.page_size
        if b and (int(seq_lens.min()) < 1 or int(seq_lens.max()) > cap):
            raise InputError(
                f"seq_lens must be in [1, {cap}] (block table pages x page size); "
                "allocate more pages per sequence"
            )


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_store: SideStore,
    v_store: SideStore,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    softmax_scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    chunk: int = DECODE_CHUNK,
) -> torch.Tensor:
    """Equivalent to float32 attention of the rotated query over the dequantized cache.

    q: [B, H_q, D] (not rotated); block_table: [B, max_pages] int32; seq_lens: [B] int32
    (tokens in the cache, the current one included). Query head h reads KV head
    ``h // (H_q // H_kv)``; ``sliding_window`` keeps the last that many positions; ``softcap``
    maps logits s to ``softcap * tanh(s / softcap)``. Returns [B, H_q, D] in q.dtype,
    un-rotated with the V store's rotation. Transforms: q is multiplied by the K store's
    ``smooth`` (its ``center`` needs nothing: softmax ignores a per-query constant); the output
    gets the V store's ``* smooth + center``. ``num_splits`` is accepted for signature parity
    with the kernel and ignored.
    """
    del num_splits
    check_decode_inputs(
        q, k_store, v_store, block_table, seq_lens, sliding_window=sliding_window, softcap=softcap
    )
    b, h_q, d = q.shape
    h_kv = k_store.num_kv_heads
    if b == 0:
        return torch.empty_like(q)
    page = k_store.page_size
    longest = int(seq_lens.max())
    # Chunks start at fixed positions whatever the batch, so that a sequence's result does not
    # depend on the other sequences of its batch (the float reductions run over the same
    # positions in the same order).
    chunk = -(-max(chunk, page) // page) * page  # whole pages
    lens = seq_lens.long().view(b, 1, 1, 1)
    start = (lens - sliding_window).clamp(min=0) if sliding_window is not None else 0
    qs = restore(q, None, per_query_head(k_store.smooth, h_q))  # q * smooth_k (keys: /)
    qr = rotate(qs, k_store.block, k_store.signs).view(b, h_kv, h_q // h_kv, d)  # float32
    m = torch.full((b, h_kv, h_q // h_kv), float("-inf"), device=q.device)
    l_sum = torch.zeros_like(m)
    acc = torch.zeros(b, h_kv, h_q // h_kv, d, device=q.device)
    cols = block_table.shape[1]
    for c0 in range(0, longest, chunk):
        first = c0 // page
        idx = torch.arange(first, first + chunk // page, device=q.device).clamp(max=cols - 1)
        pages = block_table[:, idx].long()  # [B, n] (clamped columns are masked below)
        pos = c0 + torch.arange(chunk, device=q.device)
        valid = (pos < lens) & (pos >= start)  # [B, 1, 1, chunk]
        keys = gather_pages(k_store, pages)  # [B, H_kv, chunk, D]
        # Masked positions must contribute exact zeros: p is 0 there, and the values are zeroed
        # too, since unwritten slots of an engine's blocks may hold any bytes.
        values = gather_pages(v_store, pages).masked_fill(~valid[:, :, 0, :, None], 0.0)
        s = torch.einsum("bhgd,bhnd->bhgn", qr, keys) * softmax_scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~valid, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        # A fully masked chunk (past the end, or before the window) has m_new == m: alpha is 1
        # and p is 0, so the state is unchanged exactly; -inf - -inf is kept out of exp().
        safe = torch.where(m_new == float("-inf"), 0.0, m_new)
        alpha = torch.exp(m - safe)
        p = torch.exp(s - safe[..., None])
        l_sum = l_sum * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bhgn,bhnd->bhgd", p, values)
        m = m_new
    out = (acc / l_sum[..., None]).reshape(b, h_q, d)
    out = unrotate(out, v_store.block, v_store.signs)
    out = restore(out, per_query_head(v_store.center, h_q), per_query_head(v_store.smooth, h_q))
    return out.to(q.dtype)
