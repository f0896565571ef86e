"""Gluon decode kernel: RoPE attention with keys rebuilt from plain or 4-bit latents, in
multi-head attention (one KV head per query head; any group size), on Hopper's warpgroup MMA.

Why: ``per_head.py`` served these calls in Triton at 0.63-0.69 ms (fp16) and 0.69 ms (4-bit)
for B=8 x 32k (32 heads of 128, rank ratio 0.5), where the bytes need 0.53 and 0.15 ms and the
key products 0.19-0.20 (RESULTS.md). Triton spreads each score tile's token axis over four
warps, so every tile pays cross-warp reductions and barriers. Here the layouts are the
kernel's; it takes 0.50-0.52 ms (fp16) and 0.52 ms (4-bit) there:

* **Scores without rotated keys** (as ``per_head.py``): for rotary pair ``f`` with partners
  ``lo``/``hi``, ``q . rope_t(L h_t) = sum_f cos_tf (Wa h_t)_f + sin_tf (Wb h_t)_f`` with
  ``Wa_f = q_lo,f L_lo,f + q_hi,f L_hi,f`` and ``Wb_f = q_hi,f L_lo,f - q_lo,f L_hi,f``. Each
  program builds ``[Wa | Wb]`` of its heads once ([rank, head_dim] in shared memory); a token
  tile's ``[64, head_dim]`` products come from one ``wgmma`` per head with the latents as
  the register operand.
* **One softmax lane per thread.** The ``wgmma`` accumulator gives a thread two token rows;
  the pair columns it holds are permuted (the order of ``[Wa | Wb]``'s columns is the
  kernel's choice) so that its cos/sin values are one contiguous run of the table. The score
  of a row is a sum over the thread's registers and two shuffles within its quad. The two
  rows share one running max, sum and value accumulator (the quad's four threads hold a
  quarter of its channels each), so nothing crosses a warp until the program's end.
* **Latents straight into the operand layout.** A thread's share of the key operand (two rows,
  ``rank/4`` channels each) is one contiguous run of each row once the product's inner index
  is permuted (``[Wa | Wb]``'s rows take the same order); 4-bit codes are dequantized into it
  (``s c + z`` in the operand dtype, two channels per instruction). Plain values go to fp32
  accumulators as they are; 4-bit values as ``sum_t (p_t s_t) c_t`` over a thread's two rows in
  fp16 pairs (``_value_asm``) plus ``sum_t p_t z_t`` in fp32.
* **Two heads per program** (``default_knobs``): every tile's cos/sin rows serve both (with one,
  they cost as many L2 reads as the fp16 latents: L2 at 89% of its peak, DRAM at 78%). At
  group size 1 each head has its own latents. Above it, the two are heads of one group, each
  with its slice of the group's ``L_k`` (its own ``[Wa | Wb]``), and share the group's latent
  tile: its key operand is built once for both products and its values read once for both
  sums (B=8 x 32k at gs2: 0.82-0.86 ms against 0.97-1.07 with a head per program, and 1.68 for
  the Triton group kernel). Plain keys and values then take turns in a ring of three slots
  (``RING3``), so that two programs fit an SM beside the two 32 KB ``[Wa | Wb]``.
* **Copies streamed with ``cp.async``** into a ring of shared-memory stages (each tile's
  latents); the cos/sin rows go with them (``TABLES`` 1), into one buffer read before the next
  copy starts (2: two programs of two fp16 heads fit an SM), or straight into registers a tile
  ahead (0); the scales and zeros and the mask row are loaded a tile ahead into registers.

Covers: fp16 and bf16, rotate-half RoPE over the whole head (head dim 64 or 128, the tables'
last dim contiguous), key and value ranks 32/64/128 per group (powers of two: group size 1
and 2 at rank ratio 0.5), plain latents or 4-bit codes with one quantization group per latent
group (both caches alike), shared decode masks or none,
no softcap, no key bias or norm, one query token. ``applies`` says whether a call is covered;
everything else takes the Triton kernels. Plain latents of rank 128 go to ``gluon_wide.py`` first
(``KernelConfig.gluon_wide_min_rank``: two programs per SM there, 1.03 ms against 1.24 at gs1 and
ratio 1.0). Gluon has no CPU interpreter: CI checks the PTX on an
emulator, the layouts' orders with torch reshapes (``gluon_rope_layouts.py``), and compiles
for sm_90 (``test_gluon_rope.py``).
"""
from __future__ import annotations

import torch

try:  # Gluon ships with Triton >= 3.5; without it the Triton kernels serve every call
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma
    HAVE_GLUON = True
except ImportError:  # pragma: no cover (older Triton)
    HAVE_GLUON = False

from palu_fx.kernels.latent_attention.gluon_rope_layouts import (copy_layout, head_columns_layout, key_channel,
                                                                 pair_of_column, swizzled_layout, thread_run_layout)

if HAVE_GLUON:
    from palu_fx.kernels.latent_attention.gluon_q4 import store_output
    from palu_fx.kernels.latent_attention.gluon_rope_layouts import (_key_channel, _kappa_plain, _kappa_words,
                                                                     _pair_tables, _value_sums)

__all__ = ["HAVE_GLUON", "applies", "call_fits", "default_knobs", "latent_args", "launch", "key_channel",
           "operands_fit", "pair_of_column"]

if HAVE_GLUON:
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared

    @gluon.jit
    def _latent_rows(buf, s, z, R: gl.constexpr, BITS: gl.constexpr, RUN_L: gl.constexpr, BF16: gl.constexpr,
                     DT: gl.constexpr):
        """One head's [64, R] latent tile from its shared-memory stage, dequantized, in inner-index
        order (layout left to the caller's convert)."""
        if BITS == 4:
            w = buf.load(RUN_L)
            sb = gl.expand_dims(s, 1) + gl.zeros(w.shape, gl.float32, RUN_L)
            zb = gl.expand_dims(z, 1) + gl.zeros(w.shape, gl.float32, RUN_L)
            x = _kappa_words(w, sb, zb, R, BF16)
        else:
            x = _kappa_plain(buf.load(RUN_L), R)
        return x

    @gluon.jit
    def _copy_rows(buf, ptr, off, stride, start, hi, W: gl.constexpr, LC: gl.constexpr):
        """Start the copy of a tile's rows (``W`` elements each, from ``ptr + off``) into ``buf``;
        rows past ``hi`` are clamped to the last token (real memory, masked out of the scores)."""
        t = gl.minimum(start + gl.arange(0, 64, layout=gl.SliceLayout(1, LC)), hi - 1).to(gl.int64)
        c = gl.expand_dims(gl.arange(0, W, layout=gl.SliceLayout(0, LC)), 0)
        _async_load(buf, ptr + off + gl.expand_dims(t, 1) * stride + c)

    @gluon.jit
    def _copy_tile(kbuf, vbuf, slot0, cbuf, sbuf, k_ptr, v_ptr, cos_ptr, sin_ptr, k_off, v_off, c_off, s_off,
                   sk_s, sv_s, sc_s, ss_s, start, hi, LAT: gl.constexpr, KW: gl.constexpr, VW: gl.constexpr,
                   HALF: gl.constexpr, LCK: gl.constexpr, LCV: gl.constexpr, LCC: gl.constexpr,
                   TABLES: gl.constexpr, VALUES: gl.constexpr):
        """Start the copies of a tile's latents (each latent group's row segment; keys only unless
        ``VALUES``) and cos/sin rows."""
        for j in gl.static_range(LAT):
            _copy_rows(kbuf.index(slot0 + j), k_ptr, k_off + j * KW, sk_s, start, hi, KW, LCK)
            if VALUES:
                _copy_rows(vbuf.index(slot0 + j), v_ptr, v_off + j * VW, sv_s, start, hi, VW, LCV)
        if TABLES > 0:
            _copy_rows(cbuf, cos_ptr, c_off, sc_s, start, hi, HALF, LCC)
            _copy_rows(sbuf, sin_ptr, s_off, ss_s, start, hi, HALF, LCC)

    @gluon.jit
    def _table_rows(cos_ptr, sin_ptr, c_off, s_off, sc_s, ss_s, tok, hi, HALF: gl.constexpr, CS_L: gl.constexpr):
        """The cos/sin rows [64, HALF] of tokens ``tok`` (clamped to the last token) from global
        memory, in the thread-run layout."""
        t = gl.minimum(gl.convert_layout(tok, gl.SliceLayout(1, CS_L)), hi - 1).to(gl.int64)
        f = gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(0, CS_L)), 0)
        return (gl.load(cos_ptr + c_off + gl.expand_dims(t * sc_s, 1) + f),
                gl.load(sin_ptr + s_off + gl.expand_dims(t * ss_s, 1) + f))

    @gluon.jit
    def _vectors(ks_ptr, kz_ptr, vs_ptr, vz_ptr, q_off, sq_s, mask_ptr, m_off, sm_k, tok, hi,
                 LAT: gl.constexpr, HV_L: gl.constexpr, BITS: gl.constexpr, MASK_KIND: gl.constexpr):
        """A tile's per-token scales and zeros [64, LAT] (column = latent group; 4-bit) and its
        mask row [64], fp32."""
        ok = tok < hi
        mr = tok.to(gl.float32) * 0.0
        if MASK_KIND == 3:  # keep flags
            mr = (gl.load(mask_ptr + m_off + tok * sm_k, mask=ok, other=0) != 0).to(gl.float32)
        elif MASK_KIND == 4:  # additive
            mr = gl.load(mask_ptr + m_off + tok * sm_k, mask=ok, other=0.0).to(gl.float32)
        hh = gl.arange(0, LAT, layout=gl.SliceLayout(0, HV_L))
        tk = gl.convert_layout(tok, gl.SliceLayout(1, HV_L))
        off = q_off + gl.expand_dims(tk, 1) * sq_s + gl.expand_dims(hh, 0)
        ok2 = gl.expand_dims(tk < hi, 1) & gl.expand_dims(hh < LAT, 0)
        if BITS == 4:
            sk = gl.load(ks_ptr + off, mask=ok2, other=0.0).to(gl.float32)
            zk = gl.load(kz_ptr + off, mask=ok2, other=0.0).to(gl.float32)
            sv = gl.load(vs_ptr + off, mask=ok2, other=0.0).to(gl.float32)
            zv = gl.load(vz_ptr + off, mask=ok2, other=0.0).to(gl.float32)
        else:
            sk = gl.zeros([64, LAT], gl.float32, HV_L)
            zk, sv, zv = sk, sk, sk
        return sk, zk, sv, zv, mr

    @gluon.jit
    def _head_column(t, j: gl.constexpr, W: gl.constexpr, ROW: gl.constexpr):
        """Column ``j`` of a [64, W] tile as a [64] row vector (a select and an in-thread sum)."""
        hh = gl.arange(0, W, layout=gl.SliceLayout(0, t.type.layout))
        return gl.convert_layout(gl.sum(gl.where(gl.expand_dims(hh == j, 0), t, 0.0), axis=1), ROW)

    @gluon.jit
    def _scores(a, w, csn, ACC: gl.constexpr):
        """A tile's scores [64] of one head: its ``[Wa | Wb]`` product (one ``wgmma``, ``a`` the key
        operand), weighted by the tile's cos/sin and summed per row."""
        acc = warpgroup_mma(a, w, gl.zeros([64, csn.shape[1]], gl.float32, ACC), use_acc=False)
        return gl.sum(acc * csn.to(gl.float32), axis=1)

    @gluon.jit
    def _softmax_step(s, keep, madd, qscale, m_i, l_i):
        """Online softmax of a tile's scores: (weights p [4, 2, 8], rescale alpha, max, sum). Rows
        16 w + 8 r + g as (w, r, g): a thread's two rows (r) share one softmax lane."""
        t = gl.reshape(gl.where(keep, s * qscale + madd, float("-inf")), [4, 2, 8])
        m_new = gl.maximum(m_i, gl.max(t, axis=1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(t - gl.expand_dims(m_use, 1))
        alpha = gl.exp2(m_i - m_use)
        return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)

    @gluon.jit
    def _value_tile(vbuf, RV: gl.constexpr, BITS: gl.constexpr, RUN_V: gl.constexpr, V_L: gl.constexpr,
                    BF16: gl.constexpr, DT: gl.constexpr):
        """A tile's values from their stage: 4-bit code words [64, RV/8], or plain [4, 2, 8, RV] fp32."""
        if BITS == 4:
            v = vbuf.load(RUN_V)
        else:
            v = _latent_rows(vbuf, 0.0, 0.0, RV, BITS, RUN_V, BF16, DT)
            v = gl.reshape(gl.convert_layout(v, V_L).to(gl.float32), [4, 2, 8, RV])
        return v

    @gluon.jit
    def _value_step(v, p, alpha, o_i, z_i, sv, zv, jl: gl.constexpr, LAT: gl.constexpr, RV: gl.constexpr,
                    BITS: gl.constexpr, ROW: gl.constexpr):
        """Values accumulated in fp32 (4-bit: the codes' weighted sums ``o``, the zeros' ``z``)."""
        a_o = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(2, o_i.type.layout)), 2)
        if BITS == 4:  # sum_t p_t (s_t c_t + z_t) = sum_t (p_t s_t) c_t + sum_t p_t z_t
            s3 = gl.convert_layout(gl.reshape(_head_column(sv, jl, LAT, ROW), [4, 2, 8]), p.type.layout)
            z3 = gl.convert_layout(gl.reshape(_head_column(zv, jl, LAT, ROW), [4, 2, 8]), p.type.layout)
            z_i = z_i * alpha + gl.sum(p * z3, axis=1)
            o_i = o_i * a_o + gl.convert_layout(_value_sums(v, p * s3, RV), o_i.type.layout)
        else:
            pv = gl.expand_dims(gl.convert_layout(p, gl.SliceLayout(3, v.type.layout)), 3)
            o_i = o_i * a_o + gl.sum(pv * v, axis=1)
        return o_i, z_i

    @gluon.jit
    def _key_operand(kbuf, sk, zk, jl: gl.constexpr, LAT: gl.constexpr, RK: gl.constexpr, BITS: gl.constexpr,
                     RUN_K: gl.constexpr, A_OP: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr):
        """Latent group ``jl``'s keys of a tile as the ``wgmma`` register operand."""
        a = _latent_rows(kbuf, _head_column(sk, jl, LAT, gl.SliceLayout(1, RUN_K)),
                         _head_column(zk, jl, LAT, gl.SliceLayout(1, RUN_K)), RK, BITS, RUN_K, BF16, DT)
        return gl.convert_layout(a, A_OP)

    @gluon.jit
    def _head_step(kbuf, vbuf, wab, csn, sk, zk, sv, zv, j: gl.constexpr, jl: gl.constexpr, keep, madd, qscale,
                   m_i, l_i, o_i, z_i, RK: gl.constexpr, RV: gl.constexpr, BITS: gl.constexpr, LAT: gl.constexpr,
                   RUN_K: gl.constexpr, RUN_V: gl.constexpr, ACC: gl.constexpr, A_OP: gl.constexpr,
                   V_L: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr):
        """Head ``j`` (latent tile ``jl`` of the program's) over one tile."""
        a = _key_operand(kbuf, sk, zk, jl, LAT, RK, BITS, RUN_K, A_OP, BF16, DT)
        p, alpha, m_i, l_i = _softmax_step(_scores(a, wab.index(j), csn, ACC), keep, madd, qscale, m_i, l_i)
        o_i, z_i = _value_step(_value_tile(vbuf, RV, BITS, RUN_V, V_L, BF16, DT), p, alpha, o_i, z_i, sv, zv, jl, LAT,
                               RV, BITS, gl.SliceLayout(1, ACC))
        return m_i, l_i, o_i, z_i

    @gluon.jit
    def _softmax_init(RV: gl.constexpr, ROW: gl.constexpr, V_L: gl.constexpr):
        """Empty softmax lanes (max, sum, zeros' sum [4, 8]; values [4, 8, RV]) in the layouts
        ``_head_step``'s reductions give them (made by the same reductions)."""
        m = gl.max(gl.reshape(gl.full([64], float("-inf"), gl.float32, ROW), [4, 2, 8]), axis=1)
        o = gl.sum(gl.reshape(gl.zeros([64, RV], gl.float32, V_L), [4, 2, 8, RV]), axis=1)
        l = gl.max(gl.reshape(gl.zeros([64], gl.float32, ROW), [4, 2, 8]), axis=1)
        return m, l, o, l

    @gluon.jit
    def _finish_head(m_i, l_i, o_i, z_i, j: gl.constexpr, out_ptr, out_off, part_ptr, lse_ptr, slot,
                     RV: gl.constexpr, HPP: gl.constexpr, BITS: gl.constexpr, V_L: gl.constexpr,
                     DIRECT: gl.constexpr):
        """Merge the 32 softmax lanes of head ``j`` and store its output (channel order restored)
        or its split's partial with the base-2 LSE."""
        mx = gl.max(gl.max(m_i, axis=1), axis=0)
        m_use = gl.where(mx == float("-inf"), 0.0, mx)
        w = gl.exp2(m_i - m_use)
        l = gl.sum(gl.sum(l_i * w, axis=1), axis=0)
        wo = gl.expand_dims(gl.convert_layout(w, gl.SliceLayout(2, o_i.type.layout)), 2)
        zo = gl.expand_dims(gl.convert_layout(z_i, gl.SliceLayout(2, o_i.type.layout)), 2)
        o = gl.sum(gl.sum((o_i + zo) * wo, axis=1), axis=0)
        ch = _key_channel(gl.arange(0, RV, layout=o.type.layout), RV, BITS)
        store_output(o, l, mx, ch, out_ptr, out_off, part_ptr, lse_ptr, slot * HPP + j, RV, DIRECT)

    @gluon.jit
    def rope_decode_kernel(
        q_ptr, lk_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, cos_ptr, sin_ptr, mask_ptr, out_ptr, part_ptr,
        lse_ptr,
        sq_b, sq_h, sq_d, slk_g, slk_d, slk_r, sk_b, sk_s, sv_b, sv_s, ss_b, ss_s,
        sc_b, sc_s, ssn_b, ssn_s, sm_b, sm_k, so_b, so_h,
        Hq, Skv, chunk, NSPLIT, scale,
        RK: gl.constexpr, RV: gl.constexpr, HALF: gl.constexpr, HPP: gl.constexpr, GS: gl.constexpr,
        LAT: gl.constexpr, BITS: gl.constexpr, STAGES: gl.constexpr, MASK_KIND: gl.constexpr,
        DIRECT: gl.constexpr, BF16: gl.constexpr,
        RUN_K: gl.constexpr, RUN_V: gl.constexpr, CS_L: gl.constexpr, LCK: gl.constexpr, LCV: gl.constexpr,
        LCC: gl.constexpr, SWK: gl.constexpr, SWV: gl.constexpr, SWC: gl.constexpr, HV_L: gl.constexpr,
        TABLES: gl.constexpr = 1, RING3: gl.constexpr = False,
    ):
        # k_ptr / v_ptr: plain latents (element strides) or the codes as int32 words (word
        # strides); ss_*: scales and zeros [B, S, groups] (shared strides, checked by the host).
        # GS query heads per latent group (each its own slice of the group's L_k); a program's HPP
        # heads read LAT latent tiles: their own (GS 1, LAT = HPP) or their group's (GS > 1, LAT 1)
        PAIR: gl.constexpr = LAT == 1 and HPP == 2
        # RING3 (two heads on one group's plain latents, key and value ranks alike, tables 0): keys and
        # values take turns in a ring of three slots (copy n of K0, V0, K1, V1, .. into slot n % 3),
        # each copied a whole tile ahead, so that two programs fit an SM (each head's [Wa | Wb] is 32 KB).
        # Triton's barrier pass adds one after each copy (the slots share one allocation); three
        # static slots in a loop unrolled by three had two barriers a tile but spilled 224 bytes
        # (H200, B=8 x 32k: 1.00-1.02 ms against 0.83-0.86 for this, 0.89 with values in one buffer)
        N: gl.constexpr = 2 * HALF
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])
        A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
        V_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, RV, 16]), k_width=2)
        ROW: gl.constexpr = gl.SliceLayout(1, ACC)
        LW: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0])
        KW: gl.constexpr = RK // 8 if BITS == 4 else RK  # copied elements per token and head
        VW: gl.constexpr = RV // 8 if BITS == 4 else RV
        KT: gl.constexpr = gl.int32 if BITS == 4 else DT

        pid_s = gl.program_id(0)
        pid_x = gl.program_id(1)
        nblk = Hq // HPP
        b = (pid_x // nblk).to(gl.int64)
        h0 = (pid_x % nblk) * HPP
        g0 = h0 // GS
        lo = pid_s * chunk
        hi = gl.minimum(lo + chunk, Skv)

        # [Wa | Wb] of each head, once: rows in the key operand's inner order, columns in the
        # accumulator order of pairs (pair_of_column), built in fp32 and rounded to the operand dtype
        WL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([RK, N], DT)
        wab = gl.allocate_shared_memory(DT, [HPP, RK, N], WL)
        mch = _key_channel(gl.arange(0, RK, layout=gl.SliceLayout(1, LW)), RK, BITS)
        n = gl.arange(0, N, layout=gl.SliceLayout(0, LW))
        part = n // HALF
        nn = n % HALF
        f = (HALF // 4) * ((nn // 2) % 4) + 2 * (nn // 8) + nn % 2
        for j in gl.static_range(HPP):
            h = h0 + j
            lrow = lk_ptr + (h // GS) * slk_g + (h % GS) * (2 * HALF) * slk_d + gl.expand_dims(mch * slk_r, 1)
            l_lo = gl.load(lrow + gl.expand_dims(f * slk_d, 0)).to(gl.float32)
            l_hi = gl.load(lrow + gl.expand_dims((f + HALF) * slk_d, 0)).to(gl.float32)
            qrow = q_ptr + b * sq_b + h * sq_h
            q_lo = gl.expand_dims(gl.load(qrow + f * sq_d).to(gl.float32), 0)
            q_hi = gl.expand_dims(gl.load(qrow + (f + HALF) * sq_d).to(gl.float32), 0)
            w = gl.where(gl.expand_dims(part == 0, 0), q_lo * l_lo + q_hi * l_hi, q_hi * l_lo - q_lo * l_hi)
            wab.index(j).store(w.to(DT))
        fence_async_shared()
        _barrier()

        # stage i, latent tile j at index i LAT + j
        kbuf = gl.allocate_shared_memory(KT, [3 if RING3 else STAGES * LAT, 64, KW], SWK)
        if RING3:
            vbuf = kbuf
        else:
            vbuf = gl.allocate_shared_memory(KT, [STAGES * LAT, 64, VW], SWV)
        # cos/sin rows (TABLES): 1, copied with the latents into each stage; 2, copied into one
        # buffer, read into registers before the next tile's copy starts (less shared memory: two
        # programs of two heads fit an SM); 0, loaded from global memory a tile ahead into registers
        TS: gl.constexpr = STAGES if TABLES == 1 else 1
        TW: gl.constexpr = HALF if TABLES > 0 else 8
        cbuf = gl.allocate_shared_memory(cos_ptr.dtype.element_ty, [TS, 64, TW], SWC)
        sbuf = gl.allocate_shared_memory(cos_ptr.dtype.element_ty, [TS, 64, TW], SWC)
        k_off = b * sk_b + g0 * KW
        v_off = b * sv_b + g0 * VW
        c_off = b * sc_b
        s_off = b * ssn_b
        n_tiles = gl.cdiv(hi - lo, 64)
        AHEAD: gl.constexpr = 1 if TABLES == 2 or RING3 else STAGES - 1  # tiles in flight
        for i in gl.static_range(AHEAD):
            _copy_tile(kbuf, vbuf, i * LAT, cbuf.index(i % TS), sbuf.index(i % TS), k_ptr, v_ptr, cos_ptr, sin_ptr,
                       k_off, v_off, c_off, s_off, sk_s, sv_s, sc_s, ssn_s, lo + i * 64, hi, LAT, KW, VW, HALF,
                       LCK, LCV, LCC, TABLES, not RING3)
            cp.commit_group()
        if RING3:
            _copy_rows(vbuf.index(1), v_ptr, v_off, sv_s, lo, hi, VW, LCV)
            cp.commit_group()

        q_off = b * ss_b + g0
        m_off = b * sm_b
        tok_n = lo + gl.arange(0, 64, layout=ROW)
        sk_n, zk_n, sv_n, zv_n, mr_n = _vectors(ks_ptr, kz_ptr, vs_ptr, vz_ptr, q_off, ss_s, mask_ptr, m_off, sm_k,
                                                tok_n, hi, LAT, HV_L, BITS, MASK_KIND)
        cs_n, sn_n = _table_rows(cos_ptr, sin_ptr, c_off, s_off, sc_s, ssn_s, tok_n, hi, HALF, CS_L)
        m0, l0, o0, z0 = _softmax_init(RV, ROW, V_L)
        m1, l1, o1, z1 = m0, l0, o0, z0
        qscale = scale * 1.4426950408889634
        for it in range(n_tiles):
            tok = tok_n
            sk, zk, sv, zv, mr = sk_n, zk_n, sv_n, zv_n, mr_n
            tok_n = tok + 64
            sk_n, zk_n, sv_n, zv_n, mr_n = _vectors(ks_ptr, kz_ptr, vs_ptr, vz_ptr, q_off, ss_s, mask_ptr, m_off,
                                                    sm_k, tok_n, hi, LAT, HV_L, BITS, MASK_KIND)
            stage = it % STAGES
            nxt = (it + AHEAD) % STAGES
            if RING3:
                cp.wait_group(1)
                _barrier()  # this tile's keys are visible; every thread is done with the last one's values
                stage = (2 * it) % 3  # this tile's keys (its values: the next slot)
                _copy_tile(kbuf, vbuf, (stage + 2) % 3, cbuf.index(0), sbuf.index(0), k_ptr, v_ptr, cos_ptr, sin_ptr,
                           k_off, v_off, c_off, s_off, sk_s, sv_s, sc_s, ssn_s, lo + (it + 1) * 64, hi, LAT, KW, VW,
                           HALF, LCK, LCV, LCC, TABLES, False)
                cp.commit_group()
                csn = _pair_tables(cs_n, sn_n, HALF, ACC)
            elif TABLES == 2:
                cp.wait_group(0)
                # this tile's copies are visible, and every thread is done with the last one's stage
                _barrier()
                csn = _pair_tables(cbuf.index(0).load(CS_L), sbuf.index(0).load(CS_L), HALF, ACC)
                _barrier()  # the tables are read: the next copy may overwrite them
                _copy_tile(kbuf, vbuf, nxt * LAT, cbuf.index(0), sbuf.index(0), k_ptr, v_ptr, cos_ptr, sin_ptr, k_off,
                           v_off, c_off, s_off, sk_s, sv_s, sc_s, ssn_s, lo + (it + 1) * 64, hi, LAT, KW, VW, HALF,
                           LCK, LCV, LCC, TABLES, True)
                cp.commit_group()
            else:
                _barrier()  # the stage the next copy overwrites was read in the last iteration
                _copy_tile(kbuf, vbuf, nxt * LAT, cbuf.index(nxt % TS), sbuf.index(nxt % TS), k_ptr, v_ptr, cos_ptr,
                           sin_ptr, k_off, v_off, c_off, s_off, sk_s, sv_s, sc_s, ssn_s, lo + (it + AHEAD) * 64, hi,
                           LAT, KW, VW, HALF, LCK, LCV, LCC, TABLES, True)
                cp.commit_group()
                cp.wait_group(AHEAD)
                _barrier()  # other threads' copies are visible
                if TABLES == 1:
                    csn = _pair_tables(cbuf.index(stage).load(CS_L), sbuf.index(stage).load(CS_L), HALF, ACC)
                else:
                    csn = _pair_tables(cs_n, sn_n, HALF, ACC)
                    if not PAIR:  # (a pair's scores need these registers: it loads them after)
                        cs_n, sn_n = _table_rows(cos_ptr, sin_ptr, c_off, s_off, sc_s, ssn_s, tok_n, hi, HALF, CS_L)
            keep = tok < hi
            madd = mr * 0.0
            if MASK_KIND == 3:
                keep = keep & (mr != 0.0)
            if MASK_KIND == 4:
                madd = mr * 1.4426950408889634
            if PAIR:  # two heads on one latent tile: its operand and values read once
                a = _key_operand(kbuf.index(stage), sk, zk, 0, 1, RK, BITS, RUN_K, A_OP, BF16, DT)
                p0, al0, m0, l0 = _softmax_step(_scores(a, wab.index(0), csn, ACC), keep, madd, qscale, m0, l0)
                p1, al1, m1, l1 = _softmax_step(_scores(a, wab.index(1), csn, ACC), keep, madd, qscale, m1, l1)
                if TABLES == 0:
                    cs_n, sn_n = _table_rows(cos_ptr, sin_ptr, c_off, s_off, sc_s, ssn_s, tok_n, hi, HALF, CS_L)
                vslot = stage
                if RING3:
                    cp.wait_group(1)
                    _barrier()  # this tile's values are visible; every thread is done with its keys
                    _copy_rows(vbuf.index(stage), v_ptr, v_off, sv_s, lo + (it + 1) * 64, hi, VW, LCV)
                    cp.commit_group()
                    vslot = (stage + 1) % 3
                v = _value_tile(vbuf.index(vslot), RV, BITS, RUN_V, V_L, BF16, DT)
                o0, z0 = _value_step(v, p0, al0, o0, z0, sv, zv, 0, 1, RV, BITS, ROW)
                o1, z1 = _value_step(v, p1, al1, o1, z1, sv, zv, 0, 1, RV, BITS, ROW)
            else:
                m0, l0, o0, z0 = _head_step(kbuf.index(stage * LAT), vbuf.index(stage * LAT), wab, csn, sk, zk, sv,
                                            zv, 0, 0, keep, madd, qscale, m0, l0, o0, z0, RK, RV, BITS, LAT, RUN_K,
                                            RUN_V, ACC, A_OP, V_L, BF16, DT)
            if HPP > 1 and LAT > 1:
                m1, l1, o1, z1 = _head_step(kbuf.index(stage * LAT + LAT - 1), vbuf.index(stage * LAT + LAT - 1), wab,
                                            csn, sk, zk, sv, zv, 1, LAT - 1, keep, madd, qscale, m1, l1, o1, z1, RK,
                                            RV, BITS, LAT, RUN_K, RUN_V, ACC, A_OP, V_L, BF16, DT)
        cp.wait_group(0)

        slot = pid_x * NSPLIT + pid_s
        out_off = b * so_b + h0 * so_h
        _finish_head(m0, l0, o0, z0, 0, out_ptr, out_off, part_ptr, lse_ptr, slot, RV, HPP, BITS, V_L, DIRECT)
        if HPP > 1:
            _finish_head(m1, l1, o1, z1, 1, out_ptr, out_off + so_h, part_ptr, lse_ptr, slot, RV, HPP, BITS, V_L,
                         DIRECT)


def call_fits(q, lk, k_bias, k_norm_weight, cos, sin, rope_style, softcap, is_causal, mask_kind, interpret) -> bool:
    """What the Gluon RoPE kernels (this one and ``gluon_gqa``) need of a call: a GPU with Gluon,
    one fp16/bf16 query token, keys rebuilt with rotate-half RoPE over the whole head of 64 or
    128 (no bias, norm or softcap), no causal mask, a shared decode mask or none."""
    B, Hq, Sq, D = q.shape
    return (HAVE_GLUON and not interpret and lk is not None and rope_style == 1 and k_bias is None
            and k_norm_weight is None and softcap == 0 and not is_causal and mask_kind in (0, 3, 4)
            and Sq == 1 and q.dtype in (torch.float16, torch.bfloat16)
            and D in (64, 128) and cos.shape[-1] == D and sin.shape[-1] == D)


def operands_fit(q, kl, vl, cos, sin, rk: int, rv: int, groups: int) -> bool:
    """What the Gluon RoPE kernels need of the operands: key and value ranks 32/64/128 per latent
    group, cos/sin tables of one dtype with rows aligned for 16-byte copies, and plain latents in
    the query's dtype, or 4-bit codes with one quantization group per latent group (scales and
    zeros sharing strides), rows aligned likewise."""
    if rk not in (32, 64, 128) or rv not in (32, 64, 128) or kl.channels != groups * rk:
        return False
    if cos.dtype != sin.dtype or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        return False
    for t in (cos, sin):
        e = t.element_size()
        if t.data_ptr() % 16 or any(s * e % 16 for s in t.stride()[:-1] if s):
            return False
    if kl.bits == 0 and vl.bits == 0:
        return all(x.data.dtype == q.dtype and x.data.stride(-1) == 1 and x.data.data_ptr() % 16 == 0
                   and all(s * 2 % 16 == 0 for s in x.data.stride()[:-1]) for x in (kl, vl))
    return (kl.bits == 4 and vl.bits == 4 and kl.group_size == rk and vl.group_size == rv
            and kl.scale.stride() == kl.zero.stride() == vl.scale.stride() == vl.zero.stride()
            and kl.scale.stride(-1) == 1
            and all(x.data.stride(0) % 16 == 0 and x.data.stride(1) % 16 == 0 and x.data.data_ptr() % 16 == 0
                    for x in (kl, vl)))


def applies(q, kl, vl, lk, k_bias, k_norm_weight, cos, sin, rope_style, softcap, is_causal, mask_kind, groups,
            interpret) -> bool:
    """Whether ``rope_decode_kernel`` serves a fused call (see the module docstring)."""
    B, Hq, Sq, D = q.shape
    if not call_fits(q, lk, k_bias, k_norm_weight, cos, sin, rope_style, softcap, is_causal, mask_kind, interpret):
        return False
    if Hq % groups or tuple(lk.shape[:2]) != (groups, Hq // groups * D):  # multi-head: a KV head per query head
        return False
    return operands_fit(q, kl, vl, cos, sin, lk.shape[-1], vl.channels // groups, groups)


def default_knobs(bits: int, heads: int, rank: int, heads_per_program: int = 0, tables: int = -1,
                  group_size: int = 1) -> tuple[int, int]:
    """(heads per program, cos/sin mode) where the caller leaves them at 0 / -1.

    One head per latent group (``group_size`` 1): two heads per program, so that each tile's
    cos/sin rows serve both (H200, B=8 x 32k, RESULTS.md: fp16 0.50 ms against 0.60-0.64 with
    one head, where the rows' reads from L2 matched the latents'; 4-bit 0.54 against 0.69);
    their rows loaded a tile ahead into registers for 4-bit latents, copied into one buffer for
    plain ones (whose copy stages fill the shared memory). One head where the head count is odd
    or ``rank`` (the larger of the key and value ranks) is over 64 (two heads would spill
    registers), its rows copied with each stage (one buffer for plain latents over rank 64: a
    copy per stage takes 128 KB at rank 128, one program per SM; B=8 x 32k at rank 128: 1.07 ms
    against 1.48, and 1.28 for the Triton kernel).

    Several heads per group: two of a group per program (they share its latent tile, read once;
    one head per program reads it twice, from L2 at best: B=8 x 32k at gs2, fp16 0.82-0.86 ms
    against 0.97-1.07, and 3.5 ms against 4.6 at 128k, where the heads' programs drift apart);
    rows copied with each stage for 4-bit latents (0.77-0.80 ms against 0.85 from registers),
    loaded a tile ahead into registers for plain ones (the shared memory holds each head's
    ``[Wa | Wb]``; with equal key and value ranks they take the three-slot ring)."""
    if group_size > 1:
        hpp = heads_per_program if heads_per_program in (1, 2) else 2
        hpp = hpp if group_size % hpp == 0 else 1
        if tables not in (0, 1, 2):
            tables = 1 if bits == 4 else (0 if hpp == 2 else 2)
        return hpp, tables
    hpp = heads_per_program if heads_per_program in (1, 2) else (2 if rank <= 64 else 1)
    if heads % hpp:
        hpp = 1
    if tables not in (0, 1, 2):
        if bits == 4:
            tables = 0 if hpp == 2 else 1
        else:
            tables = 2 if hpp == 2 or rank > 64 else 1
    return hpp, tables


def latent_args(q, kl, vl, rk: int, rv: int):
    """What the Gluon RoPE kernels take of the latents (``gluon_rope``, ``gluon_gqa``): (bits,
    (key data, value data, key scale, key zero, value scale, value zero), the scales' (batch,
    token) strides, (key and value elements per token and group, element bytes)). 4 bits: the
    codes as int32 words; plain: the latents, with ``q`` standing in for the absent scales."""
    if kl.bits == 4:
        ks = kl.scale
        return (4, (kl.data.view(torch.int32), vl.data.view(torch.int32), ks, kl.zero, vl.scale, vl.zero),
                (ks.stride(0), ks.stride(1)), (rk // 8, rv // 8, 4))
    return 16, (kl.data, vl.data, q, q, q, q), (0, 0), (rk, rv, 2)


def launch(q, lk, kl, vl, cos, sin, mask_kind, mask, sm_b, sm_k, scale, out, nsplit, chunk, part, lse,
           heads_per_program=1, stages=2, tables=1, max_regs=0, probe=False):
    """Launch over ``nsplit`` splits of ``chunk`` tokens; ``part``/``lse``: the split partials, one
    row per head of a program, as ``common.combine_splits_kernel`` reads them. ``cos``/``sin``:
    [B, S, D] (broadcast strides allowed). ``probe``: return (kernel, grid, args, constexprs)."""
    B, Hq, _, D = q.shape
    half = D // 2
    rk = lk.shape[-1]
    groups = lk.shape[0]
    rv = vl.channels // groups
    hpp = heads_per_program
    lat = hpp if groups == Hq else 1  # latent tiles per program: one per head, or the group's
    bits, (kd, vd, ks, kz, vs, vz), ss, (kw, vw, eb) = latent_args(q, kl, vl, rk, rv)
    tb = cos.element_size()
    grid = (nsplit, B * Hq // hpp)
    args = (q, lk, kd, vd, ks, kz, vs, vz, cos, sin, mask, out, part, lse,
            q.stride(0), q.stride(1), q.stride(3), lk.stride(0), lk.stride(1), lk.stride(2),
            kd.stride(0), kd.stride(1), vd.stride(0), vd.stride(1), *ss,
            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), sm_b, sm_k, out.stride(0), out.stride(1),
            Hq, kd.shape[1], chunk, nsplit, float(scale))
    consts = dict(RK=rk, RV=rv, HALF=half, HPP=hpp, GS=Hq // groups, LAT=lat, BITS=bits,
                  STAGES=2 if tables == 2 else stages, MASK_KIND=mask_kind, DIRECT=nsplit == 1,
                  BF16=q.dtype == torch.bfloat16,
                  RUN_K=thread_run_layout(kw), RUN_V=thread_run_layout(vw), CS_L=thread_run_layout(half),
                  LCK=copy_layout(kw, eb), LCV=copy_layout(vw, eb), LCC=copy_layout(half, tb),
                  SWK=swizzled_layout(kw, eb), SWV=swizzled_layout(vw, eb), SWC=swizzled_layout(half, tb),
                  HV_L=head_columns_layout(lat), TABLES=tables,
                  RING3=bits == 16 and lat == 1 and hpp == 2 and tables == 0 and rk == rv, num_warps=4)
    if max_regs:  # ptxas's register cap: more programs per SM
        consts["maxnreg"] = max_regs
    if probe:
        return rope_decode_kernel, grid, args, consts
    rope_decode_kernel[grid](*args, **consts)
