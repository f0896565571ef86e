"""Triton pieces shared by the latent-attention kernels.

Layout conventions (all kernels):

* A program owns one ``(batch, group)`` pair, one query block and one split of the cached
  sequence. Its ``M_BLOCK`` "rows" are (query position, query head of the group) pairs,
  position-major: row ``r`` is head ``r % HPG_P`` of the group at query position
  ``q_block * (M_BLOCK // HPG_P) + r // HPG_P``. Padding rows (head >= HPG or position >= Sq)
  compute harmless finite values and are never stored.
* Scores are kept transposed, ``[BLOCK_S, M_BLOCK]`` (tokens x rows): the rebuilt key tile,
  the large operand, then enters the score ``tl.dot`` as the A operand straight from
  registers, and only the small query tile needs shared memory.
* Softmax runs in base 2 (``exp2``) with ``LOG2E`` folded into the score scale. A row whose
  every score is ``-inf`` (fully masked) yields zeros, like ``F.scaled_dot_product_attention``.
* With ``NSPLIT > 1`` each program writes a normalised partial output and its base-2 LSE;
  ``combine_splits_kernel`` merges them. With one split the kernel stores the final rows.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)

# mask kinds (constexpr MASK_KIND); the *_SHARED kinds: every row of a program reads the
# same mask row (a [B, 1, 1, S] padding mask at one query token, the usual decode case), so
# a tile loads one [BLOCK_S] vector instead of a [BLOCK_S, M_BLOCK] tile: the per-row load
# cost about as much as the score math of a whole tile
MASK_NONE, MASK_BOOL, MASK_ADD, MASK_BOOL_SHARED, MASK_ADD_SHARED = 0, 1, 2, 3, 4


@triton.jit
def mma(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``tl.dot`` with an fp32 accumulator.

    UPCAST: the interpreter's bf16 dot is wrong, so the wrapper asks for fp32 operands there.
    IEEE: fp32 inputs keep full precision (the default fp32 dot is tf32 on the GPU).
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def row_coords(pid_bg, pid_q, G, Hq, Sq, HPG: tl.constexpr, HPG_P: tl.constexpr, M_BLOCK: tl.constexpr):
    """(batch, group, query head [M], query position [M], row valid [M]) of a program."""
    # int64: batch offsets of a long cache pass 2**31 elements (B=32 x 128k tokens x 2048)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    rows = tl.arange(0, M_BLOCK)
    h_loc = rows % HPG_P
    qi = pid_q * (M_BLOCK // HPG_P) + rows // HPG_P
    row_ok = (h_loc < HPG) & (qi < Sq)
    head = g * HPG + h_loc
    return b, g, h_loc, head, qi, row_ok


@triton.jit
def kv_range(pid_s, pid_q, chunk, Skv, Sq, IS_CAUSAL: tl.constexpr, SQB: tl.constexpr):
    """Token range [lo, hi) of this split; causal (top-left aligned) stops past the last query."""
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, Skv)
    if IS_CAUSAL:
        last_q = tl.minimum(pid_q * SQB + SQB, Sq) - 1
        hi = tl.minimum(hi, last_q + 1)
    return lo, hi


@triton.jit
def tanh_f32(x):
    # 1 - 2 / (e^{2x} + 1): saturates cleanly to +-1 (exp overflow gives inf -> 1)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


# ---------------------------------------------------------------- small loads, a tile ahead
# Triton's software pipeliner prefetches only the loads that feed a ``tl.dot`` (through
# shared memory). The other loads of a token tile sit on its critical path: the shared
# decode-mask row and a packed cache's per-token scales and zeros are small vectors, but
# each costs an L2 round trip per tile. With ``PREFETCH`` the kernels load them one tile
# ahead (loop-carried registers). Prefetching the cos/sin tiles the same way was measured
# and rejected: it changed the pipeliner's schedule of the latent loads and cost more than
# it saved (RESULTS.md, issue 3).


@triton.jit
def load_mask_row(mask_ptr, m_base, kv, kv_ok, sm_k, MASK_KIND: tl.constexpr):
    """The one mask row [BLOCK_S] every row of a program reads (``MASK_*_SHARED``) as fp32:
    keep flags (1/0) or additive terms; zeros for the other kinds."""
    m = tl.zeros([kv.shape[0]], tl.float32)
    if MASK_KIND == 3:
        m = (tl.load(mask_ptr + m_base + kv * sm_k, mask=kv_ok, other=0) != 0).to(tl.float32)
    if MASK_KIND == 4:
        m = tl.load(mask_ptr + m_base + kv * sm_k, mask=kv_ok, other=0.0).to(tl.float32)
    return m


@triton.jit
def load_scale_zero(sc_ptr, zr_ptr, kv, kv_ok, sc_stride, cols, ON: tl.constexpr):
    """Per-token scales and zeros [BLOCK_S, C] (storage dtype) at column offsets ``cols`` [C]:
    the Palu groups (each quantized as one group) a program reads; zeros when not ``ON``
    (nothing is read)."""
    s = tl.zeros([kv.shape[0], cols.shape[0]], sc_ptr.dtype.element_ty)
    z = tl.zeros([kv.shape[0], cols.shape[0]], sc_ptr.dtype.element_ty)
    if ON:
        off = cols[None, :] + kv[:, None] * sc_stride
        s = tl.load(sc_ptr + off, mask=kv_ok[:, None], other=0.0)
        z = tl.load(zr_ptr + off, mask=kv_ok[:, None], other=0.0)
    return s, z


@triton.jit
def tile_vectors(mask_ptr, m_base, sm_k, ks_ptr, kz_ptr, vs_ptr, vz_ptr, ks_stride, vs_stride, k_cols, v_cols, kv,
                 hi, PREFETCH: tl.constexpr, MASK_KIND: tl.constexpr, K_BITS: tl.constexpr, K_NQG_P: tl.constexpr,
                 V_BITS: tl.constexpr, V_NQG_P: tl.constexpr):
    """The small vectors of tokens ``kv`` that the kernels load a tile ahead (with
    ``PREFETCH``): the shared mask row [BLOCK_S] and, for caches packed as one quantization
    group per Palu group, the key and value scales and zeros [BLOCK_S, C] of the groups at
    ``k_cols``/``v_cols`` (one for the group kernels, a program's heads for ``per_head.py``);
    zeros for what is not loaded. The same conditions decide where ``scores_to_log2`` and
    ``load_latent`` use them. Returns (mask row, sk, zk, sv, zv)."""
    ok = kv < hi
    m = load_mask_row(mask_ptr, m_base, kv, ok, sm_k, MASK_KIND if PREFETCH else 0)
    sk, zk = load_scale_zero(ks_ptr, kz_ptr, kv, ok, ks_stride, k_cols, PREFETCH and K_BITS > 0 and K_NQG_P == 1)
    sv, zv = load_scale_zero(vs_ptr, vz_ptr, kv, ok, vs_stride, v_cols, PREFETCH and V_BITS > 0 and V_NQG_P == 1)
    return m, sk, zk, sv, zv


@triton.jit
def scores_to_log2(
    s, kv, kv_ok, qi, row_ok, m_off, m_base, mask_ptr, sm_k, scale, softcap,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    mrow, PREFETCH: tl.constexpr,
):
    """Raw dot products ``s`` [BLOCK_S, M] -> base-2 logits with scale, softcap and masks.

    ``m_off`` [M] is each row's offset into the (broadcast-strided) mask; padding rows
    (``row_ok`` False) must not read it: their offsets can point past the tensor.
    ``m_base``: the offset of the one mask row every row reads (shared mask kinds); with
    ``PREFETCH`` that row is ``mrow``, already loaded (``load_mask_row``).
    """
    if USE_SOFTCAP:
        s = softcap * tanh_f32(s * (scale / softcap))
        s = s * LOG2E
    else:
        s = s * (scale * LOG2E)
    keep = kv_ok[:, None]
    if IS_CAUSAL:
        keep = keep & (kv[:, None] <= qi[None, :])
    if MASK_KIND == 1:
        mv = tl.load(mask_ptr + m_off[None, :] + kv[:, None] * sm_k, mask=kv_ok[:, None] & row_ok[None, :],
                     other=0)
        keep = keep & (mv != 0)
    if MASK_KIND == 2:
        mv = tl.load(mask_ptr + m_off[None, :] + kv[:, None] * sm_k, mask=kv_ok[:, None] & row_ok[None, :],
                     other=0.0)
        s = s + mv.to(tl.float32) * LOG2E
    if MASK_KIND >= 3:
        if PREFETCH:
            mv = mrow
        else:
            mv = load_mask_row(mask_ptr, m_base, kv, kv_ok, sm_k, MASK_KIND)
        if MASK_KIND == 3:
            keep = keep & (mv != 0.0)[:, None]
        else:
            s = s + (mv * LOG2E)[:, None]
    return tl.where(keep, s, float("-inf"))


@triton.jit
def softmax_init(M_BLOCK: tl.constexpr, RV_P: tl.constexpr, BLOCK_S: tl.constexpr):
    """Empty online-softmax state: running max [M], running sums per token slot [BLOCK_S, M]
    (``softmax_weights`` says why), transposed output [RV_P, M]."""
    return (tl.full([M_BLOCK], float("-inf"), tl.float32), tl.zeros([BLOCK_S, M_BLOCK], tl.float32),
            tl.zeros([RV_P, M_BLOCK], tl.float32))


@triton.jit
def softmax_weights(s2, m_i, l_i):
    """Online-softmax bookkeeping of a token tile: (weights p [BLOCK_S, M], rescale alpha [M], m, l).

    The running sum stays one partial per token slot, ``l_i`` [BLOCK_S, M], summed once in
    ``finish_rows``: the token axis of a score tile spans the warps of the tensor-core layout,
    so a sum over it per tile is a cross-warp reduction (three barriers on sm_90) in the
    chain of every tile; the max still needs one, as the weights of a tile share it."""
    m_new = tl.maximum(m_i, tl.max(s2, axis=0))
    # a row with no finite logit yet keeps a finite reference so exp2 gives 0, not NaN
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s2 - m_use[None, :])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha[None, :] + p
    return p, alpha, m_new, l_i


@triton.jit
def softmax_step(s2, m_i, l_i, acc, v_t, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step over a token tile.

    s2 [BLOCK_S, M] base-2 logits, acc [RV_P, M] (transposed output), v_t [BLOCK_S, RV_P].
    """
    p, alpha, m_new, l_i = softmax_weights(s2, m_i, l_i)
    acc = acc * alpha[None, :] + mma(tl.trans(v_t), p.to(v_t.dtype), UPCAST, IEEE)
    return m_new, l_i, acc


@triton.jit
def finish_rows(
    acc, m_i, l_i, out_ptr, part_ptr, lse_ptr, b, head, qi, row_ok,
    so_b, so_h, so_s, pid_bg, pid_q, pid_s, NQB, NSPLIT,
    RV: tl.constexpr, RV_P: tl.constexpr, M_BLOCK: tl.constexpr, DIRECT: tl.constexpr,
):
    """Normalise and store: final rows (one split) or a partial + LSE (several splits);
    ``l_i`` holds the running sums per token slot (``softmax_weights``)."""
    l_i = tl.sum(l_i, axis=0)
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[None, :]
    c = tl.arange(0, RV_P)
    if DIRECT:
        ptrs = out_ptr + b * so_b + head[None, :] * so_h + qi[None, :] * so_s + c[:, None]
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[None, :] & (c[:, None] < RV))
    else:
        rows = tl.arange(0, M_BLOCK)
        slot = (pid_bg * NQB + pid_q) * NSPLIT + pid_s
        tl.store(part_ptr + slot * (M_BLOCK * RV_P) + rows[None, :] * RV_P + c[:, None], o)
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(lse_ptr + slot * M_BLOCK + rows, lse)


@triton.jit
def combine_splits_kernel(
    part_ptr, lse_ptr, out_ptr,
    G, Sq, NQB, NSPLIT, so_b, so_h, so_s,
    HPG: tl.constexpr, HPG_P: tl.constexpr, M_BLOCK: tl.constexpr, RV: tl.constexpr, RV_P: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr, COLS: tl.constexpr,
):
    """Merge the per-split partial outputs of one output row (and ``COLS`` of its columns).

    One program per (row, column block), each reducing ``SPLIT_BLOCK`` splits per vector
    load: batch 1 at long context has few rows and hundreds of splits, and a loop over the
    splits one at a time would be a chain of dependent global loads.
    """
    pid_bq = tl.program_id(0)  # (batch, group) x query block
    r = tl.program_id(1)  # row of the block
    cols = tl.program_id(2) * COLS + tl.arange(0, COLS)
    pid_bg = pid_bq // NQB
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    h_loc = r % HPG_P
    qi = (pid_bq % NQB) * (M_BLOCK // HPG_P) + r // HPG_P
    if (h_loc < HPG) & (qi < Sq):
        base = pid_bq * NSPLIT
        sp = tl.arange(0, SPLIT_BLOCK)
        mv = tl.full([SPLIT_BLOCK], float("-inf"), tl.float32)
        for s0 in range(0, NSPLIT, SPLIT_BLOCK):
            lse = tl.load(lse_ptr + (base + s0 + sp) * M_BLOCK + r, mask=s0 + sp < NSPLIT, other=float("-inf"))
            mv = tl.maximum(mv, lse)
        m = tl.max(mv, axis=0)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        acc = tl.zeros([SPLIT_BLOCK, COLS], tl.float32)
        den = tl.zeros([SPLIT_BLOCK], tl.float32)
        for s0 in range(0, NSPLIT, SPLIT_BLOCK):
            ok = s0 + sp < NSPLIT
            w = tl.math.exp2(tl.load(lse_ptr + (base + s0 + sp) * M_BLOCK + r, mask=ok, other=float("-inf")) - m_use)
            o = tl.load(part_ptr + ((base + s0 + sp) * M_BLOCK + r)[:, None] * RV_P + cols[None, :],
                        mask=ok[:, None] & (cols[None, :] < RV_P), other=0.0)
            acc += o * w[:, None]
            den += w
        d = tl.sum(den, axis=0)
        out = tl.sum(acc, axis=0) / tl.where(d == 0.0, 1.0, d)
        head = g * HPG + h_loc
        tl.store(out_ptr + b * so_b + head * so_h + qi * so_s + cols, out.to(out_ptr.dtype.element_ty),
                 mask=cols < RV)


# ---------------------------------------------------------------- key reconstruction
# Keys are rebuilt one KV head at a time in three column parts of the head: "lo" and "hi"
# (the two partners of each rotary pair) and "pass" (dims past the rotary ones). Splitting
# the rows of L_k this way turns RoPE into elementwise math on two tiles, for both
# rotate-half (lo = first half, hi = second half) and interleaved (lo = even, hi = odd)
# styles, without permuting registers. Without RoPE everything is "pass".


@triton.jit
def load_lk_head(
    lk_ptr, g, j, slk_g, slk_r, RK,
    D: tl.constexpr, RK_P: tl.constexpr, ROPE: tl.constexpr, ROT: tl.constexpr, HALF: tl.constexpr,
    HALF_P: tl.constexpr, STEP: tl.constexpr, HI_OFF: tl.constexpr, PASS: tl.constexpr,
    PASS_P: tl.constexpr, HAS_PASS: tl.constexpr,
):
    """The three ``L_k^T`` tiles [RK_P, part] of KV head ``j`` of group ``g`` (zeros padded)."""
    r = tl.arange(0, RK_P)
    base = lk_ptr + g * slk_g + (j * D) * slk_r + r[:, None]
    r_ok = r[:, None] < RK
    d = tl.arange(0, HALF_P)
    lo = tl.zeros([RK_P, HALF_P], lk_ptr.dtype.element_ty)
    hi = tl.zeros([RK_P, HALF_P], lk_ptr.dtype.element_ty)
    if ROPE:
        ok = r_ok & (d[None, :] < HALF)
        lo = tl.load(base + (d[None, :] * STEP) * slk_r, mask=ok, other=0.0)
        hi = tl.load(base + (d[None, :] * STEP + HI_OFF) * slk_r, mask=ok, other=0.0)
    e = tl.arange(0, PASS_P)
    ps = tl.zeros([RK_P, PASS_P], lk_ptr.dtype.element_ty)
    if HAS_PASS:
        ps = tl.load(base + (ROT + e[None, :]) * slk_r, mask=r_ok & (e[None, :] < PASS), other=0.0)
    return lo, hi, ps


@triton.jit
def load_q_head(
    q_ptr, q_row, jr, j, row_ok, sq_d, M_BLOCK: tl.constexpr,
    ROPE: tl.constexpr, ROT: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, STEP: tl.constexpr,
    HI_OFF: tl.constexpr, PASS: tl.constexpr, PASS_P: tl.constexpr, HAS_PASS: tl.constexpr,
):
    """Query parts, transposed ([part, M]), of the rows that read KV head ``j``; zeros elsewhere."""
    mine = (row_ok & (jr == j))[None, :]
    d = tl.arange(0, HALF_P)[:, None]
    lo = tl.zeros([HALF_P, M_BLOCK], q_ptr.dtype.element_ty)
    hi = tl.zeros([HALF_P, M_BLOCK], q_ptr.dtype.element_ty)
    if ROPE:
        lo = tl.load(q_ptr + q_row[None, :] + (d * STEP) * sq_d, mask=mine & (d < HALF), other=0.0)
        hi = tl.load(q_ptr + q_row[None, :] + (d * STEP + HI_OFF) * sq_d, mask=mine & (d < HALF), other=0.0)
    e = tl.arange(0, PASS_P)[:, None]
    ps = tl.zeros([PASS_P, M_BLOCK], q_ptr.dtype.element_ty)
    if HAS_PASS:
        ps = tl.load(q_ptr + q_row[None, :] + (ROT + e) * sq_d, mask=mine & (e < PASS), other=0.0)
    return lo, hi, ps


@triton.jit
def load_rope_pairs(
    cos_ptr, sin_ptr, b, kv, kv_ok, sc_b, sc_s, sc_d, ss_b, ss_s, ss_d, d0,
    HALF: tl.constexpr, CH: tl.constexpr, STEP: tl.constexpr, DTYPE: tl.constexpr = tl.float32,
):
    """cos/sin of rotary pairs ``d0 .. d0+CH`` of each cached slot, [BLOCK_S, CH] in ``DTYPE``.

    Both partners of a pair rotate by one angle, so only the "lo" column of each pair is
    read: half the table bytes, which every (batch, group) program streams from L2.
    """
    d = d0 + tl.arange(0, CH)[None, :]
    ok = kv_ok[:, None] & (d < HALF)
    c = tl.load(cos_ptr + b * sc_b + kv[:, None] * sc_s + (d * STEP) * sc_d, mask=ok, other=0.0)
    sn = tl.load(sin_ptr + b * ss_b + kv[:, None] * ss_s + (d * STEP) * ss_d, mask=ok, other=0.0)
    return c.to(DTYPE), sn.to(DTYPE)


@triton.jit
def load_head_vec(
    ptr, off,
    ROPE: tl.constexpr, ROT: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, STEP: tl.constexpr,
    HI_OFF: tl.constexpr, PASS: tl.constexpr, PASS_P: tl.constexpr, HAS_PASS: tl.constexpr,
):
    """A per-dim vector of one head (key bias, k-norm weight) split into parts, fp32."""
    d = tl.arange(0, HALF_P)
    lo = tl.zeros([HALF_P], tl.float32)
    hi = tl.zeros([HALF_P], tl.float32)
    if ROPE:
        lo = tl.load(ptr + off + d * STEP, mask=d < HALF, other=0.0).to(tl.float32)
        hi = tl.load(ptr + off + d * STEP + HI_OFF, mask=d < HALF, other=0.0).to(tl.float32)
    e = tl.arange(0, PASS_P)
    ps = tl.zeros([PASS_P], tl.float32)
    if HAS_PASS:
        ps = tl.load(ptr + off + ROT + e, mask=e < PASS, other=0.0).to(tl.float32)
    return lo, hi, ps


@triton.jit
def rebuild_head(
    hk_t, lk_lo, lk_hi, lk_ps, bias_ptr, w_ptr, bias_off, cs, sn, eps,
    BLOCK_S: tl.constexpr, D: tl.constexpr, ROPE: tl.constexpr, ROT: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    STEP: tl.constexpr, HI_OFF: tl.constexpr, PASS: tl.constexpr, PASS_P: tl.constexpr,
    HAS_PASS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """One KV head's keys for a token tile: ``hk_t @ L_k^T`` (+bias) -> RMSNorm -> RoPE.

    Returns fp32 (lo, hi, pass) tiles [BLOCK_S, part]; padded columns are exactly zero.
    """
    k_lo = tl.zeros([BLOCK_S, HALF_P], tl.float32)
    k_hi = tl.zeros([BLOCK_S, HALF_P], tl.float32)
    k_ps = tl.zeros([BLOCK_S, PASS_P], tl.float32)
    if ROPE:
        k_lo = mma(hk_t, lk_lo, UPCAST, IEEE)
        k_hi = mma(hk_t, lk_hi, UPCAST, IEEE)
    if HAS_PASS:
        k_ps = mma(hk_t, lk_ps, UPCAST, IEEE)
    if HAS_BIAS:
        b_lo, b_hi, b_ps = load_head_vec(bias_ptr, bias_off, ROPE, ROT, HALF, HALF_P, STEP, HI_OFF,
                                         PASS, PASS_P, HAS_PASS)
        k_lo += b_lo[None, :]
        k_hi += b_hi[None, :]
        k_ps += b_ps[None, :]
    if HAS_NORM:
        ss = tl.sum(k_lo * k_lo, axis=1) + tl.sum(k_hi * k_hi, axis=1) + tl.sum(k_ps * k_ps, axis=1)
        rstd = tl.rsqrt(ss / D + eps)
        w_lo, w_hi, w_ps = load_head_vec(w_ptr, 0, ROPE, ROT, HALF, HALF_P, STEP, HI_OFF,
                                         PASS, PASS_P, HAS_PASS)
        k_lo = k_lo * rstd[:, None] * w_lo[None, :]
        k_hi = k_hi * rstd[:, None] * w_hi[None, :]
        k_ps = k_ps * rstd[:, None] * w_ps[None, :]
    if ROPE:
        r_lo = k_lo * cs - k_hi * sn
        r_hi = k_hi * cs + k_lo * sn
        k_lo = r_lo
        k_hi = r_hi
    return k_lo, k_hi, k_ps


# ---------------------------------------------------------------- latent tiles (plain or packed)
# A latent tile is the [BLOCK_S, R_P] slice of one Palu group's latents for a token tile.
# Plain caches load it; quantized caches (layouts: ``palu_fx.quant.pack``) load the packed
# bytes of the group as contiguous rows, spread the bit fields of each byte over its
# channels with ``tl.join`` + ``tl.reshape`` (channel ``k*i + m`` of a plane of ``k``
# codes per byte is field ``m`` of byte ``i``), and dequantize ``code * scale + zero`` in
# fp32. Tiles are handled as [BLOCK_S, NQG_P, QG_P] (quantization groups x their channels),
# so each group's scale broadcasts without a gather; the wrapper only picks this layout
# when the flattened index ``group * QG_P + channel`` is the real channel index (one
# group per Palu group, or power-of-two groups).


@triton.jit
def _interleave(a, b):
    """``out[..., 2i] = a[..., i]``, ``out[..., 2i+1] = b[..., i]`` for 3-d tiles."""
    return tl.reshape(tl.join(a, b), [a.shape[0], a.shape[1], 2 * a.shape[2]])


@triton.jit
def _unpack_plane(w, WIDTH: tl.constexpr):
    """int32 byte tile [S, G, X] -> its ``8 // WIDTH`` fields per byte, [S, G, X * 8 // WIDTH], low bits first."""
    if WIDTH == 4:
        c = _interleave(w & 15, w >> 4)
    elif WIDTH == 2:
        c = _interleave(_interleave(w & 3, (w >> 4) & 3), _interleave((w >> 2) & 3, w >> 6))
    else:
        ev = _interleave(_interleave(w & 1, (w >> 4) & 1), _interleave((w >> 2) & 1, (w >> 6) & 1))
        od = _interleave(_interleave((w >> 1) & 1, (w >> 5) & 1), _interleave((w >> 3) & 1, w >> 7))
        c = _interleave(ev, od)
    return c


@triton.jit
def _load_bytes(ptr, tok_off, grp_off, tok_ok, first, n, N_P: tl.constexpr):
    """Bytes ``first .. first+n`` of every (token, group) as int32 [S, G, N_P] (zeros past ``n``)."""
    i = tl.arange(0, N_P)[None, None, :]
    w = tl.load(ptr + tok_off + grp_off + first + i, mask=tok_ok & (i < n), other=0)
    return w.to(tl.int32)


# One 32-bit word of 4-bit codes (channel 2k in the low nibble of byte k, 2k+1 in its high
# nibble) to 8 dequantized 16-bit floats, two per instruction. Per byte k, fp16: a byte permute
# copies it to bytes 0 and 2; one lop3 keeps the low nibble of byte 0 and the high nibble of
# byte 2 and ORs in the exponent bits of 1024, giving the half2 (1024 + c_2k, 1024 + 16 c_2k+1);
# a packed subtract of 1024 leaves (c_2k, 16 c_2k+1) exactly, and one packed FMA with
# (s, s/16) and (z, z) dequantizes: 4 instructions per channel pair, against about 6 per
# channel for the shift/mask/OR/convert sequence Triton emits for the same arithmetic.
# bf16 has 7 mantissa bits, too few for 16 c: the permute takes byte 2 from the word shifted
# right by 4 (one shift per word), the lop3 keeps both low nibbles and ORs in the exponent of
# 128, and an FMA with (1, 1) and (-128, -128) leaves the codes. The fp16 scale and zero do not
# fit bf16, so each is split into a bf16 head and tail (s = s_hi + s_lo): c s_hi + z_hi and
# c s_lo + z_lo, then their sum. 6 instructions per pair; dequantization error 0.22% of the
# values against 0.17% for fp32 arithmetic (0.65% with the scale and zero rounded to bf16).
def _dequant4_asm(bf16: bool) -> str:
    if bf16:  # $9, $10: (s_hi, s_hi), (z_hi, z_hi); $11, $12: (s_lo, s_lo), (z_lo, z_lo)
        head = ["shr.u32 h, $8, 4;", "mov.b32 one, 0x3f803f80;", "mov.b32 neg, 0xc300c300;"]
        pair = ["prmt.b32 p, $8, h, 0x{hk}{hk}{k}{k};", "lop3.b32 p, p, 0x000f000f, 0x43004300, 0xea;",
                "fma.rn.bf16x2 p, p, one, neg;", "fma.rn.bf16x2 t, p, $11, $12;", "fma.rn.bf16x2 p, p, $9, $10;",
                "fma.rn.bf16x2 p, t, one, p;"]
    else:
        head = ["mov.b32 neg, 0x64006400;"]
        pair = ["prmt.b32 p, $8, 0, 0x{k}{k}{k}{k};", "lop3.b32 p, p, 0x00f0000f, 0x64006400, 0xea;",
                "sub.f16x2 p, p, neg;", "fma.rn.f16x2 p, p, $9, $10;"]
    body = [line for k in range(4)
            for line in [step.format(k=k, hk=4 + k) for step in pair] + [f"mov.b32 {{${2 * k}, ${2 * k + 1}}}, p;"]]
    return "\n".join(["{", ".reg .b32 p, t, h, one, neg;", *head, *body, "}"])


_DEQUANT4_ASM_F16 = tl.constexpr(_dequant4_asm(bf16=False))
_DEQUANT4_ASM_BF16 = tl.constexpr(_dequant4_asm(bf16=True))


@triton.jit
def _pair(lo, hi, DTYPE: tl.constexpr):
    """Tiles -> int32 tiles holding the 16-bit pair (lo, hi) in ``DTYPE``."""
    lo_b = lo.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi_b = hi.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32)
    return lo_b | (hi_b << 16)


@triton.jit
def _dequant4_words(w, s, z, DTYPE: tl.constexpr):
    """int32 words [S, G, W] of 4-bit codes, scales/zeros [S, G] -> ``DTYPE`` (fp16 or bf16)
    [S, G, 8 W], channel order."""
    if DTYPE == tl.float16:
        f16 = tl.float16
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            _DEQUANT4_ASM_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r",
            [w, _pair(s, s * 0.0625, f16)[:, :, None], _pair(z, z, f16)[:, :, None]],
            dtype=(f16, f16, f16, f16, f16, f16, f16, f16), is_pure=True, pack=1)
    else:  # bf16 heads and tails of the fp16 scale and zero
        bf = tl.bfloat16
        s_hi, z_hi = s.to(bf), z.to(bf)
        s_lo, z_lo = s.to(tl.float32) - s_hi.to(tl.float32), z.to(tl.float32) - z_hi.to(tl.float32)
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            _DEQUANT4_ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r",
            [w, _pair(s_hi, s_hi, bf)[:, :, None], _pair(z_hi, z_hi, bf)[:, :, None],
             _pair(s_lo, s_lo, bf)[:, :, None], _pair(z_lo, z_lo, bf)[:, :, None]],
            dtype=(bf, bf, bf, bf, bf, bf, bf, bf), is_pure=True, pack=1)
    even = _interleave(_interleave(c0, c4), _interleave(c2, c6))
    odd = _interleave(_interleave(c1, c5), _interleave(c3, c7))
    return _interleave(even, odd)


@triton.jit
def load_latent(
    ptr, sc_ptr, zr_ptr, kv, kv_ok, s_stride, sc_stride, R,
    R_P: tl.constexpr, BITS: tl.constexpr, QG: tl.constexpr, QG_P: tl.constexpr, NQG: tl.constexpr,
    NQG_P: tl.constexpr, DTYPE: tl.constexpr, s_pre=0.0, z_pre=0.0, PREFETCH: tl.constexpr = False,
    WORDS: tl.constexpr = False, PRE_NQG: tl.constexpr = 1,
):
    """One Palu group's latents [BLOCK_S, R_P] for tokens ``kv``, in ``DTYPE``; zero rows past ``kv_ok``.

    ``ptr`` points at the group's first element (``BITS`` 0: a plain cache, ``R`` channels)
    or first code byte (``BITS`` 2, 3, 4) in token 0's row; ``sc_ptr``/``zr_ptr`` at its
    first fp16 scale/zero. Packed: ``NQG`` groups of ``QG`` channels (padded to ``QG_P``,
    ``NQG_P * QG_P == R_P``), no byte padding inside a group. Channels past the real ones
    decode to the group's zero point (finite; the other operand is zero there). With
    ``PREFETCH`` and ``NQG_P == PRE_NQG`` the scales and zeros [BLOCK_S, PRE_NQG] are already
    loaded (``s_pre``/``z_pre``, ``tile_vectors``): one quantization group per Palu group, of
    one group or of ``PRE_NQG`` adjacent ones read as one (``per_head.py``). ``WORDS`` (4 bits, fp16 or
    bf16, word-aligned rows, compiled for a GPU: ``Latent.words``) reads the codes as 32-bit
    words and dequantizes them two channels per instruction (``_dequant4_asm``).
    """
    if BITS == 0:
        r = tl.arange(0, R_P)
        t = tl.load(ptr + kv[:, None] * s_stride + r[None, :], mask=kv_ok[:, None] & (r[None, :] < R), other=0.0)
        out = t.to(DTYPE)
    else:
        grp = tl.arange(0, NQG_P)
        tok_off = kv[:, None, None] * s_stride
        grp_off = grp[None, :, None] * (QG * BITS // 8)
        ok = kv_ok[:, None, None] & (grp[None, :, None] < NQG)
        if WORDS:  # 8 codes per word
            i = tl.arange(0, QG_P // 8)[None, None, :]
            words = ptr.to(tl.pointer_type(tl.int32)) + kv[:, None, None] * (s_stride // 4)
            w = tl.load(words + grp[None, :, None] * (QG // 8) + i, mask=ok & (i < QG // 8), other=0)
        elif BITS == 3:  # two planes per group: low 2 bits of every code, then the high bits
            lo = _load_bytes(ptr, tok_off, grp_off, ok, 0, QG // 4, QG_P // 4)
            hi = _load_bytes(ptr, tok_off, grp_off, ok, QG // 4, QG // 8, QG_P // 8)
            c = _unpack_plane(lo, 2) | (_unpack_plane(hi, 1) << 2)
        else:
            c = _unpack_plane(_load_bytes(ptr, tok_off, grp_off, ok, 0, QG * BITS // 8, QG_P * BITS // 8), BITS)
        if PREFETCH and NQG_P == PRE_NQG:
            s = s_pre
            z = z_pre
        else:
            sz_off = kv[:, None] * sc_stride + grp[None, :]
            sz_ok = kv_ok[:, None] & (grp[None, :] < NQG)
            s = tl.load(sc_ptr + sz_off, mask=sz_ok, other=0.0)
            z = tl.load(zr_ptr + sz_off, mask=sz_ok, other=0.0)
        # code -> float exactly without an int->float conversion (a slow instruction): the
        # bits of 1024 + code as fp16, or of 2**23 + code as fp32, minus that constant
        if WORDS:
            x = _dequant4_words(w, s, z, DTYPE)
        elif DTYPE == tl.float16:  # fp16 operands: dequantize in fp16 (one rounding, as an fp16 cache holds it)
            one = tl.full([1, 1, 1], 1024.0, tl.float16)
            cf = (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - one
            x = cf * s[:, :, None] + z[:, :, None]
        else:
            cf = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            x = cf * s.to(tl.float32)[:, :, None] + z.to(tl.float32)[:, :, None]
        out = tl.reshape(x, [kv.shape[0], R_P]).to(DTYPE)
    return out
