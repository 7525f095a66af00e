"""Pure-torch reference math: the specification every kernel must equal."""

from sawquant.quant.hadamard import (
    SUPPORTED_BLOCKS,
    block_hadamard,
    check_block,
    random_signs,
    rotate,
    unrotate,
)
from sawquant.quant.int4 import (
    dequantize,
    dequantize_int4,
    pack_int4,
    quantize,
    quantize_int4,
    unpack_int4,
)
from sawquant.quant.paged import paged_gather_ref, paged_write_ref, slots_for

__all__ = [
    "SUPPORTED_BLOCKS",
    "block_hadamard",
    "check_block",
    "dequantize",
    "dequantize_int4",
    "pack_int4",
    "paged_gather_ref",
    "paged_write_ref",
    "quantize",
    "quantize_int4",
    "random_signs",
    "rotate",
    "slots_for",
    "unpack_int4",
    "unrotate",
]
