"""Latent-space attention kernel for models without RoPE (absorbed mode, MLA-style).

The query arrives already multiplied by ``L_k`` (``q' = q L_k``, [B, Hq, Sq, rk]), so the
scores are ``q' . hk`` directly and no key is ever rebuilt: the kernel is a plain
flash-decoding loop over the latent caches, purely bandwidth bound. One program handles
every query head of a group (they share ``hk``/``hv``), one query block and one split of
the cached tokens; the query tile is loaded once, the token loop streams ``hk`` and ``hv``
tiles, which is where all the bytes are. Tiles come from ``common.load_latent``: a plain
cache, or packed 2/3/4-bit codes dequantized in registers (then the stream is the packed
bytes plus the fp16 scales and zeros). With one quantization group per Palu group and
``FOLD`` (the wrapper's default), the products take the raw codes and the per-token scale
and zero are applied to their results instead (``common.folded_values``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from palu_fx.kernels.latent_attention.common import (
    finish_rows, folded_values, kv_range, load_codes, load_latent, load_mask_row, load_scale_zero, mma, row_coords,
    scores_to_log2, softmax_init, softmax_step, softmax_weights,
)


@triton.jit
def absorbed_attention_kernel(
    q_ptr, hk_ptr, hv_ptr, hks_ptr, hkz_ptr, hvs_ptr, hvz_ptr, mask_ptr, out_ptr, part_ptr, lse_ptr,
    sq_b, sq_h, sq_s, sq_d,
    shk_b, shk_s, shv_b, shv_s, shks_b, shks_s, shvs_b, shvs_s, K_W, V_W,
    sm_b, sm_h, sm_q, sm_k,
    so_b, so_h, so_s,
    G, Hq, Sq, Skv, chunk, NSPLIT, RK, RV, scale, softcap,
    RK_P: tl.constexpr, RV_P: tl.constexpr, HPG: tl.constexpr, HPG_P: tl.constexpr,
    M_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    DIRECT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    K_BITS: tl.constexpr = 0, K_QG: tl.constexpr = 1, K_QG_P: tl.constexpr = 1, K_NQG: tl.constexpr = 1,
    K_NQG_P: tl.constexpr = 1, V_BITS: tl.constexpr = 0, V_QG: tl.constexpr = 1, V_QG_P: tl.constexpr = 1,
    V_NQG: tl.constexpr = 1, V_NQG_P: tl.constexpr = 1, FOLD_K: tl.constexpr = False, FOLD_V: tl.constexpr = False,
    PREFETCH: tl.constexpr = False,
):
    pid_s = tl.program_id(0)
    pid_bg = tl.program_id(1)
    pid_q = tl.program_id(2)
    NQB = tl.num_programs(2)
    SQB: tl.constexpr = M_BLOCK // HPG_P

    b, g, h_loc, head, qi, row_ok = row_coords(pid_bg, pid_q, G, Hq, Sq, HPG, HPG_P, M_BLOCK)
    m_off = b * sm_b + head * sm_h + qi * sm_q
    lo, hi = kv_range(pid_s, pid_q, chunk, Skv, Sq, IS_CAUSAL, SQB)

    rk = tl.arange(0, RK_P)
    # query tile, transposed [RK_P, M]: the B operand of the score dot
    q_t = tl.load(q_ptr + (b * sq_b + head * sq_h + qi * sq_s)[None, :] + rk[:, None] * sq_d,
                  mask=row_ok[None, :] & (rk[:, None] < RK), other=0.0)
    hk_base = hk_ptr + b * shk_b + g * K_W  # plain (RK elements) or packed (K_W bytes) per group
    hv_base = hv_ptr + b * shv_b + g * V_W
    hks_off = b * shks_b + g * K_NQG
    hvs_off = b * shvs_b + g * V_NQG

    dtype = q_ptr.dtype.element_ty
    q_sum = tl.sum(q_t.to(tl.float32), axis=0)  # [M]: what a zero point adds to a score
    PRE_MASK: tl.constexpr = PREFETCH and MASK_KIND >= 3  # the shared mask row, a tile ahead
    kv = lo + tl.arange(0, BLOCK_S)
    mrow_n = load_mask_row(mask_ptr, b * sm_b, kv, kv < hi, sm_k, MASK_KIND if PRE_MASK else 0)
    m_i, l_i, acc = softmax_init(M_BLOCK, RV_P)
    accz = tl.zeros([M_BLOCK], tl.float32)
    for start in range(lo, hi, BLOCK_S):
        kv = start + tl.arange(0, BLOCK_S)
        kv_ok = kv < hi
        mrow = mrow_n
        if PRE_MASK:
            kv_n = kv + BLOCK_S
            mrow_n = load_mask_row(mask_ptr, b * sm_b, kv_n, kv_n < hi, sm_k, MASK_KIND)
        if FOLD_K:
            sk, zk = load_scale_zero(hks_ptr + hks_off, hkz_ptr + hks_off, kv, kv_ok, shks_s, K_BITS)
            s = mma(load_codes(hk_base, kv, kv_ok, shk_s, RK_P, K_BITS, K_QG, dtype), q_t, UPCAST, IEEE)
            s = s * sk[:, None] + zk[:, None] * q_sum[None, :]
        else:
            hk_t = load_latent(hk_base, hks_ptr + hks_off, hkz_ptr + hks_off, kv, kv_ok, shk_s, shks_s, RK, RK_P,
                               K_BITS, K_QG, K_QG_P, K_NQG, K_NQG_P, dtype)
            s = mma(hk_t, q_t, UPCAST, IEEE)
        s2 = scores_to_log2(s, kv, kv_ok, qi, row_ok, m_off, b * sm_b, mask_ptr, sm_k, scale, softcap,
                            MASK_KIND, IS_CAUSAL, USE_SOFTCAP, mrow, PRE_MASK)
        if FOLD_V:
            p, alpha, m_i, l_i = softmax_weights(s2, m_i, l_i)
            sv, zv = load_scale_zero(hvs_ptr + hvs_off, hvz_ptr + hvs_off, kv, kv_ok, shvs_s, V_BITS)
            cv = load_codes(hv_base, kv, kv_ok, shv_s, RV_P, V_BITS, V_QG, dtype)
            acc, accz = folded_values(p, acc, accz, alpha, cv, sv, zv, UPCAST, IEEE)
        else:
            v_t = load_latent(hv_base, hvs_ptr + hvs_off, hvz_ptr + hvs_off, kv, kv_ok, shv_s, shvs_s, RV, RV_P,
                              V_BITS, V_QG, V_QG_P, V_NQG, V_NQG_P, dtype)
            m_i, l_i, acc = softmax_step(s2, m_i, l_i, acc, v_t, UPCAST, IEEE)

    finish_rows(acc + accz[None, :], m_i, l_i, out_ptr, part_ptr, lse_ptr, b, head, qi, row_ok, so_b, so_h, so_s,
                pid_bg, pid_q, pid_s, NQB, NSPLIT, RV, RV_P, M_BLOCK, DIRECT)
