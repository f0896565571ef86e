"""The ``palu::`` custom ops: schema, fake (shape) implementation and dispatch.

``palu::latent_attention`` is opaque to export and Inductor (a ``custom_op`` with
``register_fake``): it survives ``torch.export.save``/``load`` and compiles as a single
extern call. On CUDA it launches the Triton kernels; on the CPU it runs the pure-PyTorch
reference, unless ``PALU_FX_KERNEL=triton`` forces the Triton path (under
``TRITON_INTERPRET=1``) so CI exercises the kernels themselves.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from palu_fx.kernels.latent_attention.naive import latent_attention_ref, new_output

__all__ = ["latent_attention", "kernel_choice"]


def kernel_choice(device: torch.device) -> str:
    """``"triton"`` or ``"reference"``: which implementation runs on ``device``."""
    forced = os.environ.get("PALU_FX_KERNEL", "").strip().lower()
    if forced in ("triton", "reference"):
        return forced
    if forced:
        raise ValueError(f"PALU_FX_KERNEL={forced!r}: expected 'triton' or 'reference'")
    return "triton" if device.type == "cuda" else "reference"


@torch.library.custom_op("palu::latent_attention", mutates_args=())
def latent_attention(
    q: torch.Tensor,
    hk: torch.Tensor,
    hv: torch.Tensor,
    lk: Optional[torch.Tensor],
    k_bias: Optional[torch.Tensor],
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    k_norm_weight: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
    scale: float,
    softcap: float = 0.0,
    is_causal: bool = False,
    rope_style: int = 0,
    k_norm_eps: float = 1e-6,
    lv: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention over a latent KV cache; returns ``[B, Hq, Sq, rv]`` (value-latent space), or
    ``[B, Hq, Sq, Dv]`` with the values' reconstruction ``lv [Hkv, Dv, rv]``, its heads in
    ``[B, Sq, Hq, *]`` memory as SDPA's (``naive.op_strides``: the model's flattening of the
    heads for its output projection stays a view).

    Shapes and semantics: ``palu_fx.kernels.latent_attention.naive``.
    """
    args = (q, hk, hv, lk, k_bias, cos, sin, k_norm_weight, attn_mask, scale, softcap, is_causal, rope_style, k_norm_eps,
            lv)
    if kernel_choice(q.device) == "triton":
        from palu_fx.kernels.latent_attention import triton_latent_attention

        return triton_latent_attention(*args)
    return latent_attention_ref(*args)


@latent_attention.register_fake
def _latent_attention_fake(q, hk, hv, lk, k_bias, cos, sin, k_norm_weight, attn_mask, scale, softcap=0.0,
                           is_causal=False, rope_style=0, k_norm_eps=1e-6, lv=None):
    B, Hq, Sq, Dq = q.shape
    groups = lk.shape[0] if lk is not None else hk.shape[-1] // Dq
    torch._check(hv.shape[-1] % groups == 0, lambda: "hv's last dim must be groups * rank_v")
    _check_lv(lv, Hq, hv.shape[-1] // groups)
    return new_output(B, Hq, Sq, hv.shape[-1] // groups if lv is None else lv.shape[1], like=q)


def _check_lv(lv, q_heads, rank_v):
    if lv is not None:
        torch._check(lv.dim() == 3 and lv.shape[2] == rank_v and q_heads % lv.shape[0] == 0,
                     lambda: f"lv must be [KV heads, Dv, {rank_v}] with KV heads dividing {q_heads} query heads, "
                             f"got {list(lv.shape)}")


@torch.library.custom_op("palu::cache_update", mutates_args=())
def cache_update(
    hk: torch.Tensor,
    hv: torch.Tensor,
    positions: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    cache_position: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``LatentCache`` layer's update, as the graph pass sees it.

    ``hk [B, S_max, G*rk]``, ``hv [B, S_max, G*rv]`` and ``positions [B, S_max]`` are the
    caller-owned latent cache; ``key_states``/``value_states`` ``[B, Hkv, S, D]`` the new
    (rotated) keys and values at slots ``cache_position``. Returns full-shaped keys and
    values ``[B, Hkv, S_max, D]`` for the attention that follows. The palu backend rewrites
    this op away (latent writes + latent attention); it has no run-time implementation,
    since the latents cannot be recovered from rotated keys.
    """
    raise RuntimeError(
        "palu::cache_update reached at run time: a palu_fx.LatentCache only works inside a model compiled "
        "with backend=palu_fx.palu_backend whose attention palu-fx rewrote (see the warning printed at "
        "compile time); use transformers' StaticCache otherwise"
    )


@cache_update.register_fake
def _cache_update_fake(hk, hv, positions, key_states, value_states, cache_position):
    B, H, _, D = key_states.shape
    smax = hk.shape[1]
    Dv = value_states.shape[-1]
    return key_states.new_empty(B, H, smax, D), value_states.new_empty(B, H, smax, Dv)


@torch.library.custom_op("palu::quantize_latent", mutates_args=())
def quantize_latent(h: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token asymmetric quantization of latents ``[..., C]`` for the cache write:
    packed codes ``uint8 [..., code_bytes]`` and fp16 ``scale``/``zero`` ``[..., C // group_size]``
    (layouts: ``palu_fx.quant``)."""
    from palu_fx.quant import quantize_packed

    return quantize_packed(h, bits, group_size)


@quantize_latent.register_fake
def _quantize_latent_fake(h, bits, group_size):
    from palu_fx.quant import packed_shape

    ps = packed_shape(h.shape[-1], bits, group_size)
    lead = h.shape[:-1]
    return (h.new_empty(*lead, ps.code_bytes, dtype=torch.uint8), h.new_empty(*lead, ps.groups, dtype=torch.float16),
            h.new_empty(*lead, ps.groups, dtype=torch.float16))


@torch.library.custom_op("palu::quant_latent_attention", mutates_args=())
def quant_latent_attention(
    q: torch.Tensor,
    hk_codes: torch.Tensor, hk_scale: torch.Tensor, hk_zero: torch.Tensor,
    hv_codes: torch.Tensor, hv_scale: torch.Tensor, hv_zero: torch.Tensor,
    lk: Optional[torch.Tensor], k_bias: Optional[torch.Tensor],
    cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], k_norm_weight: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor], scale: float,
    k_bits: int, k_group_size: int, v_bits: int, v_group_size: int,
    softcap: float = 0.0, is_causal: bool = False, rope_style: int = 0, k_norm_eps: float = 1e-6,
    lv: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``palu::latent_attention`` over a quantized latent cache; returns ``[B, Hq, Sq, rv]``
    (``[B, Hq, Sq, Dv]`` with ``lv``), laid out as ``palu::latent_attention``'s.

    ``hk_codes`` uint8 ``[B, Skv, code_bytes]`` with fp16 ``hk_scale``/``hk_zero``
    ``[B, Skv, G*rk // k_group_size]`` (the same for the values); shapes and semantics:
    ``palu_fx.kernels.latent_attention.quant_naive``. Dispatch follows ``kernel_choice``:
    on CUDA (or with ``PALU_FX_KERNEL=triton``) decode-shaped calls run the fused Triton
    kernels that read the packed codes and dequantize in registers, prefill-shaped calls
    dequantize the cache once and take the unquantized Triton path (see
    ``kernels/latent_attention/quant.py``); otherwise the reference dequantizes and attends.
    """
    args = (q, hk_codes, hk_scale, hk_zero, hv_codes, hv_scale, hv_zero, lk, k_bias, cos, sin, k_norm_weight,
            attn_mask, scale, k_bits, k_group_size, v_bits, v_group_size, softcap, is_causal, rope_style, k_norm_eps,
            lv)
    if kernel_choice(q.device) == "triton":
        from palu_fx.kernels.latent_attention import triton_quant_latent_attention

        return triton_quant_latent_attention(*args)
    from palu_fx.kernels.latent_attention.quant_naive import quant_latent_attention_ref

    return quant_latent_attention_ref(*args)


@quant_latent_attention.register_fake
def _quant_latent_attention_fake(q, hk_codes, hk_scale, hk_zero, hv_codes, hv_scale, hv_zero, lk, k_bias, cos, sin,
                                 k_norm_weight, attn_mask, scale, k_bits, k_group_size, v_bits, v_group_size,
                                 softcap=0.0, is_causal=False, rope_style=0, k_norm_eps=1e-6, lv=None):
    B, Hq, Sq, Dq = q.shape
    ck, cv = hk_scale.shape[-1] * k_group_size, hv_scale.shape[-1] * v_group_size
    groups = lk.shape[0] if lk is not None else ck // Dq
    _check_lv(lv, Hq, cv // groups)
    return new_output(B, Hq, Sq, cv // groups if lv is None else lv.shape[1], like=q)
