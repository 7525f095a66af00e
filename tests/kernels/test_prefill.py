"""Chunked-prefill attention: Triton dequant-gather + SDPA against the float32 twin."""

from __future__ import annotations

import pytest
import torch
from _paged_fixture import build_cache, check_close, poison_float_allocations

from sawquant.errors import InputError
from sawquant.kernels.prefill import paged_prefill_attention, paged_prefill_attention_stored
from sawquant.quant import unrotate
from sawquant.quant.attention import gather_heads as _gather_heads
from sawquant.quant.attention import read_positions, stored_round_trip
from sawquant.quant.prefill import (
    _per_head,
    paged_prefill_attention_ref,
    paged_prefill_attention_stored_ref,
)
from sawquant.quant.transforms import restore


def _torch_lowp(q, k, v, k_store, v_store, table, cached, *, scale, window=None, softcap=None):
    """Plain torch attention in q.dtype over [dequantized cache | chunk] (the yardstick)."""
    dt = q.dtype
    t = q.shape[2]
    group = q.shape[1] // k.shape[1]
    keys = _gather_heads(k_store, table, cached)
    values = _gather_heads(v_store, table, cached)
    out = []
    for i, c in enumerate(cached.tolist()):
        ck = restore(unrotate(keys[i], k_store.block, k_store.signs), *_per_head(k_store))
        cv = restore(unrotate(values[i], v_store.block, v_store.signs), *_per_head(v_store))
        kk = torch.cat([ck.to(dt), k[i].to(dt)], 1)
        vv = torch.cat([cv.to(dt), v[i].to(dt)], 1)
        s = q[i] @ kk.repeat_interleave(group, 0).transpose(-1, -2) * scale  # [H_q, T, c + T]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        q_pos = c + torch.arange(t)[:, None]
        k_pos = torch.arange(c + t)[None, :]
        ok = k_pos <= q_pos
        if window is not None:
            ok &= q_pos - k_pos < window
        s = s.masked_fill(~ok, float("-inf"))
        out.append(torch.softmax(s, -1) @ vv.repeat_interleave(group, 0))
    return torch.stack(out)


CASES = {
    # name: head_dim, block, page, (H_q, H_kv), dtype, cached, T, window, softcap, extra
    "mixed-cached-incl-empty": (64, 16, 16, (4, 2), torch.bfloat16, [0, 37], 9, None, None, {}),
    "equal-cached-flash-path": (128, 128, 64, (8, 2), torch.float16, [70, 70], 8, None, None, {}),
    "gqa3-window-fallback": (
        64, 32, 16, (6, 2), torch.bfloat16, [50, 21], 12, 20, None,
        {"k_bits": (8, 4), "v_bits": (4, 16)},
    ),
    "d96-softcap": (96, 32, 16, (3, 1), torch.float16, [33], 5, None, 15.0, {}),
    "gqa8-groups-no-rotation": (
        64, 1, 64, (8, 1), torch.bfloat16, [100], 6, None, None, {"group_size": 32},
    ),
    # Version-2 transforms restored by the gather (rotated, and in natural order without).
    "transforms-rotated": (64, 32, 16, (4, 2), torch.bfloat16, [40, 13], 7, None, None,
                           {"transforms": True, "k_bits": (4, 16)}),
    "transforms-no-rotation": (64, 1, 16, (4, 2), torch.float16, [25, 0], 5, 9, None,
                               {"transforms": True}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_matches_reference(name, monkeypatch):
    d, block, page, (h_q, h_kv), dtype, cached, t, window, softcap, extra = CASES[name]
    torch.manual_seed(1)
    k_store, v_store, table = build_cache(
        lens=[max(c, 1) for c in cached], num_kv_heads=h_kv, head_dim=d, page_size=page,
        block=block, dtype=dtype, **extra,
    )  # fmt: skip
    b = len(cached)
    q = (torch.randn(b, h_q, t, d) * 2).to(dtype)
    k = (torch.randn(b, h_kv, t, d) * 2).to(dtype)
    v = torch.randn(b, h_kv, t, d).to(dtype)
    lens = torch.tensor(cached, dtype=torch.int32)
    kw = dict(softmax_scale=d**-0.5, sliding_window=window, softcap=softcap)
    ref = paged_prefill_attention_ref(q, k, v, k_store, v_store, table, lens, **kw)
    assert ref.dtype == dtype and ref.shape == q.shape
    lowp = _torch_lowp(q, k, v, k_store, v_store, table, lens, scale=d**-0.5, window=window,
                       softcap=softcap)  # fmt: skip
    poison_float_allocations(monkeypatch)  # the cache buffer's padding must be written too
    out = paged_prefill_attention(q, k, v, k_store, v_store, table, lens, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    check_close(out, ref.float(), lowp)


def _chunk_as_stored(store, table, cached, t, dtype):
    """[B, H_kv, T, D]: positions [c, c + T) of each sequence read back from the pages."""
    rows = [read_positions(store, table[i : i + 1], c, c + t) for i, c in enumerate(cached)]
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_stored_chunk_prefill_matches_reference(name, monkeypatch):
    """The chunk already in the pages, read back with its prefix by one gather."""
    d, block, page, (h_q, h_kv), dtype, cached, t, window, softcap, extra = CASES[name]
    torch.manual_seed(2)
    k_store, v_store, table = build_cache(
        lens=[c + t for c in cached], num_kv_heads=h_kv, head_dim=d, page_size=page,
        block=block, dtype=dtype, **extra,
    )  # fmt: skip
    q = (torch.randn(len(cached), h_q, t, d) * 2).to(dtype)
    lens = torch.tensor(cached, dtype=torch.int32)
    kw = dict(softmax_scale=d**-0.5, sliding_window=window, softcap=softcap)
    ref = paged_prefill_attention_stored_ref(q, k_store, v_store, table, lens, **kw)
    k = _chunk_as_stored(k_store, table, cached, t, dtype)
    v = _chunk_as_stored(v_store, table, cached, t, dtype)
    # The twin is the chunked-prefill twin over the chunk as the pages hold it.
    assert torch.equal(
        ref, paged_prefill_attention_ref(q, k, v, k_store, v_store, table, lens, **kw)
    )
    lowp = _torch_lowp(q, k, v, k_store, v_store, table, lens, scale=d**-0.5, window=window,
                       softcap=softcap)  # fmt: skip
    poison_float_allocations(monkeypatch)  # rows past a shorter sequence must be written too
    out = paged_prefill_attention_stored(q, k_store, v_store, table, lens, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    check_close(out, ref.float(), lowp)


def test_reading_the_chunk_back_equals_its_round_trip():
    """What the stored path reads from the pages is bit for bit what the runtime's round trip
    (stored_round_trip, the padded path) computes for the same chunk."""
    from sawquant.quant.write import rotate_quantize_paged_ref

    k_store, v_store, table = build_cache(
        lens=[30], num_kv_heads=2, head_dim=64, page_size=16, block=32, transforms=True,
        k_bits=(4, 16), v_bits=(8, 4),
    )  # fmt: skip
    t, cached = 7, 20
    k, v = torch.randn(t, 2, 64) * 3, torch.randn(t, 2, 64)
    pos = torch.arange(cached, cached + t)
    slots = table[0].long()[pos // 16] * 16 + pos % 16
    rotate_quantize_paged_ref(k, v, slots, k_store, v_store)
    for store, x in ((k_store, k), (v_store, v)):
        back = read_positions(store, table, cached, cached + t).transpose(0, 1)
        assert torch.equal(back, stored_round_trip(x, store))


def test_stored_chunk_prefill_rejects_a_table_too_short_for_the_chunk():
    k_store, v_store, table = build_cache(
        lens=[20], num_kv_heads=2, head_dim=64, page_size=16, block=16
    )
    q = torch.randn(1, 4, 13, 64)
    lens = torch.tensor([table.shape[1] * 16 - 12], dtype=torch.int32)
    for fn in (paged_prefill_attention_stored, paged_prefill_attention_stored_ref):
        with pytest.raises(InputError, match="chunk tokens"):
            fn(q, k_store, v_store, table, lens, softmax_scale=1.0)


def test_prefill_last_row_equals_decode_reference():
    """The chunk's last query sees exactly what a decode step over cache + chunk would see."""
    from sawquant.quant import paged_write_ref
    from sawquant.quant.decode import paged_decode_attention_ref

    k_store, v_store, table = build_cache(
        lens=[40], num_kv_heads=1, head_dim=64, page_size=16, block=32
    )
    cached, t = 30, 6  # tokens 30..39 of the store are overwritten by the chunk below
    q = torch.randn(1, 2, t, 64)
    k, v = torch.randn(1, 1, t, 64), torch.randn(1, 1, t, 64)
    for store, x in ((k_store, k), (v_store, v)):
        pos = torch.arange(cached, cached + t)
        slots = table[0].long()[pos // 16] * 16 + pos % 16
        paged_write_ref(x[0].transpose(0, 1), slots, store.pools[4], block=32, signs=store.signs)
    pre = paged_prefill_attention_ref(
        q, k, v, k_store, v_store, table, torch.tensor([cached], dtype=torch.int32),
        softmax_scale=0.125,
    )  # fmt: skip
    dec = paged_decode_attention_ref(
        q[:, :, -1], k_store, v_store, table, torch.tensor([cached + t], dtype=torch.int32),
        softmax_scale=0.125,
    )  # fmt: skip
    # Same attention except the chunk's own K/V are quantized in the decode path.
    rel = ((pre[:, :, -1] - dec).norm() / dec.norm()).item()
    print(f"prefill last row vs decode over the quantized chunk: rel {rel:.3e}")
    assert 1e-5 < rel < 0.1


def test_prefill_rejects_bad_inputs():
    k_store, v_store, table = build_cache(
        lens=[20], num_kv_heads=2, head_dim=64, page_size=16, block=16
    )
    q, k = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 3, 64)
    lens = torch.tensor([20], dtype=torch.int32)
    with pytest.raises(InputError, match="multiple"):
        paged_prefill_attention(torch.randn(1, 3, 3, 64), k, k, k_store, v_store, table, lens,
                                softmax_scale=1.0)  # fmt: skip
    with pytest.raises(InputError, match="cached_lens"):
        paged_prefill_attention(q, k, k, k_store, v_store, table, lens.long(), softmax_scale=1.0)
    with pytest.raises(InputError, match="cached_lens"):
        too_long = torch.tensor([table.shape[1] * 16 + 1], dtype=torch.int32)
        paged_prefill_attention(q, k, k, k_store, v_store, table, too_long, softmax_scale=1.0)
