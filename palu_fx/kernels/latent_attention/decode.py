"""Fused decode kernel for the reconstruct (RoPE) mode: rebuild keys, rotate, attend.

One program = one (batch, group) pair x one query block x one split of the cached tokens
(flash-decoding). Per token tile it loads the group's latent keys ``hk`` [BLOCK_S, rk] once
and rebuilds the keys of every KV head of the group from it with ``tl.dot`` (tensor cores),
so the reconstruction is amortised over all the query heads that share the group (GQA,
MQA, and the ``gs`` heads of a G-LRD group). Scores, the online softmax and ``P @ hv``
follow in the same loop; the output stays in value-latent space.

Why the loads sit where they do:
* With one head per group the ``L_k`` tiles and the query are loop invariant and are
  loaded once (``HOIST``). With several heads they cannot be held as a list of tensors,
  and holding all heads' ``L_k`` at once would not fit the registers at rank 256 (256 KB),
  so they are re-read per tile; they are small and shared by every program of the group,
  so they come from L1/L2, not HBM. Larger ``BLOCK_S`` amortises that re-read.
* The head loop is a ``static_range`` so the token loop stays the innermost loop and the
  compiler can software-pipeline the ``hk``/``hv``/cos/sin loads (``num_stages``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from palu_fx.kernels.latent_attention.common import (
    finish_rows, kv_range, load_lk_head, load_q_head, load_rope_tables, mma, rebuild_head,
    row_coords, scores_to_log2, softmax_step,
)


@triton.jit
def rebuild_attention_kernel(
    q_ptr, hk_ptr, hv_ptr, lk_ptr, bias_ptr, cos_ptr, sin_ptr, w_ptr, mask_ptr,
    out_ptr, part_ptr, lse_ptr,
    sq_b, sq_h, sq_s, sq_d,
    shk_b, shk_s, shv_b, shv_s,
    slk_g, slk_r,
    sc_b, sc_s, sc_d, ss_b, ss_s, ss_d,
    sm_b, sm_h, sm_q, sm_k,
    so_b, so_h, so_s,
    G, Hq, Sq, Skv, chunk, NSPLIT, RK, RV, scale, softcap, eps,
    D: tl.constexpr, RK_P: tl.constexpr, RV_P: tl.constexpr,
    GS: tl.constexpr, NREP: tl.constexpr, HPG: tl.constexpr, HPG_P: tl.constexpr,
    M_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    ROPE: tl.constexpr, ROT: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    STEP: tl.constexpr, HI_OFF: tl.constexpr, PASS: tl.constexpr, PASS_P: tl.constexpr,
    HAS_PASS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    DIRECT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bg = tl.program_id(1)
    pid_q = tl.program_id(2)
    NQB = tl.num_programs(2)
    SQB: tl.constexpr = M_BLOCK // HPG_P
    HOIST: tl.constexpr = GS == 1
    dt = q_ptr.dtype.element_ty

    b, g, h_loc, head, qi, row_ok = row_coords(pid_bg, pid_q, G, Hq, Sq, HPG, HPG_P, M_BLOCK)
    jr = h_loc // NREP  # KV head of each row, within the group
    q_row = b * sq_b + head * sq_h + qi * sq_s
    m_off = b * sm_b + head * sm_h + qi * sm_q
    lo, hi = kv_range(pid_s, pid_q, chunk, Skv, Sq, IS_CAUSAL, SQB)

    rk = tl.arange(0, RK_P)
    rv = tl.arange(0, RV_P)
    hk_base = hk_ptr + b * shk_b + (g * RK + rk)[None, :]
    hv_base = hv_ptr + b * shv_b + (g * RV + rv)[None, :]

    # loop-invariant operands when the group has a single KV head
    if HOIST:
        lk_lo, lk_hi, lk_ps = load_lk_head(lk_ptr, g, 0, slk_g, slk_r, RK, D, RK_P, ROPE, ROT, HALF, HALF_P,
                                           STEP, HI_OFF, PASS, PASS_P, HAS_PASS)
        q_lo, q_hi, q_ps = load_q_head(q_ptr, q_row, jr, 0, row_ok, sq_d, M_BLOCK, ROPE, ROT, HALF, HALF_P,
                                       STEP, HI_OFF, PASS, PASS_P, HAS_PASS)

    m_i = tl.full([M_BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([M_BLOCK], tl.float32)
    acc = tl.zeros([RV_P, M_BLOCK], tl.float32)
    for start in range(lo, hi, BLOCK_S):
        kv = start + tl.arange(0, BLOCK_S)
        kv_ok = kv < hi
        hk_t = tl.load(hk_base + kv[:, None] * shk_s, mask=kv_ok[:, None] & (rk[None, :] < RK), other=0.0)
        if ROPE:
            c_lo, c_hi, s_lo, s_hi = load_rope_tables(cos_ptr, sin_ptr, b, kv, kv_ok, sc_b, sc_s, sc_d,
                                                      ss_b, ss_s, ss_d, HALF, HALF_P, STEP, HI_OFF)
        else:
            c_lo = tl.zeros([BLOCK_S, HALF_P], tl.float32)
            c_hi = c_lo
            s_lo = c_lo
            s_hi = c_lo
        s = tl.zeros([BLOCK_S, M_BLOCK], tl.float32)
        for j in tl.static_range(GS):
            if HOIST:
                t_lo = lk_lo
                t_hi = lk_hi
                t_ps = lk_ps
                u_lo = q_lo
                u_hi = q_hi
                u_ps = q_ps
            else:
                t_lo, t_hi, t_ps = load_lk_head(lk_ptr, g, j, slk_g, slk_r, RK, D, RK_P, ROPE, ROT, HALF,
                                                HALF_P, STEP, HI_OFF, PASS, PASS_P, HAS_PASS)
                u_lo, u_hi, u_ps = load_q_head(q_ptr, q_row, jr, j, row_ok, sq_d, M_BLOCK, ROPE, ROT, HALF,
                                               HALF_P, STEP, HI_OFF, PASS, PASS_P, HAS_PASS)
            k_lo, k_hi, k_ps = rebuild_head(hk_t, t_lo, t_hi, t_ps, bias_ptr, w_ptr, (g * GS + j) * D,
                                            c_lo, c_hi, s_lo, s_hi, eps, BLOCK_S, D, ROPE, ROT, HALF, HALF_P,
                                            STEP, HI_OFF, PASS, PASS_P, HAS_PASS, HAS_BIAS, HAS_NORM,
                                            UPCAST, IEEE)
            # the rebuilt keys are rounded to the cache dtype for the score dot, as a
            # full-cache model would hold them
            if ROPE:
                s += mma(k_lo.to(dt), u_lo, UPCAST, IEEE)
                s += mma(k_hi.to(dt), u_hi, UPCAST, IEEE)
            if HAS_PASS:
                s += mma(k_ps.to(dt), u_ps, UPCAST, IEEE)
        s2 = scores_to_log2(s, kv, kv_ok, qi, m_off, mask_ptr, sm_k, scale, softcap,
                            MASK_KIND, IS_CAUSAL, USE_SOFTCAP)
        v_t = tl.load(hv_base + kv[:, None] * shv_s, mask=kv_ok[:, None] & (rv[None, :] < RV), other=0.0)
        m_i, l_i, acc = softmax_step(s2, m_i, l_i, acc, v_t, UPCAST, IEEE)

    finish_rows(acc, m_i, l_i, out_ptr, part_ptr, lse_ptr, b, head, qi, row_ok, so_b, so_h, so_s,
                pid_bg, pid_q, pid_s, NQB, NSPLIT, RV, RV_P, M_BLOCK, DIRECT)
