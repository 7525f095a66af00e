import pytest
import torch

from sawquant.format import PoolSpec, allocate_pool, allocate_side
from sawquant.quant import dequantize, paged_gather_ref, paged_write_ref, quantize, rotate
from sawquant.quant.hadamard import random_signs
from sawquant.quant.paged import slots_for


def _block_table(seq_lens, page_size, gen):
    """A random permutation of pages split among sequences (flash-attention test style)."""
    pages_per_seq = [(n + page_size - 1) // page_size for n in seq_lens]
    total = sum(pages_per_seq) + 3  # spare pages stay unused
    perm = torch.randperm(total, generator=gen).to(torch.int32)
    width = max(pages_per_seq)
    table = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = perm[start : start + n]
        start += n
    return table, total


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("group_size", [None, 32])
def test_paged_write_gather_equals_contiguous(page_size, bits, group_size):
    gen = torch.Generator().manual_seed(page_size + bits)
    seq_lens = [1, 17, 217, 64]
    heads, d, block = 2, 64, 32
    table, num_pages = _block_table(seq_lens, page_size, gen)
    pool = allocate_pool(
        PoolSpec(num_pages, page_size, heads, d, bits, group_size), dtype=torch.float32
    )
    signs = random_signs(d, 9)
    seqs = [torch.randn(n, heads, d, generator=gen) for n in seq_lens]
    # write all sequences in one shuffled call, as a batched step would
    x = torch.cat(seqs)
    slots = torch.cat(
        [
            slots_for(table[b : b + 1], torch.arange(n)[None], page_size)[0]
            for b, n in enumerate(seq_lens)
        ]
    )
    order = torch.randperm(len(slots), generator=gen)
    paged_write_ref(x[order], slots[order], pool, block=block, signs=signs)

    got = paged_gather_ref(pool, table, torch.tensor(seq_lens))
    for b, seq in enumerate(seqs):
        ref = rotate(seq, block, signs)  # [L, H, D]
        if bits != 16:
            q, s, z = quantize(ref, bits=bits, group_size=group_size)
            ref = dequantize(q, s, z, group_size=group_size)
        assert got[b].shape == (heads, seq_lens[b], d)
        assert torch.equal(got[b], ref.transpose(0, 1)), f"sequence {b} differs"


def test_skipped_slots_and_untouched_pages():
    pool = allocate_pool(PoolSpec(4, 16, 1, 64, 4))
    before = pool.codes.clone()
    x = torch.randn(3, 1, 64)
    paged_write_ref(x, torch.tensor([-1, 5, -1]), pool)
    changed = (pool.codes != before).any(dim=-1).nonzero().tolist()
    assert changed == [[0, 0, 5]]


def test_side_store_maps_every_head_once():
    side = allocate_side(
        num_kv_heads=4, head_dim=64, head_bits=(4, 8, 4, 16), num_pages=2, page_size=16
    )
    assert side.pool_of() == [(4, 0), (8, 0), (4, 1), (16, 0)]
    # bytes per token: two INT4 heads (32 + 4), one INT8 (64 + 4), one BF16 (128)
    assert side.bytes_per_token() == 2 * 36 + 68 + 128


def test_int4_bytes_per_token_matches_design():
    # DESIGN.md: 68 bytes per token and head at head_dim 128 (3.76x smaller than BF16)
    assert PoolSpec(1, 16, 1, 128, 4).bytes_per_token_head() == 68
    assert PoolSpec(1, 16, 1, 128, 16).bytes_per_token_head() == 256


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_no_pool_stores_nan_or_inf(bits):
    """The storage policy: nothing non-finite is written, by any pool (BF16 used to)."""
    from sawquant.errors import NonFiniteKVError
    from sawquant.format import PoolSpec, allocate_pool
    from sawquant.quant import paged_write_ref

    pool = allocate_pool(PoolSpec(2, 4, 2, 16, bits))
    before = pool.codes.clone()
    x = torch.randn(3, 2, 16)
    x[1, 1, 3] = float("nan")
    with pytest.raises(NonFiniteKVError, match="NaN/Inf"):
        paged_write_ref(x, torch.tensor([0, 1, 2]), pool)
    assert torch.equal(pool.codes, before)
