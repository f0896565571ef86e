"""Host side of latent attention over a quantized (packed) latent cache.

Same arguments and result as ``quant_naive.quant_latent_attention_ref``. Paths:

* decode-shaped calls (``wrapper.fused_fits``: few query tokens per group, or a softcap)
  run the fused kernels of ``decode.py`` (RoPE: keys rebuilt from the latents) and
  ``absorbed.py`` (no RoPE: scores in latent space), which read the packed codes and their
  fp16 scales/zeros and dequantize each tile in registers (``common.load_latent``): the
  cache is streamed at its packed size, nothing is materialised (4-bit absorbed calls on a
  GPU where ``gluon_q4.applies``: the Gluon kernel of ``gluon_q4.py``, which reads the codes
  into the tensor cores' operand layouts directly; 4-bit RoPE calls in multi-head attention
  where ``gluon_rope.applies``: the Gluon kernel of ``gluon_rope.py``);
* prefill-shaped calls dequantize the cache to the query dtype once and take the
  unquantized path (keys rebuilt + SDPA): compute bound, a one-off per prompt;
* layouts the in-register decode does not cover also dequantize first, then run the
  fused kernel: quantization groups padded to whole bytes, or several groups per Palu
  group whose size is not a power of two (see ``tile_layout_ok``);
* float64 queries run the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from palu_fx.kernels.latent_attention.naive import ROPE_NONE, up_values
from palu_fx.kernels.latent_attention.quant_naive import quant_latent_attention_ref
from palu_fx.kernels.latent_attention.wrapper import (
    KernelConfig, Latent, _groups, _p2, fused_attention, fused_fits, latent_attention_triton,
)
from palu_fx.quant.pack import _UNIT, packed_shape
from palu_fx.quant.quantize import dequantize_packed

__all__ = ["quant_latent_attention_triton", "tile_layout_ok"]


def tile_layout_ok(rank: int, bits: int, group_size: int) -> bool:
    """Whether ``common.load_latent`` decodes a Palu group of ``rank`` channels in place.

    Needs whole bytes per quantization group (no padding codes), and either one group per
    Palu group or power-of-two groups, so the tile's (group, channel) grid flattens onto
    the real channel index.
    """
    if rank % group_size or group_size % _UNIT[bits]:
        return False
    n = rank // group_size
    return n == 1 or (group_size & (group_size - 1) == 0 and _p2(n) * group_size == max(16, _p2(rank)))


def _latent(codes, scale, zero, bits, group_size):
    if scale.shape != zero.shape or codes.shape[:-1] != scale.shape[:-1]:
        raise ValueError(f"codes {tuple(codes.shape)}, scale {tuple(scale.shape)} and zero {tuple(zero.shape)} "
                         "must share their leading dims (and scale/zero their group dim)")
    channels = scale.shape[-1] * group_size
    want = packed_shape(channels, bits, group_size).code_bytes
    if codes.shape[-1] != want or codes.dtype != torch.uint8:
        raise ValueError(f"packed codes {tuple(codes.shape)} {codes.dtype}: {channels} channels at {bits} bits in "
                         f"groups of {group_size} need uint8 rows of {want} bytes")
    codes = codes if codes.stride(-1) == 1 else codes.contiguous()
    if scale.stride() != zero.stride() or scale.stride(-1) != 1:
        scale, zero = scale.contiguous(), zero.contiguous()
    return Latent(codes, scale, zero, bits, group_size)


def quant_latent_attention_triton(
    q: torch.Tensor,
    hk_codes: torch.Tensor, hk_scale: torch.Tensor, hk_zero: torch.Tensor,
    hv_codes: torch.Tensor, hv_scale: torch.Tensor, hv_zero: torch.Tensor,
    lk: Optional[torch.Tensor], k_bias: Optional[torch.Tensor],
    cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], k_norm_weight: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor], scale: float,
    k_bits: int, k_group_size: int, v_bits: int, v_group_size: int,
    softcap: float = 0.0, is_causal: bool = False, rope_style: int = ROPE_NONE, k_norm_eps: float = 1e-6,
    lv: Optional[torch.Tensor] = None,
    *,
    config: Optional[KernelConfig] = None,
    path: Optional[str] = None,
) -> torch.Tensor:
    """Triton attention over packed latents; ``path`` forces ``"fused"`` or ``"prefill"`` (tests)."""
    args = (q, hk_codes, hk_scale, hk_zero, hv_codes, hv_scale, hv_zero, lk, k_bias, cos, sin, k_norm_weight,
            attn_mask, scale, k_bits, k_group_size, v_bits, v_group_size, softcap, is_causal, rope_style, k_norm_eps,
            lv)
    if q.dtype == torch.float64:
        return quant_latent_attention_ref(*args)
    kc, vc = hk_scale.shape[-1] * k_group_size, hv_scale.shape[-1] * v_group_size
    G, RK, RV, _ = _groups(q, kc, vc, lk)
    kl = _latent(hk_codes, hk_scale, hk_zero, k_bits, k_group_size)
    vl = _latent(hv_codes, hv_scale, hv_zero, v_bits, v_group_size)
    rest = (lk, k_bias, cos, sin, k_norm_weight, attn_mask, scale, softcap, is_causal, rope_style, k_norm_eps)
    if path is None:
        path = "fused" if fused_fits(q, lk, kc, softcap) else "prefill"
    if path == "fused" and tile_layout_ok(RK, k_bits, k_group_size) and tile_layout_ok(RV, v_bits, v_group_size):
        out = fused_attention(q, kl, vl, *rest, config, q.dtype)
        return out if lv is None else up_values(out, lv)
    hk = dequantize_packed(kl.data, kl.scale, kl.zero, k_bits, k_group_size, q.dtype)
    hv = dequantize_packed(vl.data, vl.scale, vl.zero, v_bits, v_group_size, q.dtype)
    return latent_attention_triton(q, hk, hv, *rest, lv, config=config, path=path)
