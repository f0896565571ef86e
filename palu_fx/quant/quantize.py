"""Per-token asymmetric quantization of latents to 2, 3 or 4 bits, with real packed storage.

Each token's latent row ``x [C]`` is split into groups of ``group_size`` channels (default:
the whole row; the pass passes the rank of one Palu group so every group's latent gets its
own range). Per group, with ``qmax = 2**bits - 1``::

    zero  = min(x)                     rounded *down* to float16
    scale = (max(x) - zero) / qmax     rounded *up*   to float16
    code  = clamp(round((x - zero) / scale), 0, qmax)        (0 where scale == 0)
    x̂     = code * scale + zero

``zero`` is a float offset (the value of code 0), not an integer zero point: the decode is
one FMA per element, it keeps full fp16 precision of the group minimum even when the
range is far from 0 (an integer zero point ``-min/scale`` can exceed fp16 integers), and
a kernel can pull it out of a dot product (``x̂ @ Lᵀ = scale·(code @ Lᵀ) + zero·ΣLᵀ``).

Why fp16 for scale and zero: 2 bytes each is what Palu/KIVI-style caches pay (4 bytes per
group per token, counted by :func:`palu_fx.quant.bytes_per_token`), fp16 covers latent
magnitudes (bf16's 8-bit mantissa would add up to 0.4% error to every step). The
directed rounding makes the stored ``[zero, zero + qmax·scale]`` contain the group's
range, and the codes are computed from the *stored* values, so the round-to-nearest bound
``|x - x̂| <= scale/2`` holds with the stored scale (up to float32 arithmetic), and a
constant group (``scale == 0``) decodes to its value exactly when that value is an fp16
number. Inputs must lie within fp16's range (``|x| < 65504``); latents of whitened or
orthonormal factors are far inside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from palu_fx.quant.pack import _check_bits, pack_codes, packed_shape, resolve_group_size, unpack_codes

__all__ = ["QuantizedTensor", "quantize", "dequantize", "quantize_packed", "dequantize_packed"]

SCALE_DTYPE = torch.float16


@dataclass
class QuantizedTensor:
    """A quantized ``[..., C]`` tensor in its real storage.

    codes  uint8   [..., code_bytes]   packed codes (layout: ``palu_fx.quant.pack``)
    scale  float16 [..., C // group_size]
    zero   float16 [..., C // group_size]  value of code 0 (``x̂ = code·scale + zero``)
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    shape: tuple
    dtype: torch.dtype = torch.float32

    @property
    def channels(self) -> int:
        return int(self.shape[-1])

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes + scales + zeros."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize(self, dtype)


def _half_toward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """``x`` (float32) rounded to float16 toward +inf (``up``) or -inf: a directed cast.

    Steps one fp16 ulp by integer arithmetic on the bit pattern (sign-magnitude: +1 moves
    away from zero) rather than ``torch.nextafter``, whose half support varies by device;
    and without a data-dependent branch, so it traces (export, torch.compile) as a cache write.
    """
    h = x.to(SCALE_DTYPE)
    off = h.float() < x if up else h.float() > x
    bits = h.view(torch.int16)
    negative = bits < 0  # sign bit set (including -0.0)
    away = negative != up  # away from zero (up from a positive value, down from a negative): |h| grows
    step = torch.where(away, bits + 1, bits - 1)
    # from ±0 the step must cross zero: to the smallest subnormal of the target sign
    zero = (bits & 0x7FFF) == 0
    tiny = torch.full_like(bits, 1 if up else -32767)  # 0x0001 or 0x8001 as int16
    step = torch.where(zero, tiny, step)
    return torch.where(off, step, bits).view(SCALE_DTYPE)


def quantize_packed(
    x: torch.Tensor, bits: int, group_size: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [..., C]`` -> ``(codes uint8 [..., code_bytes], scale fp16 [..., G], zero fp16 [..., G])``.

    The plain-tensor form of :func:`quantize` (what a custom-op schema can carry).
    """
    _check_bits(bits)
    if not x.is_floating_point():
        raise ValueError(f"quantize needs a floating-point tensor, got {x.dtype}")
    C = x.shape[-1]
    n = resolve_group_size(C, group_size)
    qmax = (1 << bits) - 1
    xf = x.to(torch.float32, copy=True).unflatten(-1, (C // n, n))  # (its own: modified in place below)
    zero = _half_toward(xf.amin(-1), up=False)
    z = zero.float()
    scale = _half_toward((xf.amax(-1) - z) / qmax, up=True)
    s = scale.float()
    # a constant group has scale 0: every code is 0 and x̂ = zero
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    # in place on the copy: out of place, the codes took three more float32 temporaries the size of x
    codes = xf.sub_(z[..., None]).mul_(inv[..., None]).round_().clamp_(0, qmax).to(torch.uint8)
    return pack_codes(codes.flatten(-2), bits, n), scale, zero


def dequantize_packed(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_packed`: ``[..., C]`` in ``dtype`` with ``C = G * group_size``."""
    if scale.shape != zero.shape or scale.shape[:-1] != codes.shape[:-1]:
        raise ValueError(f"codes {tuple(codes.shape)}, scale {tuple(scale.shape)} and zero {tuple(zero.shape)} "
                         "must share their leading dims (and scale/zero their group dim)")
    G = scale.shape[-1]
    C = G * group_size
    c = unpack_codes(codes, bits, group_size, C).float().unflatten(-1, (G, group_size))
    x = c * scale.float()[..., None] + zero.float()[..., None]
    return x.flatten(-2).to(dtype)


def quantize(x: torch.Tensor, bits: int, group_size: Optional[int] = None) -> QuantizedTensor:
    """Quantize ``x [..., C]`` per token (last dim) in groups of ``group_size`` channels.

    ``group_size=None`` uses one group per row; otherwise it must divide ``C``.

    Example::

        q = quantize(h, bits=3, group_size=64)     # h: [B, S, G*r] latents, r = 64
        h_hat = dequantize(q)                       # |h - h_hat| <= q.scale/2 per group
    """
    n = resolve_group_size(x.shape[-1], group_size)
    codes, scale, zero = quantize_packed(x, bits, n)
    return QuantizedTensor(codes, scale, zero, bits, n, tuple(x.shape), x.dtype)


def dequantize(q: QuantizedTensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The tensor ``q`` stands for, in ``dtype`` (default: the dtype that was quantized)."""
    expected = packed_shape(q.channels, q.bits, q.group_size)
    if q.codes.shape[-1] != expected.code_bytes or q.scale.shape[-1] != expected.groups:
        raise ValueError(f"QuantizedTensor storage {tuple(q.codes.shape)}/{tuple(q.scale.shape)} does not match "
                         f"shape {q.shape} at {q.bits} bits, group size {q.group_size}")
    return dequantize_packed(q.codes, q.scale, q.zero, q.bits, q.group_size, dtype or q.dtype).reshape(q.shape)
