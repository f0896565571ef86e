"""Pure-PyTorch reference of latent attention: the semantics every kernel must match.

Shapes (B batch, Hq query heads, Sq query tokens, Skv cached tokens, G groups of KV heads,
gs heads per group, D head dim, rk / rv ranks per group, rot rotary dims):

    q       [B, Hq, Sq, D]        queries, already rotated (RoPE mode), or
            [B, Hq, Sq, rk]       queries already multiplied by L_k (absorbed mode, lk None)
    hk      [B, Skv, G*rk]        latent keys   (x @ R_k^T, groups concatenated)
    hv      [B, Skv, G*rv]        latent values (x @ R_v^T)
    lk      [G, gs*D, rk]         key reconstruction per group; None in absorbed mode
    k_bias  [G*gs*D]              bias of the key projection (reconstruct mode only)
    cos/sin [B or 1, Skv, rot]    rotary coefficients of each cached slot
    k_norm_weight [D]             effective RMSNorm weight applied to each rebuilt key head
    attn_mask broadcastable to [B, Hq, Sq, Skv]; bool (True = attend) or additive float
    lv      [Hkv, Dv, rv]         value reconstruction of each KV head (optional)
    returns [B, Hq, Sq, rv]       attention output in value-latent space (the value
                                  reconstruction L_v folded into the output projection), or
            [B, Hq, Sq, Dv]       with ``lv``: that output times L_v of the head's KV head,
                                  i.e. attention over the rebuilt values ``hv_g @ lv^T``;
                                  in [B, Sq, Hq, *] memory (``op_strides``)

Key pipeline per cached slot: k = hk_g @ lk_g^T (+ bias) -> RMSNorm (optional) -> RoPE on
the first ``rot`` dims (optional) -> scores with q. Query head h reads KV head
h // (Hq // Hkv) and value group h // (Hq // G).

``lv`` is how a caller keeps ``o_proj`` as it was when folding would widen it: with
``rv > Dv`` (rank ratio 0.5 at 4 heads per group has rv = 256 for Dv = 128) the folded
projection is ``rv / Dv`` times larger and ``P @ hv`` that much wider, where ``lv`` costs
``Hkv * Dv * rv`` weights and lets prefill attend over rebuilt ``Dv``-wide values.
"""
from __future__ import annotations

from typing import Optional

import torch

ROPE_NONE, ROPE_HALF, ROPE_INTERLEAVED = 0, 1, 2


def op_strides(B: int, H: int, S: int, D: int) -> tuple:
    """Strides of every result ``[B, H, S, D]``: its heads in ``[B, S, H, D]`` memory.

    That is the layout SDPA returns, and a model flattens the heads for its output projection
    (``transpose(1, 2)`` then a reshape to ``[B, S, H*D]``): a view in this layout, a copy in
    any other. At 4k tokens and 32 heads of 128 a copy is 32 MiB, ~0.02 ms on the H200, per
    layer; a contiguous result cost two (one into it, one back out).
    """
    return (S * H * D, D, H * D, 1)


def new_output(B: int, H: int, S: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """An empty result in the declared layout (``op_strides``), on ``like``'s device and dtype
    (the fake implementations' too: ``like`` is then a fake tensor)."""
    return like.new_empty_strided((B, H, S, D), op_strides(B, H, S, D))


def in_op_layout(t: torch.Tensor) -> torch.Tensor:
    """``t [B, H, S, D]`` with exactly the declared strides (Inductor trusts the fake's): itself,
    a view where only strides of size-1 dims differ (a decode step's contiguous result), else
    a copy."""
    want = op_strides(*t.shape)
    if t.stride() == want:
        return t
    if all(n == 1 or s == w for n, s, w in zip(t.shape, t.stride(), want)):
        return t.as_strided(t.shape, want)
    return new_output(*t.shape, like=t).copy_(t)


def rotate(x: torch.Tensor, style: int) -> torch.Tensor:
    """The partner term of RoPE: ``x*cos + rotate(x)*sin``."""
    if style == ROPE_HALF:  # rotate-half: cat(-x2, x1)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    if style == ROPE_INTERLEAVED:  # interleaved pairs (x0, x1) -> (-x1, x0)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    raise ValueError(f"unknown rope style {style}")


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: int) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` dims of ``k`` [B, H, S, D]; cos/sin [B|1, S, rot]."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1).to(k.dtype), sin.unsqueeze(1).to(k.dtype)
    k_rot = k[..., :rot] * cos + rotate(k[..., :rot], style) * sin
    return torch.cat((k_rot, k[..., rot:]), dim=-1) if rot < k.shape[-1] else k_rot


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


def reconstruct_keys(
    hk: torch.Tensor,
    lk: torch.Tensor,
    k_bias: Optional[torch.Tensor],
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    k_norm_weight: Optional[torch.Tensor],
    head_dim: int,
    rope_style: int = ROPE_NONE,
    k_norm_eps: float = 1e-6,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuilt keys [B, Hkv, Skv, D] (bias, RMSNorm, RoPE applied), computed in ``dtype``."""
    B, Skv, _ = hk.shape
    G, gsD, rk = lk.shape
    D = head_dim
    Hkv = G * gsD // D
    k = torch.einsum("bsgr,gdr->bgsd", hk.to(dtype).view(B, Skv, G, rk), lk.to(dtype))
    k = k.view(B, G, Skv, gsD // D, D).transpose(2, 3).reshape(B, Hkv, Skv, D)
    if k_bias is not None:
        k = k + k_bias.to(dtype).view(Hkv, 1, D)
    if k_norm_weight is not None:
        k = rms_norm(k, k_norm_weight, k_norm_eps)
    if rope_style != ROPE_NONE:
        k = apply_rope(k, cos.to(dtype), sin.to(dtype), rope_style)
    return k


def latent_attention_ref(
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
    rope_style: int = ROPE_NONE,
    k_norm_eps: float = 1e-6,
    lv: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference latent attention (see the module docstring for shapes)."""
    B, Hq, Sq, Dq = q.shape
    Skv = hk.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if lk is None:
        G = hk.shape[-1] // Dq
        keys = hk.to(acc).view(B, Skv, G, Dq).transpose(1, 2)  # [B, G, Skv, rk]
    else:
        G = lk.shape[0]
        keys = reconstruct_keys(hk, lk, k_bias, cos, sin, k_norm_weight, Dq, rope_style, k_norm_eps, acc)
    rv = hv.shape[-1] // G
    vals = hv.to(acc).view(B, Skv, G, rv).transpose(1, 2)  # [B, G, Skv, rv]
    keys = keys.repeat_interleave(Hq // keys.shape[1], dim=1)
    vals = vals.repeat_interleave(Hq // G, dim=1)
    scores = torch.matmul(q.to(acc), keys.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        causal = torch.ones(Sq, Skv, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(acc)
    p = torch.softmax(scores, dim=-1)
    # a fully masked row gives zeros, as F.scaled_dot_product_attention does (not NaN)
    p = p.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
    z = torch.matmul(p, vals)
    return in_op_layout((z if lv is None else up_values(z, lv)).to(q.dtype))


def up_values(z: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
    """``z [B, Hq, Sq, rv]`` times ``lv[kv]^T`` of each query head's KV head: ``[B, Hq, Sq, Dv]``
    in the op's declared layout (``op_strides``), in ``z``'s dtype.

    One matmul per KV head over all its rows (batch, query heads, positions): ``lv`` is read
    once. Broadcasting ``lv`` over the batch instead copied it B times (B=8, gs4 decode on the
    H200: 48.8 us against 10.2; ``benchmarks/up_values_probe.py``). With one row per KV head
    and sequence (decode without GQA) the products land in the output directly.
    """
    B, Hq, Sq, rv = z.shape
    Hkv, Dv, rl = lv.shape
    if rl != rv or Hq % Hkv:
        raise ValueError(f"lv {tuple(lv.shape)} does not match {Hq} query heads of value rank {rv}")
    n_rep = Hq // Hkv
    rows = n_rep * Sq
    zr = z.transpose(1, 2).reshape(B, Sq, Hkv, n_rep, rv).permute(2, 0, 3, 1, 4).reshape(Hkv, B * rows, rv)
    w = lv.to(z.dtype).transpose(1, 2)
    out = new_output(B, Hq, Sq, Dv, like=z)
    if rows == 1:
        torch.bmm(zr, w, out=out.view(B, Hkv, Dv).transpose(0, 1))
    else:  # rows of KV head kv: its query heads x positions
        dst = out.transpose(1, 2).view(B, Sq, Hkv, n_rep, Dv).permute(2, 0, 3, 1, 4)
        dst.copy_(torch.bmm(zr, w).view(Hkv, B, n_rep, Sq, Dv))
    return out
