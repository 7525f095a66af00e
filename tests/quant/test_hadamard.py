import pytest
import torch

from sawquant.quant import block_hadamard, dequantize_int4, quantize_int4, random_signs
from sawquant.quant.hadamard import SUPPORTED_BLOCKS, check_block, rotate, unrotate

CASES = [(d, b) for d in (64, 80, 96, 128, 192, 256) for b in SUPPORTED_BLOCKS if d % b == 0]


@pytest.mark.parametrize("head_dim,block", CASES)
@pytest.mark.parametrize("seed", [None, 7])
def test_orthonormal(head_dim, block, seed):
    r = block_hadamard(head_dim, block, seed=seed, dtype=torch.float64)
    err = (r @ r.T - torch.eye(head_dim, dtype=torch.float64)).abs().max().item()
    print(f"|R R^T - I| = {err:.2e}")
    assert err < 1e-12


@pytest.mark.parametrize("head_dim,block", CASES)
@pytest.mark.parametrize("seed", [None, 3])
def test_butterfly_equals_matrix_and_inverts(head_dim, block, seed):
    torch.manual_seed(0)
    x = torch.randn(5, 4, head_dim)
    signs = random_signs(head_dim, seed) if seed is not None else None
    r = block_hadamard(head_dim, block, seed=seed)
    got = rotate(x, block, signs)
    err = (got - x @ r).abs().max().item()
    back = (unrotate(got, block, signs) - x).abs().max().item()
    print(f"butterfly vs matrix {err:.2e}, round trip {back:.2e}")
    assert err < 1e-5
    assert back < 1e-5


@pytest.mark.parametrize("head_dim,block", [(64, 32), (128, 128), (96, 32)])
def test_rotation_preserves_dot_products(head_dim, block):
    torch.manual_seed(1)
    q, k = torch.randn(16, head_dim), torch.randn(32, head_dim)
    r = block_hadamard(head_dim, block, seed=11)
    err = ((q @ r) @ (k @ r).T - q @ k.T).abs().max().item()
    print(f"q.k error after rotating both: {err:.2e}")
    assert err < 1e-5 * head_dim


def test_rotation_lowers_int4_error_on_outlier_channels():
    torch.manual_seed(2)
    x = torch.randn(2048, 128)
    x[:, [3, 77]] *= 25.0  # two outlier channels, as seen in real keys
    c, s, z = quantize_int4(x)
    naive = (dequantize_int4(c, s, z) - x).pow(2).mean().item()
    xr = rotate(x, 128)
    c, s, z = quantize_int4(xr)
    rotated = (unrotate(dequantize_int4(c, s, z), 128) - x).pow(2).mean().item()
    print(f"INT4 MSE naive {naive:.4f}, rotated {rotated:.4f}")
    # measured: naive 0.6044, rotated 0.0513 (11.8x lower)
    assert rotated < naive / 4


@pytest.mark.parametrize("head_dim,block", [(80, 32), (64, 128), (64, 48)])
def test_bad_blocks_rejected(head_dim, block):
    with pytest.raises(ValueError, match="block"):
        check_block(head_dim, block)
    with pytest.raises(ValueError):
        block_hadamard(head_dim, block)


def test_signs_are_reproducible_and_balanced():
    a, b = random_signs(128, 5), random_signs(128, 5)
    assert torch.equal(a, b)
    assert set(a.tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, random_signs(128, 6))
