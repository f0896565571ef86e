"""Reference latent attention over a *quantized* latent cache: dequantize, then the reference.

The semantics every quantized kernel must match. Arguments are those of
``latent_attention_ref`` with ``hk``/``hv`` replaced by their packed storage (plain tensors
and ints, so the signature maps one-to-one onto a ``torch.library`` schema later):

    hk_codes  uint8   [B, Skv, G*code_bytes_k]   packed codes (``palu_fx.quant.pack`` layout)
    hk_scale  float16 [B, Skv, G*rk // k_group_size]
    hk_zero   float16 [B, Skv, G*rk // k_group_size]   value of code 0
    hv_*      the same for the value latents (rv, v_bits, v_group_size)
    k_bits, v_bits            2, 3 or 4
    k_group_size, v_group_size channels per scale/zero (divides rk / rv; the pass passes
                               the resolved size, never None)

The latent widths ``G*rk`` and ``G*rv`` follow from the scale shapes and group sizes.
Dequantization is done in the accumulation dtype (float32, or float64 for float64
queries), exactly ``code·scale + zero`` as stored, so a kernel that dequantizes in
registers in float32 matches to rounding.
"""
from __future__ import annotations

from typing import Optional

import torch

from palu_fx.kernels.latent_attention.naive import ROPE_NONE, latent_attention_ref
from palu_fx.quant.quantize import dequantize_packed

__all__ = ["quant_latent_attention_ref"]


def quant_latent_attention_ref(
    q: torch.Tensor,
    hk_codes: torch.Tensor,
    hk_scale: torch.Tensor,
    hk_zero: torch.Tensor,
    hv_codes: torch.Tensor,
    hv_scale: torch.Tensor,
    hv_zero: torch.Tensor,
    lk: Optional[torch.Tensor],
    k_bias: Optional[torch.Tensor],
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    k_norm_weight: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
    scale: float,
    k_bits: int,
    k_group_size: int,
    v_bits: int,
    v_group_size: int,
    softcap: float = 0.0,
    is_causal: bool = False,
    rope_style: int = ROPE_NONE,
    k_norm_eps: float = 1e-6,
    lv: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Quantized-cache latent attention (shapes: module docstring and ``naive.py``).

    Returns ``[B, Hq, Sq, rv]`` (``[B, Hq, Sq, Dv]`` with ``lv``) in ``q.dtype``, like
    ``latent_attention_ref``.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    hk = dequantize_packed(hk_codes, hk_scale, hk_zero, k_bits, k_group_size, acc)
    hv = dequantize_packed(hv_codes, hv_scale, hv_zero, v_bits, v_group_size, acc)
    return latent_attention_ref(
        q, hk, hv, lk, k_bias, cos, sin, k_norm_weight, attn_mask, scale,
        softcap=softcap, is_causal=is_causal, rope_style=rope_style, k_norm_eps=k_norm_eps, lv=lv,
    )
