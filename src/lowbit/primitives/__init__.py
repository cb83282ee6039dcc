"""Pure functions on plain tensors: qtypes, block granularity, quantize/dequantize, bit packing."""

from .affine import check_finite, choose_qparams, dequantize, quantize, quantize_weight
from .blocks import check_block_size, per_axis_block, per_group_block, per_token_block
from .packing import pack_bits, pack_int4, unpack_bits, unpack_int4
from .qtypes import QTYPES, QType, float8_qtype, get_qtype

__all__ = [
    "QTYPES",
    "QType",
    "check_block_size",
    "check_finite",
    "choose_qparams",
    "dequantize",
    "float8_qtype",
    "get_qtype",
    "pack_bits",
    "pack_int4",
    "per_axis_block",
    "per_group_block",
    "per_token_block",
    "quantize",
    "quantize_weight",
    "unpack_bits",
    "unpack_int4",
]
