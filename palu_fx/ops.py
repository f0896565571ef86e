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

from palu_fx.kernels.latent_attention.naive import latent_attention_ref

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
) -> torch.Tensor:
    """Attention over a latent KV cache; returns ``[B, Hq, Sq, rv]`` (value-latent space).

    Shapes and semantics: ``palu_fx.kernels.latent_attention.naive``.
    """
    args = (q, hk, hv, lk, k_bias, cos, sin, k_norm_weight, attn_mask, scale, softcap, is_causal, rope_style, k_norm_eps)
    if kernel_choice(q.device) == "triton":
        from palu_fx.kernels.latent_attention import triton_latent_attention

        return triton_latent_attention(*args)
    return latent_attention_ref(*args)


@latent_attention.register_fake
def _latent_attention_fake(q, hk, hv, lk, k_bias, cos, sin, k_norm_weight, attn_mask, scale, softcap=0.0,
                           is_causal=False, rope_style=0, k_norm_eps=1e-6):
    B, Hq, Sq, Dq = q.shape
    groups = lk.shape[0] if lk is not None else hk.shape[-1] // Dq
    torch._check(hv.shape[-1] % groups == 0, lambda: "hv's last dim must be groups * rank_v")
    return q.new_empty(B, Hq, Sq, hv.shape[-1] // groups)
