"""Latent-space attention kernel for models without RoPE (absorbed mode, MLA-style).

The query arrives already multiplied by ``L_k`` (``q' = q L_k``, [B, Hq, Sq, rk]), so the
scores are ``q' . hk`` directly and no key is ever rebuilt: the kernel is a plain
flash-decoding loop over the latent caches, purely bandwidth bound. One program handles
every query head of a group (they share ``hk``/``hv``), one query block and one split of
the cached tokens; the query tile is loaded once, the token loop streams ``hk`` and ``hv``
tiles, which is where all the bytes are.
"""
from __future__ import annotations

import triton
import triton.language as tl

from palu_fx.kernels.latent_attention.common import finish_rows, kv_range, mma, row_coords, scores_to_log2, softmax_step


@triton.jit
def absorbed_attention_kernel(
    q_ptr, hk_ptr, hv_ptr, mask_ptr, out_ptr, part_ptr, lse_ptr,
    sq_b, sq_h, sq_s, sq_d,
    shk_b, shk_s, shv_b, shv_s,
    sm_b, sm_h, sm_q, sm_k,
    so_b, so_h, so_s,
    G, Hq, Sq, Skv, chunk, NSPLIT, RK, RV, scale, softcap,
    RK_P: tl.constexpr, RV_P: tl.constexpr, HPG: tl.constexpr, HPG_P: tl.constexpr,
    M_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    DIRECT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
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
    rv = tl.arange(0, RV_P)
    # query tile, transposed [RK_P, M]: the B operand of the score dot
    q_t = tl.load(q_ptr + (b * sq_b + head * sq_h + qi * sq_s)[None, :] + rk[:, None] * sq_d,
                  mask=row_ok[None, :] & (rk[:, None] < RK), other=0.0)
    hk_base = hk_ptr + b * shk_b + (g * RK + rk)[None, :]
    hv_base = hv_ptr + b * shv_b + (g * RV + rv)[None, :]

    m_i = tl.full([M_BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([M_BLOCK], tl.float32)
    acc = tl.zeros([RV_P, M_BLOCK], tl.float32)
    for start in range(lo, hi, BLOCK_S):
        kv = start + tl.arange(0, BLOCK_S)
        kv_ok = kv < hi
        hk_t = tl.load(hk_base + kv[:, None] * shk_s, mask=kv_ok[:, None] & (rk[None, :] < RK), other=0.0)
        s = mma(hk_t, q_t, UPCAST, IEEE)
        s2 = scores_to_log2(s, kv, kv_ok, qi, row_ok, m_off, mask_ptr, sm_k, scale, softcap,
                            MASK_KIND, IS_CAUSAL, USE_SOFTCAP)
        v_t = tl.load(hv_base + kv[:, None] * shv_s, mask=kv_ok[:, None] & (rv[None, :] < RV), other=0.0)
        m_i, l_i, acc = softmax_step(s2, m_i, l_i, acc, v_t, UPCAST, IEEE)

    finish_rows(acc, m_i, l_i, out_ptr, part_ptr, lse_ptr, b, head, qi, row_ok, so_b, so_h, so_s,
                pid_bg, pid_q, pid_s, NQB, NSPLIT, RV, RV_P, M_BLOCK, DIRECT)
