"""sawquant's pages inside an engine's opaque byte blocks (BlockLayout): the bytes a token
costs, and views on which the write (twin and kernel) and attention give what ordinary pools
give."""

from __future__ import annotations

import pytest
import torch

from sawquant.config import LayerConfig, ModelFacts, SideConfig
from sawquant.kernels.write import rotate_quantize_paged
from sawquant.quant import slots_for
from sawquant.quant.decode import paged_decode_attention_ref
from sawquant.quant.write import rotate_quantize_paged_ref
from sawquant.runtime.blocks import BlockLayout
from sawquant.runtime.layer import LayerKV
from sawquant.runtime.memory import kv_memory

FACTS = ModelFacts(num_layers=1, num_kv_heads=3, head_dim=64, model_type="llama")
LAYERS = {
    "int4": LayerConfig(),
    "mixed": LayerConfig(
        k=SideConfig(rotation_block=32, sign_seed=2, fallback_heads={1: 8, 2: 16}),
        v=SideConfig(group_size=32, fallback_heads={0: 16}, center=[[0.5] * 64] * 3),
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_bytes_per_token_are_the_configs(name):
    layout = BlockLayout.build(LAYERS[name], FACTS, block_size=32, dtype=torch.bfloat16)
    from sawquant.config import KVConfig

    want = kv_memory(KVConfig(model=FACTS, layers=(LAYERS[name],))).per_layer[0]
    print(name, "layout", layout.bytes_per_token, "B/token, config", want)
    # Regions are 16-byte aligned per block: at most 16 bytes per region over the config.
    assert want <= layout.bytes_per_token <= want + 16 * len(layout.regions) / 32 + 1


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("writer", ["twin", "kernel"])
def test_views_hold_what_ordinary_pools_hold(name, writer):
    layer = LAYERS[name]
    bs, num_blocks = 16, 6
    layout = BlockLayout.build(layer, FACTS, block_size=bs, dtype=torch.bfloat16)
    engine = torch.zeros(num_blocks, 1, bs, layout.bytes_per_token, dtype=torch.uint8)
    in_blocks = layout.layer_kv(engine, layer, FACTS)
    plain = LayerKV.allocate(layer, num_kv_heads=3, head_dim=64, num_pages=num_blocks,
                             page_size=bs, dtype=torch.bfloat16)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    table = torch.tensor([[3, 1, 5], [2, 4, 0]], dtype=torch.int32)
    lens = [37, 20]
    for b, n in enumerate(lens):
        slots = slots_for(table[b : b + 1], torch.arange(n)[None], bs)[0]
        k = torch.randn(n, 3, 64, generator=gen)
        v = torch.randn(n, 3, 64, generator=gen)
        write = rotate_quantize_paged if writer == "kernel" else rotate_quantize_paged_ref
        write(k, v, slots, in_blocks.k, in_blocks.v)
        rotate_quantize_paged_ref(k, v, slots, plain.k, plain.v)
    for side in ("k", "v"):
        a, b = getattr(in_blocks, side), getattr(plain, side)
        for bits in a.pools:
            for field in ("codes", "scale", "zero"):
                x, y = getattr(a.pools[bits], field), getattr(b.pools[bits], field)
                if x is not None:
                    assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), (side, bits)
    q = torch.randn(2, 6, 64, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = paged_decode_attention_ref(q, in_blocks.k, in_blocks.v, table, seq_lens,
                                     softmax_scale=0.125)  # fmt: skip
    ref = paged_decode_attention_ref(q, plain.k, plain.v, table, seq_lens, softmax_scale=0.125)
    assert torch.equal(out, ref)
