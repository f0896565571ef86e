"""Decode kernel for calls where every query head has its own latent group.

That is one query token with M-LRD and no GQA sharing (multi-head attention at group size 1): the
group kernels (``decode.py``, ``absorbed.py``) would then fill one of the 16 rows of their
score tiles, and rebuild keys that no other query row reuses. Here a program takes
``HPP`` consecutive heads of one sequence (their latents are adjacent groups), one
score column each, so the online softmax, the masks and each cos/sin tile are shared by
``HPP`` heads; each head's latents are dequantized in registers as in the group kernels.
On a GPU, RoPE calls that ``gluon_rope.applies`` to take the Gluon kernel of ``gluon_rope.py``
instead (the same scores, with explicit layouts: 0.50 ms against 0.65-0.69 at B=8 x 32k).

Scores per head and token tile:

* absorbed (no RoPE): ``h_t . q'`` as a tensor-core product with the head's query in its
  own column of a ``[r, 16]`` tile;
* RoPE: the rotation moves to the query side. For a rotary pair ``i`` (partners ``lo``/``hi``)
  the score of a rebuilt, rotated key ``k = L h_t`` is

      q . rope_t(k) = sum_i cos_ti (q_lo,i k_lo,i + q_hi,i k_hi,i) + sin_ti (q_hi,i k_lo,i - q_lo,i k_hi,i)

  Both brackets are linear in ``h_t``: rows of two ``[half, r]`` matrices that each program
  builds in its prologue from the query and ``L_k`` (fp32, then rounded to the operand dtype)::

      Wa_i = q_lo,i L_lo,i + q_hi,i L_hi,i        Wb_i = q_hi,i L_lo,i - q_lo,i L_hi,i
      score_t = sum_i cos_ti (h_t Wa^T)_i + sin_ti (h_t Wb^T)_i  (+ h_t . w_pass past the rotary dims)

  One tensor-core product ``[BLOCK_S, r] x [r, 2 half]`` with ``Wa`` and ``Wb`` side by side
  (the FLOPs of rebuilding the key halves), then two multiply-adds and a row sum per pair:
  no rotated key tile, no rounding of keys to fp16, no score product. Without bias or
  k-norm (the wrapper checks).

With one or two heads per program the per-head operands (``Wa``/``Wb`` or the query
column) are hoisted out of the token loop. RoPE programs take at most two heads; absorbed
programs of more heads re-read their query columns per tile with an L1-friendly eviction
hint.

Merged heads (``MERGE_V``/``MERGE_K``, where the ranks are powers of two so the heads'
latents are one unpadded row segment): the values of all the program's heads are read as one
``[BLOCK_S, HPP r]`` tile and take one product with the weights of every column; head ``j``'s
output is the ``j``-th diagonal block of the result. Absorbed scores likewise come from one
product with a block-diagonal query. Each per-head product cost a layout round trip through
shared memory, a barrier and a wait; the merged product costs them once per tile (and the
cross terms, in the tensor cores' otherwise idle columns).
"""
from __future__ import annotations

import triton
import triton.language as tl

from palu_fx.kernels.latent_attention.common import (
    finish_rows, kv_range, load_latent, load_rope_pairs, mma, row_coords, scores_to_log2, softmax_init,
    softmax_weights, tile_vectors,
)

# Wa and Wb [RK_P, HALF_P] of a head (one [RK_P, 2 HALF_P] operand) stay within this many
# elements each (a hoisted operand lives in shared memory for the whole loop)
MAX_W_TILE = 128 * 64


@triton.jit
def _rotated_query(q_ptr, q_off, sq_d, lk_ptr, lk_off, slk_d, slk_r, RK, HALF, RK_P: tl.constexpr,
                   HALF_P: tl.constexpr, STEP: tl.constexpr, HI_OFF: tl.constexpr, DTYPE: tl.constexpr):
    """``[Wa^T | Wb^T]`` [RK_P, 2 HALF_P] of one head (``Wa^T`` in the first HALF_P columns),
    built from its query and ``L_k`` in fp32 and rounded to ``DTYPE`` (zeros padded)."""
    r = tl.arange(0, RK_P)[:, None]
    i = tl.arange(0, HALF_P)[None, :]
    ok = (r < RK) & (i < HALF)
    d_lo = i * STEP
    l_lo = tl.load(lk_ptr + lk_off + d_lo * slk_d + r * slk_r, mask=ok, other=0.0).to(tl.float32)
    l_hi = tl.load(lk_ptr + lk_off + (d_lo + HI_OFF) * slk_d + r * slk_r, mask=ok, other=0.0).to(tl.float32)
    q_lo = tl.load(q_ptr + q_off + d_lo * sq_d, mask=i < HALF, other=0.0).to(tl.float32)
    q_hi = tl.load(q_ptr + q_off + (d_lo + HI_OFF) * sq_d, mask=i < HALF, other=0.0).to(tl.float32)
    wa = q_lo * l_lo + q_hi * l_hi
    wb = q_hi * l_lo - q_lo * l_hi
    return tl.reshape(tl.permute(tl.join(wa, wb), (0, 2, 1)), [RK_P, 2 * HALF_P]).to(DTYPE)


@triton.jit
def _pass_weights(q_ptr, q_off, sq_d, lk_ptr, lk_off, slk_d, slk_r, RK, RK_P: tl.constexpr, ROT: tl.constexpr,
                  PASS: tl.constexpr, PASS_P: tl.constexpr, HAS_PASS: tl.constexpr):
    """Pass-through weights ``sum_e q_e L_k[e, :]`` over the dims past the rotary ones, [RK_P]
    fp32 (zeros without pass-through dims)."""
    w = tl.zeros([RK_P], tl.float32)
    if HAS_PASS:
        r = tl.arange(0, RK_P)[:, None]
        e = tl.arange(0, PASS_P)[None, :]
        lp = tl.load(lk_ptr + lk_off + (ROT + e) * slk_d + r * slk_r, mask=(r < RK) & (e < PASS), other=0.0)
        qp = tl.load(q_ptr + q_off + (ROT + e) * sq_d, mask=e < PASS, other=0.0)
        w = tl.sum(lp.to(tl.float32) * qp.to(tl.float32), axis=1)
    return w


@triton.jit
def _query_column(q_ptr, off, sq_d, RK, COL: tl.constexpr, RK_P: tl.constexpr, M_BLOCK: tl.constexpr,
                  EVICT: tl.constexpr):
    """An absorbed query ``q'`` [RK] as column ``COL`` of a zero [RK_P, M_BLOCK] tile."""
    r = tl.arange(0, RK_P)[:, None]
    c = tl.arange(0, M_BLOCK)[None, :]
    return tl.load(q_ptr + off + r * sq_d + c * 0, mask=(r < RK) & (c == COL), other=0.0, eviction_policy=EVICT)


@triton.jit
def _head_operands(q_ptr, lk_ptr, q_off, lk_off, sq_d, slk_d, slk_r, RK, HALF, COL: tl.constexpr,
                   RK_P: tl.constexpr, HALF_P: tl.constexpr, M_BLOCK: tl.constexpr, ROPE: tl.constexpr,
                   STEP: tl.constexpr, HI_OFF: tl.constexpr, ROT: tl.constexpr, PASS: tl.constexpr,
                   PASS_P: tl.constexpr, HAS_PASS: tl.constexpr, DTYPE: tl.constexpr, EVICT: tl.constexpr):
    """Per-head score operands: (``[Wa^T | Wb^T]`` [RK_P, 2 HALF_P], pass weights) with RoPE,
    else (query column tile, -). Side by side, both halves come out of one tensor-core
    product (one N=2*HALF_P instruction chain and one wait per tile instead of two) and split
    apart in registers: the high column bit of the accumulator is a register bit, and what
    remains is the layout of a HALF_P-wide product."""
    if ROPE:
        w = _rotated_query(q_ptr, q_off, sq_d, lk_ptr, lk_off, slk_d, slk_r, RK, HALF, RK_P, HALF_P, STEP, HI_OFF,
                           DTYPE)
    else:
        w = _query_column(q_ptr, q_off, sq_d, RK, COL, RK_P, M_BLOCK, EVICT)
    return w, _pass_weights(q_ptr, q_off, sq_d, lk_ptr, lk_off, slk_d, slk_r, RK, RK_P, ROT, PASS, PASS_P,
                             HAS_PASS)


@triton.jit
def _block_query(q_ptr, off, sq_h, sq_d, RK, RK_P: tl.constexpr, HPP: tl.constexpr, M_BLOCK: tl.constexpr):
    """The absorbed queries of ``HPP`` heads as one block-diagonal [HPP RK_P, M_BLOCK] tile: head
    ``j``'s query in rows ``j RK_P ..`` of column ``j`` (``MERGE_K``)."""
    r = tl.arange(0, HPP * RK_P)[:, None]
    c = tl.arange(0, M_BLOCK)[None, :]
    head = r // RK_P
    return tl.load(q_ptr + off + head * sq_h + (r % RK_P) * sq_d, mask=(head == c) & (r % RK_P < RK), other=0.0)


@triton.jit
def _diagonal_blocks(acc, HPP: tl.constexpr, RV_P: tl.constexpr, M_BLOCK: tl.constexpr):
    """[HPP RV_P, M_BLOCK] products of every head's values with every column's weights ->
    [RV_P, M_BLOCK] whose column ``j`` is head ``j``'s block (``MERGE_V``; the cross terms go)."""
    a = tl.reshape(acc, [HPP, RV_P, M_BLOCK])
    blk = tl.arange(0, HPP)[:, None, None]
    col = tl.arange(0, M_BLOCK)[None, None, :]
    return tl.sum(tl.where(blk == col, a, 0.0), axis=0)


@triton.jit
def _column(t, hh, jj: tl.constexpr):
    """Column ``jj`` of a [BLOCK_S, HPP] tile as [BLOCK_S, 1] (a select and an in-thread sum: exact)."""
    return tl.sum(tl.where(hh[None, :] == jj, t, 0.0), axis=1).to(t.dtype)[:, None]


@triton.jit
def per_head_attention_kernel(
    q_ptr, lk_ptr, hk_ptr, hv_ptr, hks_ptr, hkz_ptr, hvs_ptr, hvz_ptr, cos_ptr, sin_ptr, mask_ptr,
    out_ptr, part_ptr, lse_ptr,
    sq_b, sq_h, sq_d, slk_g, slk_d, slk_r,
    shk_b, shk_s, shv_b, shv_s, shks_b, shks_s, shvs_b, shvs_s, K_W, V_W,
    sc_b, sc_s, sc_d, ss_b, ss_s, ss_d,
    sm_b, sm_h, sm_q, sm_k,
    so_b, so_h, so_s,
    G, Hq, Sq, Skv, chunk, NSPLIT, RK, RV, scale, softcap,
    RK_P: tl.constexpr, RV_P: tl.constexpr, HPG: tl.constexpr, HPG_P: tl.constexpr, M_BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, STEP: tl.constexpr,
    HI_OFF: tl.constexpr, ROT: tl.constexpr, PASS: tl.constexpr, PASS_P: tl.constexpr, HAS_PASS: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    DIRECT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    K_BITS: tl.constexpr, K_QG: tl.constexpr, K_QG_P: tl.constexpr, K_NQG: tl.constexpr, K_NQG_P: tl.constexpr,
    V_BITS: tl.constexpr, V_QG: tl.constexpr, V_QG_P: tl.constexpr, V_NQG: tl.constexpr, V_NQG_P: tl.constexpr,
    PREFETCH: tl.constexpr = False, K_WORDS: tl.constexpr = False, V_WORDS: tl.constexpr = False,
    MERGE_K: tl.constexpr = False, MERGE_V: tl.constexpr = False,
):
    pid_s = tl.program_id(0)
    pid_x = tl.program_id(1)
    HPP: tl.constexpr = HPG  # heads per program (a power of two: HPG_P == HPG)
    # rows: the HPP heads of this program (one query token); head h reads latent group h
    b, blk, h_loc, head, qi, row_ok = row_coords(pid_x, 0, Hq // HPP, Hq, 1, HPP, HPG_P, M_BLOCK)
    m_off = b * sm_b + head * sm_h + qi * sm_q
    lo, hi = kv_range(pid_s, 0, chunk, Skv, 1, IS_CAUSAL, 1)
    cols = tl.arange(0, M_BLOCK)
    dtype = q_ptr.dtype.element_ty
    h0 = blk * HPP

    # RoPE pair terms in fp32 for fp32 operands (and bf16 under the interpreter, whose bf16
    # arithmetic is wrong); otherwise in the operand dtype, summed by a dot
    F32_PAIRS: tl.constexpr = IEEE | UPCAST
    # loop-invariant operands of one or two heads stay resident (RoPE programs have at most
    # two heads, per_head_applies); absorbed programs of more heads re-read their query columns
    HOIST: tl.constexpr = HPP <= 2 and not MERGE_K
    if MERGE_K:
        q_bd = _block_query(q_ptr, b * sq_b + h0 * sq_h, sq_h, sq_d, RK, RK_P, HPP, M_BLOCK)
    if HOIST:
        w0, wps0 = _head_operands(q_ptr, lk_ptr, b * sq_b + h0 * sq_h, h0 * slk_g, sq_d, slk_d, slk_r, RK, HALF, 0,
                                  RK_P, HALF_P, M_BLOCK, ROPE, STEP, HI_OFF, ROT, PASS, PASS_P, HAS_PASS, dtype, "")
        if HPP == 2:
            w1, wps1 = _head_operands(q_ptr, lk_ptr, b * sq_b + (h0 + 1) * sq_h, (h0 + 1) * slk_g, sq_d, slk_d,
                                      slk_r, RK, HALF, 1, RK_P, HALF_P, M_BLOCK, ROPE, STEP, HI_OFF, ROT, PASS,
                                      PASS_P, HAS_PASS, dtype, "")

    # PREFETCH: the shared mask row and the per-token scales/zeros of the program's heads
    # ([BLOCK_S, HPP] tiles, one column per head), a tile ahead (common.tile_vectors)
    hh = tl.arange(0, HPP)
    ks, kz = hks_ptr + b * shks_b + h0 * K_NQG, hkz_ptr + b * shks_b + h0 * K_NQG
    vs, vz = hvs_ptr + b * shvs_b + h0 * V_NQG, hvz_ptr + b * shvs_b + h0 * V_NQG
    mrow_n, sk_n, zk_n, sv_n, zv_n = tile_vectors(mask_ptr, b * sm_b, sm_k, ks, kz, vs, vz, shks_s, shvs_s,
                                                  hh * K_NQG, hh * V_NQG, lo + tl.arange(0, BLOCK_S), hi, PREFETCH,
                                                  MASK_KIND, K_BITS, K_NQG_P, V_BITS, V_NQG_P)
    m_i, l_i, acc = softmax_init(M_BLOCK, RV_P, BLOCK_S)
    if MERGE_V:
        acc = tl.zeros([HPP * RV_P, M_BLOCK], tl.float32)
    for start in range(lo, hi, BLOCK_S):
        kv = start + tl.arange(0, BLOCK_S)
        kv_ok = kv < hi
        mrow, sk_all, zk_all, sv_all, zv_all = mrow_n, sk_n, zk_n, sv_n, zv_n
        mrow_n, sk_n, zk_n, sv_n, zv_n = tile_vectors(mask_ptr, b * sm_b, sm_k, ks, kz, vs, vz, shks_s, shvs_s,
                                                      hh * K_NQG, hh * V_NQG, kv + BLOCK_S, hi, PREFETCH,
                                                      MASK_KIND, K_BITS, K_NQG_P, V_BITS, V_NQG_P)
        if ROPE:
            if F32_PAIRS:
                cs, sn = load_rope_pairs(cos_ptr, sin_ptr, b, kv, kv_ok, sc_b, sc_s, sc_d, ss_b, ss_s, ss_d, 0,
                                         HALF, HALF_P, STEP)
            else:
                cs, sn = load_rope_pairs(cos_ptr, sin_ptr, b, kv, kv_ok, sc_b, sc_s, sc_d, ss_b, ss_s, ss_d, 0,
                                         HALF, HALF_P, STEP, dtype)
        s = tl.zeros([BLOCK_S, M_BLOCK], tl.float32)
        if MERGE_K:  # every head's scores from one product: its latents times its query column
            hk_all = load_latent(hk_ptr + b * shk_b + h0 * K_W, ks, kz, kv, kv_ok, shk_s, shks_s, HPP * RK, HPP * RK_P,
                                 K_BITS, K_QG, K_QG_P, HPP * K_NQG, HPP * K_NQG_P, dtype, sk_all, zk_all, PREFETCH,
                                 K_WORDS, HPP)
            s = mma(hk_all, q_bd, UPCAST, IEEE)
        else:
            for jj in tl.static_range(HPP):
                h = h0 + jj
                hk_t = load_latent(hk_ptr + b * shk_b + h * K_W, hks_ptr + b * shks_b + h * K_NQG,
                                   hkz_ptr + b * shks_b + h * K_NQG, kv, kv_ok, shk_s, shks_s, RK, RK_P,
                                   K_BITS, K_QG, K_QG_P, K_NQG, K_NQG_P, dtype,
                                   _column(sk_all, hh, jj), _column(zk_all, hh, jj), PREFETCH, K_WORDS)
                if HOIST:
                    if jj == 0:
                        w, wps = w0, wps0
                    else:
                        w, wps = w1, wps1
                else:
                    w, wps = _head_operands(q_ptr, lk_ptr, b * sq_b + h * sq_h, h * slk_g, sq_d, slk_d, slk_r, RK, HALF,
                                            jj, RK_P, HALF_P, M_BLOCK, ROPE, STEP, HI_OFF, ROT, PASS, PASS_P, HAS_PASS,
                                            dtype, "evict_last")
                if ROPE:  # (h_t Wa^T, h_t Wb^T) from one product with the side-by-side operand
                    ab = tl.reshape(mma(hk_t, w, UPCAST, IEEE), [BLOCK_S, 2, HALF_P])
                    ka, kb = tl.split(tl.permute(ab, (0, 2, 1)))
                    if F32_PAIRS:
                        sc = tl.sum(ka * cs + kb * sn, axis=1)
                        s += tl.where(cols[None, :] == jj, sc[:, None], 0.0)
                    else:
                        # the pair terms rounded to the operand dtype (the rounding the group kernel
                        # applies to rotated keys), their row sums by a dot with a one-hot column:
                        # packed half-precision math and a tensor-core reduction instead of fp32
                        # conversions, products and shuffles
                        t = ka.to(dtype) * cs + kb.to(dtype) * sn
                        s += mma(t, tl.where(cols[None, :] == jj, 1.0, 0.0).to(dtype) + tl.zeros([HALF_P, 1], dtype),
                                 UPCAST, IEEE)
                    if HAS_PASS:
                        sc = tl.sum(hk_t.to(tl.float32) * wps[None, :], axis=1)
                        s += tl.where(cols[None, :] == jj, sc[:, None], 0.0)
                else:  # the head's query sits in column jj: the product fills that column only
                    s += mma(hk_t, w, UPCAST, IEEE)
        s2 = scores_to_log2(s, kv, kv_ok, qi, row_ok, m_off, b * sm_b, mask_ptr, sm_k, scale, softcap,
                            MASK_KIND, IS_CAUSAL, USE_SOFTCAP, mrow, PREFETCH)
        p, alpha, m_i, l_i = softmax_weights(s2, m_i, l_i)
        acc = acc * alpha[None, :]
        if MERGE_V:  # every head's values times every column's weights; finish keeps the diagonal
            v_all = load_latent(hv_ptr + b * shv_b + h0 * V_W, vs, vz, kv, kv_ok, shv_s, shvs_s, HPP * RV, HPP * RV_P,
                                V_BITS, V_QG, V_QG_P, HPP * V_NQG, HPP * V_NQG_P, dtype, sv_all, zv_all, PREFETCH,
                                V_WORDS, HPP)
            acc += mma(tl.trans(v_all), p.to(dtype), UPCAST, IEEE)
        else:
            for jj in tl.static_range(HPP):  # each head's weights meet its own latent values
                h = h0 + jj
                v_t = load_latent(hv_ptr + b * shv_b + h * V_W, hvs_ptr + b * shvs_b + h * V_NQG,
                                  hvz_ptr + b * shvs_b + h * V_NQG, kv, kv_ok, shv_s, shvs_s, RV, RV_P,
                                  V_BITS, V_QG, V_QG_P, V_NQG, V_NQG_P, dtype,
                                  _column(sv_all, hh, jj), _column(zv_all, hh, jj), PREFETCH, V_WORDS)
                pj = tl.where(cols[None, :] == jj, p, 0.0)
                acc += mma(tl.trans(v_t), pj.to(dtype), UPCAST, IEEE)

    if MERGE_V:
        acc = _diagonal_blocks(acc, HPP, RV_P, M_BLOCK)
    finish_rows(acc, m_i, l_i, out_ptr, part_ptr, lse_ptr, b, head, qi, row_ok, so_b, so_h, so_s,
                pid_x, 0, pid_s, 1, NSPLIT, RV, RV_P, M_BLOCK, DIRECT)


def per_head_applies(q, lk, k_bias, k_norm_weight, rope_style, groups, heads_per_program) -> bool:
    """Whether ``per_head_attention_kernel`` serves a call (see the module docstring)."""
    B, Hq, Sq, D = q.shape
    hpp = heads_per_program
    if hpp < 1 or hpp & (hpp - 1) or Hq % hpp or Sq != 1 or groups != Hq:
        return False
    if lk is None:  # absorbed
        return True
    if hpp > 2 or rope_style == 0 or k_bias is not None or k_norm_weight is not None or lk.shape[1] != D:
        return False
    half_p = max(16, 1 << max(0, (D // 2 - 1)).bit_length())
    rk_p = max(16, 1 << max(0, lk.shape[-1] - 1).bit_length())
    return half_p * rk_p <= MAX_W_TILE


def per_head_launch(grid, q, lk, p, latent_ptrs, latent_strides, mask, mstr, out, part, lse, runtime, consts,
                    dtype, probe=False):
    """Launch the kernel with the wrapper's shared arguments (``consts`` as for the group kernels);
    ``lk``/``p`` None in absorbed mode, where ``q`` is the absorbed query. With RoPE each
    program builds its heads' ``Wa``/``Wb`` from ``q`` and ``lk`` in its prologue: done on the
    host, that was a dozen small kernels per call, about 60 us per layer inside a model.
    ``probe``: return (kernel, grid, args, constexprs) instead of launching."""
    from palu_fx.kernels.latent_attention.wrapper import _launch

    qs = (q.stride(0), q.stride(1), q.stride(3))
    if lk is not None:
        ops, ostr = (q, lk), (*qs, lk.stride(0), lk.stride(1), lk.stride(2))
        rope = dict(ROPE=True, HALF=p["HALF"], HALF_P=p["HALF_P"], STEP=p["STEP"], HI_OFF=p["HI_OFF"], ROT=p["ROT"],
                    PASS=p["PASS"], PASS_P=p["PASS_P"], HAS_PASS=p["HAS_PASS"])
        tables = (p["cos"], p["sin"], *p["cos_strides"], *p["sin_strides"])
    else:  # the query itself: [B, Hq, 1, RK]
        ops, ostr = (q, q), (*qs, 0, 0, 0)
        rope = dict(ROPE=False, HALF=1, HALF_P=16, STEP=1, HI_OFF=0, ROT=0, PASS=0, PASS_P=16, HAS_PASS=False)
        tables = (q, q, 0, 0, 0, 0, 0, 0)
    args = (*ops, *latent_ptrs, *tables[:2], mask, out, part, lse, *ostr,
            *latent_strides, *tables[2:], *mstr, out.stride(0), out.stride(1), out.stride(2), *runtime)
    if probe:
        return per_head_attention_kernel, grid, args, dict(consts, **rope)
    _launch(per_head_attention_kernel, grid, args, dict(consts, **rope))
