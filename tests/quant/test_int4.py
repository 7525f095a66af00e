import math

import pytest
import torch

from sawquant.quant import dequantize, dequantize_int4, pack_int4, quantize, quantize_int4
from sawquant.quant.int4 import fp16_round_down, fp16_round_up, unpack_int4


def sqnr_db(x: torch.Tensor, xh: torch.Tensor) -> float:
    return 10 * math.log10(x.pow(2).sum().item() / (x - xh).pow(2).sum().item())


def _inputs(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, 128, generator=g)
    if kind == "outliers":
        x[..., 5] *= 30.0
        x[..., 90] -= 40.0
    elif kind == "offset":
        x = x * 0.01 + 300.0  # tiny range far from zero: stresses the fp16 zero
    return x


def test_pack_unpack_round_trip_is_bit_exact():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (64, 3, 128), generator=g, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (64, 3, 64) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    # documented nibble order: element 2j low, 2j+1 high
    assert packed[0, 0, 0].item() == codes[0, 0, 0].item() | (codes[0, 0, 1].item() << 4)


@pytest.mark.parametrize("kind", ["gauss", "outliers", "offset"])
@pytest.mark.parametrize("group_size", [None, 32])
def test_error_within_half_step(kind, group_size):
    x = _inputs(kind)
    codes, scale, zero = quantize_int4(x, group_size=group_size)
    xh = dequantize_int4(codes, scale, zero, group_size=group_size)
    g = group_size or x.shape[-1]
    half_step = scale.float().repeat_interleave(g, dim=-1) / 2
    # float32 rounding of q * scale + zero is the only slack
    slack = 4 * torch.finfo(torch.float32).eps * x.abs().clamp_min(1.0)
    excess = (x - xh).abs() - half_step - slack
    print(f"{kind}, g={group_size}: max(|err| - scale/2) = {excess.max().item():.3e}")
    assert excess.max().item() <= 0


@pytest.mark.parametrize(
    "kind,group_size,floor_db",
    [
        ("gauss", None, 19.0),  # measured 20.02 dB
        ("gauss", 32, 21.0),  # measured 22.12 dB
        ("outliers", None, 11.0),  # measured 12.37 dB: outliers stretch the range
        ("outliers", 32, 18.0),  # measured 18.95 dB
    ],
)
def test_sqnr(kind, group_size, floor_db):
    x = _inputs(kind)
    xh = dequantize_int4(*quantize_int4(x, group_size=group_size), group_size=group_size)
    db = sqnr_db(x, xh)
    print(f"SQNR {kind} g={group_size}: {db:.2f} dB")
    assert db > floor_db


def test_int8_is_much_finer_than_int4():
    x = _inputs("outliers")
    db4 = sqnr_db(x, dequantize(*quantize(x, bits=4)))
    db8 = sqnr_db(x, dequantize(*quantize(x, bits=8)))
    print(f"SQNR int4 {db4:.1f} dB, int8 {db8:.1f} dB")
    assert db8 > db4 + 20  # each bit is ~6 dB; measured 12.4 vs 37.0 dB


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [0.0, -3.140625, 1000.0, 6.0e-5])
def test_constant_vector_round_trips_exactly(dtype, value):
    x = torch.full((4, 2, 64), value, dtype=dtype)
    codes, scale, zero = quantize_int4(x)
    assert torch.all(scale == 0)
    back = dequantize_int4(codes, scale, zero, dtype=dtype)
    assert not torch.isnan(back).any()
    assert torch.equal(back, x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(bad):
    x = torch.randn(3, 64)
    x[1, 7] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int4(x)


def test_out_of_fp16_range_raises():
    with pytest.raises(ValueError, match="fp16 range"):
        quantize_int4(torch.full((1, 64), 1.0e6))


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.randn(2, 64), group_size=24)


def test_directed_fp16_rounding():
    g = torch.Generator().manual_seed(3)
    v = torch.cat([torch.randn(10000, generator=g) * 100, torch.tensor([0.0, -0.0, 1e-9, -1e-9])])
    down, up = fp16_round_down(v), fp16_round_up(v.abs())
    assert torch.all(down.float() <= v)
    assert torch.all(up.float() >= v.abs())
    # one fp16 step at most away from the round-to-nearest value
    near = v.to(torch.float16).float()
    assert torch.all((near - down.float()).abs() <= (near.abs() * 2**-10).clamp_min(2**-24))
