"""The decode twin (chunked, batched) equals plain per-sequence float32 attention over the
dequantized cache, and a sequence's output does not depend on the rest of its batch."""

from __future__ import annotations

import pytest
import torch
from _builders import paged_cache

from sawquant.config import SideConfig
from sawquant.quant import rotate, unrotate
from sawquant.quant.attention import attention_fp32, gather_heads
from sawquant.quant.decode import paged_decode_attention_ref

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


def _cache(k_side, v_side, h_kv, d, lens, seed=0):
    return paged_cache(
        lens=lens, k_side=k_side, v_side=v_side, num_kv_heads=h_kv, head_dim=d, page_size=16,
        dtype=torch.float32, seed=seed,
    )  # fmt: skip


def _plain(q, ks, vs, table, lens, *, softmax_scale, sliding_window, softcap):
    """The specification in its simplest form: one sequence at a time, float32."""
    group = q.shape[1] // ks.num_kv_heads
    keys, values = gather_heads(ks, table, lens), gather_heads(vs, table, lens)
    qr = rotate(q, ks.block, ks.signs)
    out = []
    for i, n in enumerate(lens.tolist()):
        pos = torch.arange(n)
        allowed = (pos >= n - (sliding_window or n))[None, :]
        o = attention_fp32(
            qr[i][:, None], keys[i].repeat_interleave(group, 0),
            values[i].repeat_interleave(group, 0), allowed,
            softmax_scale=softmax_scale, softcap=softcap,
        )  # fmt: skip
        out.append(o[:, 0])
    return unrotate(torch.stack(out), vs.block, vs.signs)


@pytest.mark.parametrize("k_side,v_side,h_q,h_kv,d,window,softcap", CASES)
def test_chunked_decode_twin_equals_plain_attention(k_side, v_side, h_q, h_kv, d, window, softcap):
    lens = torch.tensor([617, 1, 64, 100], dtype=torch.int32)  # several 256-token chunks
    ks, vs, table = _cache(k_side, v_side, h_kv, d, lens.tolist())
    q = torch.randn(4, h_q, d, generator=torch.Generator().manual_seed(1))
    kw = dict(softmax_scale=d**-0.5, sliding_window=window, softcap=softcap)
    got = paged_decode_attention_ref(q, ks, vs, table, lens, **kw)
    want = _plain(q, ks, vs, table, lens, **kw)
    err = ((got - want).norm() / want.norm()).item()
    print(f"relative difference chunked twin vs plain attention: {err:.2e}")
    assert got.shape == want.shape and got.dtype == q.dtype
    assert err < 1e-5


def test_a_sequence_does_not_depend_on_its_batch():
    """Batch invariance, bit for bit: a serving engine's greedy decode must not change when
    other requests (longer, shorter, none) share the step."""
    k_side = SideConfig(rotation_block=32, sign_seed=1, fallback_heads={1: 8})
    lens = [300, 5, 611, 129, 256]
    ks, vs, table = _cache(k_side, SideConfig(rotation_block=32), 2, 32, lens)
    q = torch.randn(len(lens), 8, 32, generator=torch.Generator().manual_seed(2))
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    kw = dict(softmax_scale=32**-0.5)
    together = paged_decode_attention_ref(q, ks, vs, table, seq_lens, **kw)
    for i in range(len(lens)):
        alone = paged_decode_attention_ref(q[i : i + 1], ks, vs, table[i : i + 1],
                                           seq_lens[i : i + 1], **kw)  # fmt: skip
        assert torch.equal(alone[0], together[i]), f"sequence {i} changed with its batch"
    pair = paged_decode_attention_ref(q[1:3], ks, vs, table[1:3], seq_lens[1:3], **kw)
    assert torch.equal(pair, together[1:3])
