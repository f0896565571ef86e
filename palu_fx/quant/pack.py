"""Bit packing of 2/3/4-bit codes into ``uint8`` storage, laid out for the decode kernels.

A token's latent row ``[C]`` is split into quantization groups of ``group_size`` channels
(``n`` below); each group is packed on its own into ``bytes_per_group`` bytes and the
groups are concatenated, so the bytes of one Palu group's latent (one or more whole
quantization groups) are contiguous in the row and a kernel program that owns that Palu
group reads one contiguous span. A group is padded with zero codes to a whole number of
bytes (``n_pad``: a multiple of 2, 4 and 8 channels for 4, 2 and 3 bits); ranks the
kernels use (multiples of 16) never pad.

Layouts, for channel ``l`` of a group starting at byte ``base`` of the row (little-endian
within a byte: the first channel sits in the low bits):

- **4 bits**, 2 per byte: ``code = (row[base + l//2] >> 4*(l%2)) & 0xF``.
- **2 bits**, 4 per byte: ``code = (row[base + l//4] >> 2*(l%4)) & 0x3``.
- **3 bits**, two bit planes: the low two bits of every code first, in the 2-bit layout
  (``n_pad/4`` bytes), then the high bit of every code, 8 per byte (``n_pad/8`` bytes):
  ``code = ((row[base + l//4] >> 2*(l%4)) & 3) | (((row[base + n_pad//4 + l//8] >> (l%8)) & 1) << 2)``.

Why these layouts: a Triton kernel dequantizes a ``[BLOCK_N, r]`` tile by loading with
per-channel byte offsets and shifts (``tl.load(ptr + l // k)``, ``>> shift``, ``& mask``) —
the same gather-and-shift the usual int4 GEMM kernels use — and every field sits inside
one aligned byte, so no code straddles a byte boundary (the ``8 codes in 3 bytes`` packing
of a plain bit stream would need two loads and a funnel shift per code). The 3-bit planes
reuse the 2-bit decode unchanged plus one bit, and waste nothing (exactly 3 bits per code;
``10 codes per int32`` would waste 6%). The 4-bit layout is also what ``tl.join(lo,
hi).reshape`` produces, for kernels that prefer unpacking whole bytes to gathering.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = [
    "SUPPORTED_BITS",
    "PackedShape",
    "resolve_group_size",
    "padded_group",
    "bytes_per_group",
    "packed_shape",
    "bytes_per_token",
    "pack_codes",
    "unpack_codes",
]

SUPPORTED_BITS = (2, 3, 4)
# channels per packing unit: the smallest count whose codes fill whole bytes in the layout
_UNIT = {4: 2, 2: 4, 3: 8}
# bytes per scale and per zero (both stored as float16)
SCALE_BYTES = 2


class PackedShape(NamedTuple):
    """Storage of one token's ``C``-channel latent: ``code_bytes`` uint8 + ``groups`` fp16 scales and zeros."""

    code_bytes: int
    groups: int


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported: expected one of {SUPPORTED_BITS}")


def resolve_group_size(channels: int, group_size: Optional[int]) -> int:
    """The quantization group size for a ``channels``-wide row (``None`` = the whole row)."""
    if channels < 1:
        raise ValueError(f"cannot quantize a row of {channels} channels")
    if group_size is None:
        return channels
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive integer or None")
    if channels % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {channels} channels of the row")
    return group_size


def padded_group(group_size: int, bits: int) -> int:
    """Channels of one group after padding to whole bytes (``n_pad``)."""
    _check_bits(bits)
    unit = _UNIT[bits]
    return -(-group_size // unit) * unit


def bytes_per_group(group_size: int, bits: int) -> int:
    """Packed code bytes of one quantization group."""
    return padded_group(group_size, bits) * bits // 8


def packed_shape(channels: int, bits: int, group_size: Optional[int] = None) -> PackedShape:
    """Per-token storage of a ``channels``-wide latent: code bytes and scale/zero count."""
    _check_bits(bits)
    n = resolve_group_size(channels, group_size)
    groups = channels // n
    return PackedShape(groups * bytes_per_group(n, bits), groups)


def bytes_per_token(channels: int, bits: int, group_size: Optional[int] = None) -> int:
    """Real bytes per token: packed codes + one fp16 scale and one fp16 zero per group."""
    shape = packed_shape(channels, bits, group_size)
    return shape.code_bytes + 2 * SCALE_BYTES * shape.groups


def _pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    """``[..., n]`` values below ``2**width`` -> ``[..., n*width/8]`` bytes, low bits first."""
    per = 8 // width
    c = codes.to(torch.int32).unflatten(-1, (codes.shape[-1] // per, per))
    out = c[..., 0]
    for k in range(1, per):
        out = out | (c[..., k] << (k * width))
    return out.to(torch.uint8)


def _unpack_plane(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`_pack_plane`: ``[..., m]`` bytes -> ``[..., m*8/width]`` uint8 values."""
    per = 8 // width
    mask = (1 << width) - 1
    p = packed.to(torch.int32)
    parts = [(p >> (k * width)) & mask for k in range(per)]
    return torch.stack(parts, dim=-1).flatten(-2).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int, group_size: Optional[int] = None) -> torch.Tensor:
    """Pack integer codes ``[..., C]`` (each in ``[0, 2**bits)``) into ``uint8 [..., code_bytes]``.

    See the module docstring for the byte layout. Codes are not range-checked (the caller,
    :func:`palu_fx.quant.quantize`, clamps them); out-of-range bits would spill into neighbours.
    """
    _check_bits(bits)
    C = codes.shape[-1]
    n = resolve_group_size(C, group_size)
    n_pad = padded_group(n, bits)
    c = codes.unflatten(-1, (C // n, n))
    if n_pad != n:
        c = torch.nn.functional.pad(c, (0, n_pad - n))
    if bits == 3:
        c = c.to(torch.int32)
        out = torch.cat([_pack_plane(c & 3, 2), _pack_plane(c >> 2, 1)], dim=-1)
    else:
        out = _pack_plane(c, bits)
    return out.flatten(-2)


def unpack_codes(packed: torch.Tensor, bits: int, group_size: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [..., code_bytes]`` -> codes ``uint8 [..., channels]``."""
    _check_bits(bits)
    n = resolve_group_size(channels, group_size)
    expected = packed_shape(channels, bits, n).code_bytes
    if packed.shape[-1] != expected:
        raise ValueError(f"packed rows have {packed.shape[-1]} bytes; {channels} channels at {bits} bits "
                         f"in groups of {n} need {expected}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    n_pad = padded_group(n, bits)
    p = packed.unflatten(-1, (channels // n, bytes_per_group(n, bits)))
    if bits == 3:
        lo = _unpack_plane(p[..., : n_pad // 4], 2)
        hi = _unpack_plane(p[..., n_pad // 4 :], 1)
        c = lo | (hi << 2)
    else:
        c = _unpack_plane(p, bits)
    return c[..., :n].flatten(-2)
