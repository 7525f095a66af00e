"""Reading the paged cache back and plain float32 attention: the pieces the attention twins,
the kernel tests and calibration share.
"""

from __future__ import annotations

import torch

from sawquant.errors import InputError
from sawquant.format import SideStore
from sawquant.quant.int4 import dequantize, unpack_int4
from sawquant.quant.paged import paged_gather_ref

__all__ = [
    "attention_fp32",
    "check_stores",
    "check_table",
    "gather_heads",
    "gather_pages",
    "prefill_allowed",
    "read_positions",
    "stored_round_trip",
]


def check_stores(k_store: SideStore, v_store: SideStore, h_q: int, d: int, device) -> None:
    """Raise InputError unless one layer's K and V stores fit a query of h_q heads of dim d."""
    for name, st in (("k_store", k_store), ("v_store", v_store)):
        if st.head_dim != d:
            raise InputError(f"{name} head_dim {st.head_dim} != q head_dim {d}; use its layer")
        for pool in st.pools.values():
            if pool.codes.device != device:
                raise InputError(f"{name} lives on {pool.codes.device}, q on {device}")
    if k_store.num_kv_heads != v_store.num_kv_heads:
        raise InputError("k_store and v_store have different KV head counts; pass one layer's")
    if k_store.page_size != v_store.page_size or k_store.num_pages != v_store.num_pages:
        raise InputError("k_store and v_store have different page layouts; pass one layer's")
    if h_q % k_store.num_kv_heads:
        raise InputError(
            f"{h_q} query heads are not a multiple of {k_store.num_kv_heads} KV heads (GQA)"
        )


def check_table(
    block_table: torch.Tensor, lens: torch.Tensor, batch: int, device, lens_name: str
) -> None:
    """Raise InputError unless block_table is int32 [batch, pages] and ``lens`` int32 [batch],
    both on ``device``."""
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype != torch.int32:
        raise InputError(
            f"block_table must be int32 [{batch}, max_pages], got "
            f"{block_table.dtype} {tuple(block_table.shape)}"
        )
    if lens.shape != (batch,) or lens.dtype != torch.int32:
        raise InputError(
            f"{lens_name} must be int32 [{batch}], got {lens.dtype} {tuple(lens.shape)}"
        )
    if block_table.device != device or lens.device != device:
        raise InputError(f"block_table and {lens_name} must be on q's device")


def attention_fp32(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    *,
    softmax_scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain float32 softmax attention. q: [H_q, T, D]; k, v: [H_q, S, D]; allowed: [T, S]."""
    s = (q.float() @ k.float().transpose(-1, -2)) * softmax_scale  # [H_q, T, S]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v.float()


def prefill_allowed(
    cached: int, t: int, total: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """[T, total] bool: query t (absolute cached + t) sees cached keys j < cached and the chunk
    key at column total - T + t' when t' <= t, minus keys more than the window back."""
    q_pos = cached + torch.arange(t, device=device)[:, None]  # [T, 1]
    col = torch.arange(total, device=device)[None, :]
    pad = total - t  # columns [cached, pad) are padding
    k_pos = torch.where(col >= pad, col - pad + cached, col)
    ok = (k_pos <= q_pos) & ((col < cached) | (col >= pad))
    if sliding_window is not None:
        ok &= q_pos - k_pos < sliding_window
    return ok


def stored_prefill_allowed(
    cached: int, t: int, total: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """[T, total] bool for a chunk read back from the pages with its prefix: column j is
    position j, query t is position cached + t and sees j <= cached + t (minus keys more than
    the window back); columns past cached + T (other sequences' longer rows) are never seen."""
    q_pos = cached + torch.arange(t, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(total, device=device)[None, :]
    ok = k_pos <= q_pos
    if sliding_window is not None:
        ok &= q_pos - k_pos < sliding_window
    return ok


def gather_heads(
    store: SideStore, block_table: torch.Tensor, seq_lens: torch.Tensor
) -> list[torch.Tensor]:
    """Dequantize every pool and put its heads back in KV-head order: B x [H_kv, L_b, D] float32,
    still in the store's rotated basis (one sequence at a time: the specification)."""
    parts = {
        bits: paged_gather_ref(pool, block_table, seq_lens) for bits, pool in store.pools.items()
    }
    out = []
    for i, length in enumerate(seq_lens.tolist()):
        x = torch.empty(store.num_kv_heads, length, store.head_dim, device=block_table.device)
        for bits, heads in store.heads.items():
            x[heads.long().to(x.device)] = parts[bits][i]
        out.append(x)
    return out


def _pages(t: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """Whole pages of a pool tensor [P, H, page, X] -> [B, H, n * page, X] (contiguous copies).

    pages: [B, n] page ids; one gather of contiguous pages, no per-element indexing."""
    b, n = pages.shape
    x = t[pages.reshape(-1)]  # [B * n, H, page, X]
    x = x.view(b, n, *t.shape[1:]).transpose(1, 2)  # [B, H, n, page, X]
    return x.reshape(b, t.shape[1], n * t.shape[2], t.shape[3])


def gather_pages(store: SideStore, pages: torch.Tensor) -> torch.Tensor:
    """Dequantize whole pages of every sequence: pages [B, n] page ids -> [B, H_kv, n * page, D]
    float32 in the store's rotated basis (positions past a sequence's end: finite garbage)."""
    b, n = pages.shape
    out = None
    for bits, pool in store.pools.items():
        codes = _pages(pool.codes, pages)  # [B, H_pool, n * page, W]
        if bits == 16:
            x = codes.float()
        else:
            q = unpack_int4(codes) if bits == 4 else codes
            scale, zero = _pages(pool.scale, pages), _pages(pool.zero, pages)
            x = dequantize(q, scale, zero, group_size=pool.spec.group_size)
        if len(store.pools) == 1:  # one pool holds every head, in order
            return x
        if out is None:
            length = n * store.page_size
            out = torch.empty(b, store.num_kv_heads, length, store.head_dim, device=pages.device)
        out.index_copy_(1, store.heads[bits].long().to(out.device), x)
    return out


def read_positions(
    store: SideStore, block_table: torch.Tensor, start: int, end: int
) -> torch.Tensor:
    """Positions [start, end) of one sequence (block_table [1, pages]) read back to the
    original basis: dequantized, un-rotated, transforms undone. [H_kv, end - start, D] float32."""
    from sawquant.quant.hadamard import unrotate
    from sawquant.quant.transforms import restore

    pos = torch.arange(start, end, device=block_table.device)
    page = block_table[0].long()[pos // store.page_size]
    off = pos % store.page_size
    out = torch.empty(store.num_kv_heads, end - start, store.head_dim, device=block_table.device)
    for bits, pool in store.pools.items():
        codes = pool.codes[page, :, off].transpose(0, 1)  # [H_pool, T, W]
        if bits == 16:
            x = codes.float()
        else:
            q = unpack_int4(codes) if bits == 4 else codes
            scale = pool.scale[page, :, off].transpose(0, 1)
            zero = pool.zero[page, :, off].transpose(0, 1)
            x = dequantize(q, scale, zero, group_size=pool.spec.group_size)
        out[store.heads[bits].long()] = x
    out = unrotate(out, store.block, store.signs)
    per_head = [None if t is None else t[:, None, :] for t in (store.center, store.smooth)]
    return restore(out, *per_head)


def stored_round_trip(x: torch.Tensor, store: SideStore) -> torch.Tensor:
    """What the pages of ``store`` would give back for ``x`` (written, then read with
    :func:`read_positions`), without touching the pages: [T, H_kv, D] -> float32 [T, H_kv, D],
    bit-identical to the write twin followed by the read. Lets an attention read a chunk "as
    stored" when its tokens are not (all) in the pages, e.g. left padding."""
    from sawquant.quant.hadamard import rotate, unrotate
    from sawquant.quant.int4 import quantize
    from sawquant.quant.transforms import restore, transform

    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for bits, pool in store.pools.items():
        heads = store.heads[bits].to(device=x.device, dtype=torch.long)
        c = None if store.center is None else store.center[heads]
        m = None if store.inv_smooth is None else store.inv_smooth[heads]
        xr = rotate(transform(x[:, heads], c, m), store.block, store.signs)  # as the writer
        if bits == 16:
            y = xr.to(pool.codes.dtype).float()
        else:
            q, scale, zero = quantize(xr, bits=bits, group_size=pool.spec.group_size)
            y = dequantize(q, scale, zero, group_size=pool.spec.group_size)
        out[:, heads] = y
    out = unrotate(out.transpose(0, 1), store.block, store.signs)  # [H_kv, T, D]
    per_head = [None if t is None else t[:, None, :] for t in (store.center, store.smooth)]
    return restore(out, *per_head).transpose(0, 1)
