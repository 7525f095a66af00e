"""The batched CPU decode path equals the kernel's twin on paged caches with random page order,
odd lengths, fallback pools, groups, signs, sliding windows and soft-caps."""

from __future__ import annotations

import pytest
import torch

from sawquant.config import SideConfig
from sawquant.kernels.decode import paged_decode_attention_ref
from sawquant.kernels.write import rotate_quantize_paged_ref
from sawquant.quant import slots_for
from sawquant.runtime.cache import make_side_store
from sawquant.runtime.cpu import paged_decode_attention_cpu

CASES = [
    # (k side, v side, H_q, H_kv, D, window, softcap)
    (SideConfig(rotation_block=16), SideConfig(rotation_block=16), 4, 2, 32, None, None),
    (
        SideConfig(rotation_block=32, sign_seed=3, fallback_heads={0: 8, 2: 16}),
        SideConfig(group_size=16, fallback_heads={1: 16}),
        9,
        3,
        64,
        None,
        None,
    ),
    (SideConfig(rotation_block=64), SideConfig(rotation_block=64), 8, 1, 64, 37, 20.0),
]


@pytest.mark.parametrize("k_side,v_side,h_q,h_kv,d,window,softcap", CASES)
def test_batched_cpu_decode_equals_the_twin(k_side, v_side, h_q, h_kv, d, window, softcap):
    gen = torch.Generator().manual_seed(0)
    lens = torch.tensor([217, 1, 64, 100], dtype=torch.int32)
    page, pages_each = 16, 14
    b = lens.shape[0]
    num_pages = b * pages_each
    table = torch.randperm(num_pages, generator=gen).view(b, pages_each).to(torch.int32)
    common = dict(num_kv_heads=h_kv, head_dim=d, num_pages=num_pages, page_size=page)
    ks = make_side_store(k_side, **common, dtype=torch.float32)
    vs = make_side_store(v_side, **common, dtype=torch.float32)
    for i in range(b):
        n = int(lens[i])
        pos = torch.arange(n)
        slots = slots_for(table[i : i + 1], pos[None], page)[0]
        k = torch.randn(n, h_kv, d, generator=gen) * 2
        v = torch.randn(n, h_kv, d, generator=gen)
        rotate_quantize_paged_ref(k, v, slots, ks, vs)
    q = torch.randn(b, h_q, d, generator=gen)
    kw = dict(softmax_scale=d**-0.5, sliding_window=window, softcap=softcap)
    want = paged_decode_attention_ref(q, ks, vs, table, lens, **kw)
    got = paged_decode_attention_cpu(q, ks, vs, table, lens, **kw)
    err = ((got - want).norm() / want.norm()).item()
    print(f"relative difference batched vs twin: {err:.2e}")
    assert got.shape == want.shape and got.dtype == want.dtype
    assert err < 1e-5
