"""Fused decode kernel for the reconstruct (RoPE) mode: rebuild keys, rotate, attend.

One program = one (batch, group) pair x one query block x one split of the cached tokens
(flash-decoding). Per token tile it loads the group's latent keys ``hk`` [BLOCK_S, rk] once
and rebuilds the keys of every KV head of the group from it with ``tl.dot`` (tensor cores),
so the reconstruction is amortised over all the query heads that share the group (GQA,
MQA, and the ``gs`` heads of a G-LRD group). Scores, the online softmax and ``P @ hv``
follow in the same loop; the output stays in value-latent space. The latent tiles come
from ``common.load_latent``: a plain cache, or packed 2/3/4-bit codes dequantized in
registers. On a GPU, RoPE calls in multi-head attention that ``gluon_rope.applies`` to (any
group size, ranks up to 128) take the Gluon kernel of ``gluon_rope.py`` instead (B=8 x 32k at
gs2: 0.82 ms against 1.68).

A head's key is rebuilt in column chunks of ``CH`` rotary pairs (and ``PCH`` pass-through
dims): the fp32 tiles of a chunk are [BLOCK_S, CH], so long token tiles fit the registers,
and long tiles are what amortise re-reading ``L_k``. Each chunk's score contribution goes
straight into the score tile. RMSNorm (k-norm) is a per-(token, head) scale, and RoPE and
the dot are linear, so the norm is applied to the head's scores once its sum of squares is
complete: ``q . rope(rstd * w * k) = rstd * (q . rope(w * k))``.

Heads of a group per program (``HPP``): all of them (``hk``/``hv`` read once per group, but
``L_k`` of every head re-read per tile, and the pipeliner multi-buffers it in shared memory)
or fewer, down to one (programs of the same group sit next to each other in the grid so
the shared latent tiles are L2 hits; ``L_k`` of the head is loop invariant).

Why the loads sit where they do:
* With one head per program and at most one chunk per part, the ``L_k`` tiles and the
  query are loop invariant and loaded once (``HOIST``, decided by the wrapper). Otherwise
  they are re-read per tile: small and shared by every program of the group, so they come
  from L1/L2, not HBM.
* Head loops are unrolled (``static_range``), or with ``DYN_HEADS`` a runtime loop: then
  only one head's operands are live at a time (large groups otherwise spill registers, as
  the scheduler overlaps the unrolled heads) and the pipeliner double-buffers that loop's
  ``L_k`` chunks instead of the token loop's loads.
* Without k-norm, chunks are the outer loop and heads the inner one, so each cos/sin chunk
  is loaded once per tile; with k-norm a head's chunks must all be seen before its scale
  is known, so heads are outer.
* Head and chunk loops are ``static_range`` so the token loop stays the innermost loop and
  the compiler can software-pipeline the ``hk``/``hv`` loads (``num_stages``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from palu_fx.kernels.latent_attention.common import (
    finish_rows, kv_range, load_latent, load_rope_pairs, mma, row_coords, scores_to_log2, softmax_init,
    softmax_step, tile_vectors,
)


@triton.jit
def _lk_pairs(lk_ptr, g, j, d0, slk_g, slk_r, RK, D: tl.constexpr, RK_P: tl.constexpr, HALF: tl.constexpr,
              CH: tl.constexpr, STEP: tl.constexpr, HI_OFF: tl.constexpr):
    """``L_k^T`` columns of rotary pairs ``d0 .. d0+CH`` of head ``j``: (lo, hi) [RK_P, CH]."""
    r = tl.arange(0, RK_P)[:, None]
    d = d0 + tl.arange(0, CH)[None, :]
    ok = (r < RK) & (d < HALF)
    base = lk_ptr + g * slk_g + (j * D) * slk_r + r
    lo = tl.load(base + (d * STEP) * slk_r, mask=ok, other=0.0)
    hi = tl.load(base + (d * STEP + HI_OFF) * slk_r, mask=ok, other=0.0)
    return lo, hi


@triton.jit
def _lk_pass(lk_ptr, g, j, e0, slk_g, slk_r, RK, D: tl.constexpr, RK_P: tl.constexpr, ROT: tl.constexpr,
             PASS: tl.constexpr, PCH: tl.constexpr):
    r = tl.arange(0, RK_P)[:, None]
    e = e0 + tl.arange(0, PCH)[None, :]
    return tl.load(lk_ptr + g * slk_g + (j * D + ROT + e) * slk_r + r, mask=(r < RK) & (e < PASS), other=0.0)


@triton.jit
def _q_pairs(q_ptr, q_row, mine, d0, sq_d, HALF: tl.constexpr, CH: tl.constexpr, STEP: tl.constexpr,
             HI_OFF: tl.constexpr):
    """Query columns of the same pairs, transposed [CH, M]; zero for rows of other heads."""
    d = d0 + tl.arange(0, CH)[:, None]
    ok = mine[None, :] & (d < HALF)
    lo = tl.load(q_ptr + q_row[None, :] + (d * STEP) * sq_d, mask=ok, other=0.0)
    hi = tl.load(q_ptr + q_row[None, :] + (d * STEP + HI_OFF) * sq_d, mask=ok, other=0.0)
    return lo, hi


@triton.jit
def _q_pass(q_ptr, q_row, mine, e0, sq_d, ROT: tl.constexpr, PASS: tl.constexpr, PCH: tl.constexpr):
    e = e0 + tl.arange(0, PCH)[:, None]
    return tl.load(q_ptr + q_row[None, :] + (ROT + e) * sq_d, mask=mine[None, :] & (e < PASS), other=0.0)


@triton.jit
def _vec(ptr, off, idx, ok):
    return tl.load(ptr + off + idx, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _rope_chunk(hk_t, t_lo, t_hi, u_lo, u_hi, cs, sn, bias_ptr, w_ptr, hb, d,
                HALF: tl.constexpr, STEP: tl.constexpr, HI_OFF: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_NORM: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Scores [BLOCK_S, M] of one rotary chunk of one head, and its sum of squares (k-norm)."""
    k_lo = mma(hk_t, t_lo, UPCAST, IEEE)
    k_hi = mma(hk_t, t_hi, UPCAST, IEEE)
    if HAS_BIAS:
        k_lo += _vec(bias_ptr, hb, d * STEP, d < HALF)[None, :]
        k_hi += _vec(bias_ptr, hb, d * STEP + HI_OFF, d < HALF)[None, :]
    ssq = tl.zeros([hk_t.shape[0]], tl.float32)
    if HAS_NORM:
        ssq = tl.sum(k_lo * k_lo, axis=1) + tl.sum(k_hi * k_hi, axis=1)
        k_lo = k_lo * _vec(w_ptr, 0, d * STEP, d < HALF)[None, :]
        k_hi = k_hi * _vec(w_ptr, 0, d * STEP + HI_OFF, d < HALF)[None, :]
    # rebuilt keys are rounded to the cache dtype for the score dot, as a full-cache model
    # would hold them
    sc = mma((k_lo * cs - k_hi * sn).to(u_lo.dtype), u_lo, UPCAST, IEEE)
    sc += mma((k_hi * cs + k_lo * sn).to(u_lo.dtype), u_hi, UPCAST, IEEE)
    return sc, ssq


@triton.jit
def _pass_chunk(hk_t, t_ps, u_ps, bias_ptr, w_ptr, hb, e, ROT: tl.constexpr,
                PASS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, UPCAST: tl.constexpr,
                IEEE: tl.constexpr):
    """Scores of one pass-through chunk (dims past the rotary ones) of one head."""
    k_ps = mma(hk_t, t_ps, UPCAST, IEEE)
    if HAS_BIAS:
        k_ps += _vec(bias_ptr, hb + ROT, e, e < PASS)[None, :]
    ssq = tl.zeros([hk_t.shape[0]], tl.float32)
    if HAS_NORM:
        ssq = tl.sum(k_ps * k_ps, axis=1)
        k_ps = k_ps * _vec(w_ptr, ROT, e, e < PASS)[None, :]
    return mma(k_ps.to(u_ps.dtype), u_ps, UPCAST, IEEE), ssq


@triton.jit
def rebuild_attention_kernel(
    q_ptr, hk_ptr, hv_ptr, hks_ptr, hkz_ptr, hvs_ptr, hvz_ptr, lk_ptr, bias_ptr, cos_ptr, sin_ptr, w_ptr, mask_ptr,
    out_ptr, part_ptr, lse_ptr,
    sq_b, sq_h, sq_s, sq_d,
    shk_b, shk_s, shv_b, shv_s, shks_b, shks_s, shvs_b, shvs_s, K_W, V_W,
    slk_g, slk_r,
    sc_b, sc_s, sc_d, ss_b, ss_s, ss_d,
    sm_b, sm_h, sm_q, sm_k,
    so_b, so_h, so_s,
    G, Hq, Sq, Skv, chunk, NSPLIT, RK, RV, scale, softcap, eps,
    D: tl.constexpr, RK_P: tl.constexpr, RV_P: tl.constexpr,
    GS: tl.constexpr, HPP: tl.constexpr, NREP: tl.constexpr, HPG: tl.constexpr, HPG_P: tl.constexpr,
    M_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    ROPE: tl.constexpr, ROT: tl.constexpr, HALF: tl.constexpr, CH: tl.constexpr, NCH: tl.constexpr,
    STEP: tl.constexpr, HI_OFF: tl.constexpr, PASS: tl.constexpr, PCH: tl.constexpr, NPC: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, HOIST: tl.constexpr, DYN_HEADS: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    DIRECT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    K_BITS: tl.constexpr = 0, K_QG: tl.constexpr = 1, K_QG_P: tl.constexpr = 1, K_NQG: tl.constexpr = 1,
    K_NQG_P: tl.constexpr = 1, V_BITS: tl.constexpr = 0, V_QG: tl.constexpr = 1, V_QG_P: tl.constexpr = 1,
    V_NQG: tl.constexpr = 1, V_NQG_P: tl.constexpr = 1, PREFETCH: tl.constexpr = False,
    K_WORDS: tl.constexpr = False, V_WORDS: tl.constexpr = False,
):
    pid_s = tl.program_id(0)
    pid_x = tl.program_id(1)
    pid_q = tl.program_id(2)
    NQB = tl.num_programs(2)
    SQB: tl.constexpr = M_BLOCK // HPG_P
    NHS: tl.constexpr = GS // HPP  # programs per group, one per subset of its KV heads
    # A program is a "virtual group" of HPP KV heads: rows are the HPG query heads reading
    # them, which row_coords finds by treating the G*NHS head subsets as groups.
    b, gv, h_loc, head, qi, row_ok = row_coords(pid_x, pid_q, G * NHS, Hq, Sq, HPG, HPG_P, M_BLOCK)
    g = gv // NHS
    j0 = (gv % NHS) * HPP  # first KV head (within the group) of this program
    jr = j0 + h_loc // NREP  # KV head of each row, within the group
    q_row = b * sq_b + head * sq_h + qi * sq_s
    m_off = b * sm_b + head * sm_h + qi * sm_q
    lo, hi = kv_range(pid_s, pid_q, chunk, Skv, Sq, IS_CAUSAL, SQB)

    # the group's latents: plain (K_W = RK elements per group) or packed (K_W code bytes,
    # K_NQG scales per group); the same for the values
    hk_base = hk_ptr + b * shk_b + g * K_W
    hv_base = hv_ptr + b * shv_b + g * V_W
    hks_off = b * shks_b + g * K_NQG
    hvs_off = b * shvs_b + g * V_NQG
    dc = tl.arange(0, CH)
    ec = tl.arange(0, PCH)

    if HOIST:  # loop-invariant operands of a single-head program
        if ROPE:
            h_lo, h_hi = _lk_pairs(lk_ptr, g, j0, 0, slk_g, slk_r, RK, D, RK_P, HALF, CH, STEP, HI_OFF)
            hq_lo, hq_hi = _q_pairs(q_ptr, q_row, row_ok, 0, sq_d, HALF, CH, STEP, HI_OFF)
        if NPC > 0:
            h_ps = _lk_pass(lk_ptr, g, j0, 0, slk_g, slk_r, RK, D, RK_P, ROT, PASS, PCH)
            hq_ps = _q_pass(q_ptr, q_row, row_ok, 0, sq_d, ROT, PASS, PCH)

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
        s = tl.zeros([BLOCK_S, M_BLOCK], tl.float32)
        if DYN_HEADS:  # runtime head loop (never HOIST): one head's operands live at a time
            for j in range(j0, j0 + HPP):
                mine = row_ok & (jr == j)
                hb = (g * GS + j) * D
                sj = tl.zeros([BLOCK_S, M_BLOCK], tl.float32)
                ssq = tl.zeros([BLOCK_S], tl.float32)
                if ROPE:
                    for c in tl.static_range(NCH):
                        cs, sn = load_rope_pairs(cos_ptr, sin_ptr, b, kv, kv_ok, sc_b, sc_s, sc_d, ss_b, ss_s,
                                                 ss_d, c * CH, HALF, CH, STEP)
                        t_lo, t_hi = _lk_pairs(lk_ptr, g, j, c * CH, slk_g, slk_r, RK, D, RK_P, HALF, CH, STEP,
                                               HI_OFF)
                        u_lo, u_hi = _q_pairs(q_ptr, q_row, mine, c * CH, sq_d, HALF, CH, STEP, HI_OFF)
                        sc, sq = _rope_chunk(hk_t, t_lo, t_hi, u_lo, u_hi, cs, sn, bias_ptr, w_ptr, hb, c * CH + dc,
                                             HALF, STEP, HI_OFF, HAS_BIAS, HAS_NORM, UPCAST, IEEE)
                        sj += sc
                        ssq += sq
                for c in tl.static_range(NPC):
                    t_ps = _lk_pass(lk_ptr, g, j, c * PCH, slk_g, slk_r, RK, D, RK_P, ROT, PASS, PCH)
                    u_ps = _q_pass(q_ptr, q_row, mine, c * PCH, sq_d, ROT, PASS, PCH)
                    sc, sq = _pass_chunk(hk_t, t_ps, u_ps, bias_ptr, w_ptr, hb, c * PCH + ec, ROT, PASS,
                                         HAS_BIAS, HAS_NORM, UPCAST, IEEE)
                    sj += sc
                    ssq += sq
                if HAS_NORM:
                    sj = sj * tl.rsqrt(ssq / D + eps)[:, None]
                s += sj
        elif HAS_NORM:  # heads outer: a head's scale needs all its chunks
            for jj in tl.static_range(HPP):
                j = j0 + jj
                mine = row_ok & (jr == j)
                hb = (g * GS + j) * D  # this head's offset in the key bias
                sj = tl.zeros([BLOCK_S, M_BLOCK], tl.float32)
                ssq = tl.zeros([BLOCK_S], tl.float32)
                if ROPE:
                    for c in tl.static_range(NCH):
                        cs, sn = load_rope_pairs(cos_ptr, sin_ptr, b, kv, kv_ok, sc_b, sc_s, sc_d, ss_b, ss_s,
                                                 ss_d, c * CH, HALF, CH, STEP)
                        if HOIST:
                            t_lo, t_hi, u_lo, u_hi = h_lo, h_hi, hq_lo, hq_hi
                        else:
                            t_lo, t_hi = _lk_pairs(lk_ptr, g, j, c * CH, slk_g, slk_r, RK, D, RK_P, HALF, CH, STEP,
                                                   HI_OFF)
                            u_lo, u_hi = _q_pairs(q_ptr, q_row, mine, c * CH, sq_d, HALF, CH, STEP, HI_OFF)
                        sc, sq = _rope_chunk(hk_t, t_lo, t_hi, u_lo, u_hi, cs, sn, bias_ptr, w_ptr, hb, c * CH + dc,
                                             HALF, STEP, HI_OFF, HAS_BIAS, HAS_NORM, UPCAST, IEEE)
                        sj += sc
                        ssq += sq
                for c in tl.static_range(NPC):
                    if HOIST:
                        t_ps, u_ps = h_ps, hq_ps
                    else:
                        t_ps = _lk_pass(lk_ptr, g, j, c * PCH, slk_g, slk_r, RK, D, RK_P, ROT, PASS, PCH)
                        u_ps = _q_pass(q_ptr, q_row, mine, c * PCH, sq_d, ROT, PASS, PCH)
                    sc, sq = _pass_chunk(hk_t, t_ps, u_ps, bias_ptr, w_ptr, hb, c * PCH + ec, ROT, PASS,
                                         HAS_BIAS, HAS_NORM, UPCAST, IEEE)
                    sj += sc
                    ssq += sq
                s += sj * tl.rsqrt(ssq / D + eps)[:, None]
        else:  # chunks outer: each cos/sin chunk is loaded once per tile
            if ROPE:
                for c in tl.static_range(NCH):
                    cs, sn = load_rope_pairs(cos_ptr, sin_ptr, b, kv, kv_ok, sc_b, sc_s, sc_d, ss_b, ss_s, ss_d,
                                             c * CH, HALF, CH, STEP)
                    for jj in tl.static_range(HPP):
                        j = j0 + jj
                        if HOIST:
                            t_lo, t_hi, u_lo, u_hi = h_lo, h_hi, hq_lo, hq_hi
                        else:
                            t_lo, t_hi = _lk_pairs(lk_ptr, g, j, c * CH, slk_g, slk_r, RK, D, RK_P, HALF, CH, STEP,
                                                   HI_OFF)
                            u_lo, u_hi = _q_pairs(q_ptr, q_row, row_ok & (jr == j), c * CH, sq_d, HALF, CH, STEP,
                                                  HI_OFF)
                        sc, sq = _rope_chunk(hk_t, t_lo, t_hi, u_lo, u_hi, cs, sn, bias_ptr, w_ptr,
                                             (g * GS + j) * D, c * CH + dc, HALF, STEP, HI_OFF, HAS_BIAS,
                                             HAS_NORM, UPCAST, IEEE)
                        s += sc
            for c in tl.static_range(NPC):
                for jj in tl.static_range(HPP):
                    j = j0 + jj
                    if HOIST:
                        t_ps, u_ps = h_ps, hq_ps
                    else:
                        t_ps = _lk_pass(lk_ptr, g, j, c * PCH, slk_g, slk_r, RK, D, RK_P, ROT, PASS, PCH)
                        u_ps = _q_pass(q_ptr, q_row, row_ok & (jr == j), c * PCH, sq_d, ROT, PASS, PCH)
                    sc, sq = _pass_chunk(hk_t, t_ps, u_ps, bias_ptr, w_ptr, (g * GS + j) * D, c * PCH + ec,
                                         ROT, PASS, HAS_BIAS, HAS_NORM, UPCAST, IEEE)
                    s += sc
        s2 = scores_to_log2(s, kv, kv_ok, qi, row_ok, m_off, b * sm_b, mask_ptr, sm_k, scale, softcap,
                            MASK_KIND, IS_CAUSAL, USE_SOFTCAP, mrow, PREFETCH)
        v_t = load_latent(hv_base, hvs_ptr + hvs_off, hvz_ptr + hvs_off, kv, kv_ok, shv_s, shvs_s, RV, RV_P,
                          V_BITS, V_QG, V_QG_P, V_NQG, V_NQG_P, q_ptr.dtype.element_ty, sv, zv, PREFETCH,
                          V_WORDS)
        m_i, l_i, acc = softmax_step(s2, m_i, l_i, acc, v_t, UPCAST, IEEE)

    finish_rows(acc, m_i, l_i, out_ptr, part_ptr, lse_ptr, b, head, qi, row_ok, so_b, so_h, so_s,
                pid_x, pid_q, pid_s, NQB, NSPLIT, RV, RV_P, M_BLOCK, DIRECT)
