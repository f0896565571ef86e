"""Latent-space attention kernel for models without RoPE (absorbed mode, MLA-style).

The query arrives already multiplied by ``L_k`` (``q' = q L_k``, [B, Hq, Sq, rk]), so the
scores are ``q' . hk`` directly and no key is ever rebuilt: the kernel is a plain
flash-decoding loop over the latent caches, purely bandwidth bound. One program handles
every query head of a group (they share ``hk``/``hv``), one query block and one split of
the cached tokens; the query tile is loaded once, the token loop streams ``hk`` and ``hv``
tiles, which is where all the bytes are. Tiles come from ``common.load_latent``: a plain
cache, or packed 2/3/4-bit codes dequantized in registers (then the stream is the packed
bytes plus the fp16 scales and zeros).
"""
from __future__ import annotations

import triton
import triton.language as tl

from palu_fx.kernels.latent_attention.common import (
    finish_rows, kv_range, load_latent, mma, row_coords, scores_to_log2, softmax_init, softmax_step, tile_vectors,
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
    V_NQG: tl.constexpr = 1, V_NQG_P: tl.constexpr = 1, PREFETCH: tl.constexpr = False,
    K_WORDS: tl.constexpr = False, V_WORDS: tl.constexpr = False,
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

    # PREFETCH: the shared mask row and the per-token scales/zeros, a tile ahead (common.py)
    ks, kz, vs, vz = hks_ptr + hks_off, hkz_ptr + hks_off, hvs_ptr + hvs_off, hvz_ptr + hvs_off
    one = tl.arange(0, 1)  # the program's one Palu group: a single column of scales/zeros
    mrow_n, sk_n, zk_n, sv_n, zv_n = tile_vectors(mask_ptr, b * sm_b, sm_k, ks, kz, vs, vz, shks_s, shvs_s, one,
                                                  one, lo + tl.arange(0, BLOCK_S), hi, PREFETCH, MASK_KIND, K_BITS,
                                                  K_NQG_P, V_BITS, V_NQG_P)
    m_i, l_i, acc = softmax_init(M_BLOCK, RV_P, BLOCK_S)
    for start in range(lo, hi, BLOCK_S):
        kv = start + tl.arange(0, BLOCK_S)
        kv_ok = kv < hi
        mrow, sk, zk, sv, zv = mrow_n, sk_n, zk_n, sv_n, zv_n
        mrow_n, sk_n, zk_n, sv_n, zv_n = tile_vectors(mask_ptr, b * sm_b, sm_k, ks, kz, vs, vz, shks_s, shvs_s,
                                                      one, one, kv + BLOCK_S, hi, PREFETCH, MASK_KIND, K_BITS,
                                                      K_NQG_P, V_BITS, V_NQG_P)
        hk_t = load_latent(hk_base, hks_ptr + hks_off, hkz_ptr + hks_off, kv, kv_ok, shk_s, shks_s, RK, RK_P,
                           K_BITS, K_QG, K_QG_P, K_NQG, K_NQG_P, q_ptr.dtype.element_ty, sk, zk, PREFETCH,
                           K_WORDS)
        s = mma(hk_t, q_t, UPCAST, IEEE)
        s2 = scores_to_log2(s, kv, kv_ok, qi, row_ok, m_off, b * sm_b, mask_ptr, sm_k, scale, softcap,
                            MASK_KIND, IS_CAUSAL, USE_SOFTCAP, mrow, PREFETCH)
        v_t = load_latent(hv_base, hvs_ptr + hvs_off, hvz_ptr + hvs_off, kv, kv_ok, shv_s, shvs_s, RV, RV_P,
                          V_BITS, V_QG, V_QG_P, V_NQG, V_NQG_P, q_ptr.dtype.element_ty, sv, zv, PREFETCH,
                          V_WORDS)
        m_i, l_i, acc = softmax_step(s2, m_i, l_i, acc, v_t, UPCAST, IEEE)

    finish_rows(acc, m_i, l_i, out_ptr, part_ptr, lse_ptr, b, head, qi, row_ok, so_b, so_h, so_s,
                pid_bg, pid_q, pid_s, NQB, NSPLIT, RV, RV_P, M_BLOCK, DIRECT)
