"""Prefill path: rebuild the keys once with a Triton kernel, then run PyTorch's SDPA.

With many query tokens attention is compute bound and the flash kernels of
``F.scaled_dot_product_attention`` are hard to beat; what the latent cache adds is the key
reconstruction (bias, k-norm, RoPE per cached slot), done here in one pass that reads the
latents once and writes the keys once, in the query dtype. Up to a value rank of one head
dim the values stay latent: SDPA runs ``P @ hv`` with each KV head reading its group's latent
values, so the output is in value-latent space, as the op promises without ``lv``.

The values keep their rank as head dim where SDPA has a kernel for a value head dim other
than the query's: cuDNN's (``unpadded_values``). At rank ratio 0.5 and group size 1 that
makes prefill faster than SDPA on the full cache, since ``P @ hv`` is half as wide (H200,
B=1, causal, 32 heads: 4k 0.223 ms against 0.275 for the full cache, 16k 3.25 against 3.94,
before the key rebuild's 0.03/0.09 ms; RESULTS.md). Elsewhere (no cuDNN, a mask or shape it
refuses) the narrower side is zero padded, as SDPA's flash path wants one head dim for q, k
and v: padded key/query columns add 0 to every score, padded value columns are sliced off.
A value rank above the head dim (rank ratio 0.5 at 4 heads per group: 256 for head dim 128)
would make ``P @ hv`` wider than the uncompressed model's, and a folded ``o_proj`` as much
wider: there the pass passes ``L_v`` to the op instead of folding it (``lv``), and this path
rebuilds the values (``rebuild_values``: a batched matmul, as there is no RoPE to fuse), so
SDPA runs at the model's head dims.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from palu_fx.kernels.latent_attention.common import load_lk_head, load_rope_pairs, rebuild_head


@triton.jit
def rebuild_keys_kernel(
    hk_ptr, lk_ptr, bias_ptr, cos_ptr, sin_ptr, w_ptr, k_ptr, hv_ptr, v_ptr,
    shk_b, shk_s, slk_g, slk_r,
    sc_b, sc_s, sc_d, ss_b, ss_s, ss_d,
    sk_b, sk_h, sk_s, shv_b, shv_s, sv_b, sv_h, sv_s,
    G, Skv, RK, RV, eps,
    D: tl.constexpr, RK_P: tl.constexpr, GS: tl.constexpr, BLOCK_S: tl.constexpr,
    ROPE: tl.constexpr, ROT: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    STEP: tl.constexpr, HI_OFF: tl.constexpr, PASS: tl.constexpr, PASS_P: tl.constexpr,
    HAS_PASS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, COPY_V: tl.constexpr, RV_P: tl.constexpr,
):
    """Keys [B, Hkv, Skv, >=D] of one group's heads and one token tile: the latent tile is read
    once for the group's heads, their ``L_k`` slices per tile (from L2: consecutive programs
    are tiles of one group). ``COPY_V``: also the group's latent values, written once per KV
    head of the group [B, Hkv, Skv, RV]; loaded first and stored last, so that their traffic
    overlaps the key products (gs2, 4k: 0.0427 ms, against 0.0492 for a second launch)."""
    pid_t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)  # batch offsets of long caches pass 2**31 elements
    g = pid_bg % G
    kv = pid_t * BLOCK_S + tl.arange(0, BLOCK_S)
    kv_ok = kv < Skv
    rk = tl.arange(0, RK_P)
    d = tl.arange(0, HALF_P)[None, :]
    e = tl.arange(0, PASS_P)[None, :]
    hk_t = tl.load(hk_ptr + b * shk_b + kv[:, None] * shk_s + (g * RK + rk)[None, :],
                   mask=kv_ok[:, None] & (rk[None, :] < RK), other=0.0)
    if COPY_V:
        rv = tl.arange(0, RV_P)[None, :]
        v_ok = kv_ok[:, None] & (rv < RV)
        hv_t = tl.load(hv_ptr + b * shv_b + kv[:, None] * shv_s + g * RV + rv, mask=v_ok)
    if ROPE:
        cs, sn = load_rope_pairs(cos_ptr, sin_ptr, b, kv, kv_ok, sc_b, sc_s, sc_d, ss_b, ss_s, ss_d, 0,
                                 HALF, HALF_P, STEP)
    else:
        cs = tl.zeros([BLOCK_S, HALF_P], tl.float32)
        sn = cs
    for j in tl.static_range(GS):
        h = g * GS + j
        t_lo, t_hi, t_ps = load_lk_head(lk_ptr, g, j, slk_g, slk_r, RK, D, RK_P, ROPE, ROT, HALF, HALF_P, STEP,
                                        HI_OFF, PASS, PASS_P, HAS_PASS)
        k_lo, k_hi, k_ps = rebuild_head(hk_t, t_lo, t_hi, t_ps, bias_ptr, w_ptr, h * D, cs, sn, eps, BLOCK_S,
                                        D, ROPE, ROT, HALF, HALF_P, STEP, HI_OFF, PASS, PASS_P, HAS_PASS,
                                        HAS_BIAS, HAS_NORM, UPCAST, IEEE)
        row = k_ptr + b * sk_b + h * sk_h + kv[:, None] * sk_s
        if ROPE:
            ok = kv_ok[:, None] & (d < HALF)
            tl.store(row + d * STEP, k_lo.to(k_ptr.dtype.element_ty), mask=ok)
            tl.store(row + d * STEP + HI_OFF, k_hi.to(k_ptr.dtype.element_ty), mask=ok)
        if HAS_PASS:
            tl.store(row + ROT + e, k_ps.to(k_ptr.dtype.element_ty), mask=kv_ok[:, None] & (e < PASS))
    if COPY_V:
        for j in tl.static_range(GS):
            tl.store(v_ptr + b * sv_b + (g * GS + j) * sv_h + kv[:, None] * sv_s + rv, hv_t, mask=v_ok)


def rebuild_keys(hk, lk, k_bias, cos, sin, k_norm_weight, eps, p, width, dtype, probe=False, values=None):
    """Rebuilt keys [B, Hkv, Skv, width] in ``dtype`` (columns past D are zero).

    ``p`` holds the rotary/part constants computed by the wrapper (see ``wrapper._parts``).
    ``probe``: return (kernel, grid, args, constexprs) instead of launching. ``values``: the
    latent values ``hv [B, Skv, G*rv]``; then returns (keys, values ``[B, Hkv, Skv, rv]``,
    each group's latents for each of its KV heads, as ``replicate_values``), from one launch
    except with 128-token tiles (the value tile would spill: gs4 at rank 256 compiles to 255
    registers and 216 bytes of stack, against 242 and none; gs2 at rank 128 to 231 against 182,
    still two programs per SM; sm_90, Triton 3.6).

    Tiles of 64 tokens and 4 warps; 128 tokens and 8 warps where a group's products are wide
    (rank x heads > 512, ranks up to 256), which halves the ``L_k`` reads per key. H200, B=1,
    32 KV heads, rank ratio 0.5, 4k / 16k tokens (``prefill_parts_probe.py --sweep``): gs1
    0.026 / 0.082 ms, gs2 0.033 / 0.108; gs4 0.044 / 0.159 (64 tokens: 0.047 / 0.166; a
    program per head looping over tiles, the previous default: 0.059 / 0.236).
    """
    B, Skv, _ = hk.shape
    G, gsD, RK = lk.shape
    D = p["D"]
    GS = gsD // D
    alloc = torch.zeros if width > D else torch.empty
    keys = alloc(B, G * GS, Skv, width, dtype=dtype, device=hk.device)
    wide = p["RK_P"] * GS > 512 and p["RK_P"] <= 256  # larger ranks: two 128-token stages pass shared memory
    block_s = 128 if wide else 64
    grid = (triton.cdiv(Skv, block_s), B * G)
    if values is not None and wide and not probe:  # a value tile held over the wide products spills
        return rebuild_keys(hk, lk, k_bias, cos, sin, k_norm_weight, eps, p, width, dtype), \
            replicate_values(values, G, G * GS)
    hv, vals, RV = keys, keys, 0  # (unread without values)
    if values is not None:
        hv = values if values.stride(-1) == 1 else values.contiguous()
        RV = hv.shape[-1] // G
        vals = torch.empty(B, G * GS, Skv, RV, dtype=hv.dtype, device=hv.device)
    args = (hk, lk, p["bias"], p["cos"], p["sin"], p["w"], keys, hv, vals,
            hk.stride(0), hk.stride(1), lk.stride(0), lk.stride(1),
            *p["cos_strides"], *p["sin_strides"],
            keys.stride(0), keys.stride(1), keys.stride(2),
            hv.stride(0), hv.stride(1), vals.stride(0), vals.stride(1), vals.stride(2),
            G, Skv, RK, RV, eps)
    consts = dict(D=D, RK_P=p["RK_P"], GS=GS, BLOCK_S=block_s,
                  ROPE=p["ROPE"], ROT=p["ROT"], HALF=p["HALF"], HALF_P=p["HALF_P"], STEP=p["STEP"],
                  HI_OFF=p["HI_OFF"], PASS=p["PASS"], PASS_P=p["PASS_P"], HAS_PASS=p["HAS_PASS"],
                  HAS_BIAS=p["HAS_BIAS"], HAS_NORM=p["HAS_NORM"], UPCAST=p["UPCAST"], IEEE=p["IEEE"],
                  COPY_V=values is not None, RV_P=triton.next_power_of_2(max(RV, 1)),
                  num_warps=8 if wide else 4, num_stages=2)
    if probe:
        return rebuild_keys_kernel, grid, args, consts
    rebuild_keys_kernel[grid](*args, **consts)
    return keys if values is None else (keys, vals)


def rebuild_values(hv: torch.Tensor, lv: torch.Tensor, groups: int) -> torch.Tensor:
    """Values ``[B, Hkv, Skv, Dv]`` from the latents ``hv [B, Skv, groups*rv]`` and each KV head's
    ``lv [Hkv, Dv, rv]``: one batched product over the groups (cuBLAS on the GPU), written
    straight into [B, Skv, Hkv, Dv] memory, the layout SDPA gets in the model.

    No RoPE, bias or norm to apply, so no kernel of ours beats the library here: H200, B=1,
    32 KV heads, gs4, rank 256, 4k / 16k tokens: 0.026 / 0.076 ms, against 0.038 / 0.105
    for the key-rebuild kernel at its best tile (``prefill_parts_probe.py``). Run on a side
    stream beside the key kernel it saved only 0.005 / 0.003 ms, so it runs after it.
    """
    B, Skv, _ = hv.shape
    Hkv, Dv, rv = lv.shape
    gs = Hkv // groups
    out = torch.empty(B, Skv, Hkv, Dv, dtype=hv.dtype, device=hv.device)
    lat = hv.reshape(B * Skv, groups, rv).transpose(0, 1)  # [G, B*Skv, rv]
    wts = lv.to(hv.dtype).reshape(groups, gs * Dv, rv).transpose(1, 2)  # [G, rv, gs*Dv]
    # out= of [G, B*Skv, gs*Dv] with unit column stride: cuBLAS writes it in place
    torch.bmm(lat, wts, out=out.view(B * Skv, groups, gs * Dv).transpose(0, 1))
    return out.transpose(1, 2)


@triton.jit
def replicate_values_kernel(hv_ptr, v_ptr, shv_b, shv_s, sv_b, sv_h, sv_s, G, Skv, R,
                            REP: tl.constexpr, R_P: tl.constexpr, BLOCK_S: tl.constexpr):
    """The latent values of one group and token tile, written once per KV head of the group."""
    pid_t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    kv = pid_t * BLOCK_S + tl.arange(0, BLOCK_S)
    r = tl.arange(0, R_P)
    ok = (kv < Skv)[:, None] & (r < R)[None, :]
    tile = tl.load(hv_ptr + b.to(tl.int64) * shv_b + kv[:, None] * shv_s + (g * R + r)[None, :], mask=ok)
    for j in tl.static_range(REP):
        tl.store(v_ptr + b.to(tl.int64) * sv_b + (g * REP + j) * sv_h + kv[:, None] * sv_s + r[None, :], tile,
                 mask=ok)


def replicate_values(hv: torch.Tensor, groups: int, heads: int) -> torch.Tensor:
    """``hv [B, Skv, groups*rv]`` -> ``[B, heads, Skv, rv]``, each group's latents for each of its
    ``heads // groups`` KV heads (SDPA reads one value head per key head). H200, B=1 x 4k, 32
    KV heads, gs2: 0.018 ms for its 48 MiB (2.7 TB/s); tiles of 64-256 tokens or a BSHD output
    took the same, a broadcast ``copy_`` 0.041 ms (``prefill_parts_probe.py``). The prefill
    path makes this copy in the key kernel's launch instead (``rebuild_keys(values=...)``:
    0.0427 ms for both at 4k, against 0.0492 in two launches), except with 128-token tiles.
    """
    hv = hv if hv.stride(-1) == 1 else hv.contiguous()
    B, Skv, C = hv.shape
    rv = C // groups
    vals = torch.empty(B, heads, Skv, rv, dtype=hv.dtype, device=hv.device)
    block_s = 32
    replicate_values_kernel[(triton.cdiv(Skv, block_s), B * groups)](
        hv, vals, hv.stride(0), hv.stride(1), vals.stride(0), vals.stride(1), vals.stride(2), groups, Skv, rv,
        REP=heads // groups, R_P=triton.next_power_of_2(rv), BLOCK_S=block_s, num_warps=4)
    return vals


# (device, dtypes, head dims, mask kind, causal, GQA) -> whether cuDNN's SDPA took the
# unpadded values; a refusal is remembered, so only the first call of a kind pays for it
_UNPADDED: dict = {}


def _unpadded_key(q, dtype, rv, attn_mask, is_causal, gqa):
    mask = None if attn_mask is None else (attn_mask.dtype == torch.bool, attn_mask.dim())
    return q.device, dtype, q.shape[-1], rv, mask, bool(is_causal), gqa


def unpadded_values(q, rv, attn_mask, is_causal, gqa, dtype=None) -> bool:
    """Whether ``sdpa_latent`` will try keys of the query's head dim with ``rv``-wide values
    (a CUDA query, a value rank other than the head dim, no refusal seen for this kind);
    ``dtype``: the operands' dtype if not the query's."""
    key = _unpadded_key(q, dtype or q.dtype, rv, attn_mask, is_causal, gqa)
    return _has_cudnn_sdpa(q) and rv != q.shape[-1] and _UNPADDED.get(key, True)


def _has_cudnn_sdpa(q) -> bool:
    return q.is_cuda


def sdpa_latent(q, keys, hv, groups, attn_mask, scale, is_causal):
    """``softmax(q k^T) @ hv`` through SDPA; ``keys`` [B, Hk, Skv, dk], out [B, Hq, Sq, rv].

    ``keys`` may already be zero padded past q's head dim (then q is padded to match).
    """
    B, Skv = hv.shape[0], hv.shape[1]
    rv = hv.shape[-1] // groups
    Hk = keys.shape[1]
    if Hk != groups:  # G-LRD: every KV head of a group reads the group's latent values
        vals = replicate_values(hv, groups, Hk)
    else:
        vals = hv.view(B, Skv, groups, rv).transpose(1, 2)
    return sdpa_values(q, keys, vals, attn_mask, scale, is_causal)


def sdpa_values(q, keys, vals, attn_mask, scale, is_causal):
    """``softmax(q k^T) @ vals`` through SDPA; ``keys`` [B, Hk, Skv, dk], ``vals`` [B, Hk, Skv, dv].

    Values narrower than the query's head dim go to cuDNN unpadded where it takes them;
    elsewhere the narrower operands are zero padded to one head dim (padded key/query
    columns add 0 to every score, padded value columns are sliced off).
    """
    Dq, Hq, Hk, dk, rv = q.shape[-1], q.shape[1], keys.shape[1], keys.shape[-1], vals.shape[-1]
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)
    keys, vals, gqa = keys.to(q.dtype), vals.to(q.dtype), Hq != Hk
    if dk == Dq and unpadded_values(q, rv, attn_mask, is_causal, gqa):
        key = _unpadded_key(q, q.dtype, rv, attn_mask, is_causal, gqa)
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=attn_mask, is_causal=is_causal,
                                                     scale=scale, enable_gqa=gqa)
            _UNPADDED[key] = True
            return out
        except RuntimeError:  # no cuDNN kernel for this call: pad below
            _UNPADDED[key] = False
    width = max(dk, rv, Dq)
    if rv < width:
        vals = F.pad(vals, (0, width - rv))
    if dk < width:
        keys = F.pad(keys, (0, width - dk))
    if Dq < width:
        q = F.pad(q, (0, width - Dq))
    out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=gqa)
    return out[..., :rv] if width > rv else out
