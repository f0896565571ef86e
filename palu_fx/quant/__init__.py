"""Quantized latent storage: per-token asymmetric 2/3/4-bit codes packed into uint8.

``quantize``/``dequantize`` (and their plain-tensor forms for custom-op schemas) live in
``quantize.py``; the byte layouts the kernels decode, and the byte counts the report uses,
in ``pack.py``.
"""
from palu_fx.quant.pack import (
    SUPPORTED_BITS,
    PackedShape,
    bytes_per_group,
    bytes_per_token,
    pack_codes,
    packed_shape,
    padded_group,
    resolve_group_size,
    unpack_codes,
)
from palu_fx.quant.quantize import QuantizedTensor, dequantize, dequantize_packed, quantize, quantize_packed

__all__ = [
    "SUPPORTED_BITS",
    "PackedShape",
    "QuantizedTensor",
    "bytes_per_group",
    "bytes_per_token",
    "dequantize",
    "dequantize_packed",
    "pack_codes",
    "packed_shape",
    "padded_group",
    "quantize",
    "quantize_packed",
    "resolve_group_size",
    "unpack_codes",
]
