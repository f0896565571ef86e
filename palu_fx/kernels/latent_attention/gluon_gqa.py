"""Gluon decode kernel: RoPE attention where several query heads share a KV head (GQA, MQA), keys
rebuilt once per KV head from its latents, on Hopper's warpgroup MMA and ``mma.sync``.

Why: ``gluon_rope.py`` scores a head without rotated keys (one ``[Wa | Wb]`` product per
*query* head), which at 4 query heads per KV head is 4x the key products the cache needs. The
Triton kernels served these calls at 0.21-0.26 ms for B=8 x 32k (32 query / 8 KV heads of 128,
rank ratio 0.5): no faster than SDPA on the full cache (0.25), where the latent bytes need
0.13 ms. Here each token tile's keys are rebuilt once and serve all of the KV head's query
heads: 0.17 ms, 1.5x SDPA (H200; RESULTS.md, "A Gluon kernel for GQA RoPE decode"):

* **Keys by ``wgmma``, RoPE in registers.** A tile's keys ``[64, D] = H L^T`` come from one
  warpgroup product with the latents as the register operand (as ``gluon_rope.py`` builds it,
  4-bit codes dequantized into it). ``L^T``'s columns are permuted (``pair_of_column``) so that
  a thread holds both partners of its rotary pairs, and its pairs are one contiguous run of the
  cos/sin tables. RoPE runs in place in the operand dtype, two channels per instruction (a
  multiply and an FMA per output pair, ``_rot_asm``): in fp32 with the tables converted it
  was a third of the loop's instructions.
* **Scores and values per warp by ``mma.sync``, the query heads as rows.** A warp holds its 16
  tokens of the key tile in the accumulator; that register layout *is* the B operand of
  ``S = Q K'^T`` (query heads padded to 16 rows, the head dim as the inner index), so the keys
  go to the next product without moving. ``S``'s accumulator is in turn ``P``'s operand layout
  for ``O = P H_v``, with the values read from the shared-memory stage (4-bit: decoded into the
  B operand as exact subnormal codes, ``gluon_q4._v_asm``, against ``p s``; the zeros' sums kept
  apart). Each warp keeps its own softmax lanes over its tokens; the four are merged once, at
  the program's end.
* **Copies streamed with ``cp.async``** into a ring of shared-memory stages (a tile's key and
  value latents and its cos/sin rows; plain ranks over 64 take one cos/sin buffer, read before
  the next copy starts, so that two programs fit an SM); the mask row and the 4-bit scales and
  zeros are loaded a tile ahead into registers.

Covers: fp16 and bf16, rotate-half RoPE over the whole head (head dim 64 or 128, the tables'
last dim contiguous), 2-16 query heads per KV head, any number of KV heads per latent group (a
program per KV head: the group's latent tiles are read by each of its KV heads' programs, from
L2 after the first), key and value ranks 32/64/128 per group, plain latents or 4-bit codes with
one quantization group per latent group (value rank 64 or 128), shared decode masks or none,
no softcap, no key bias or norm, one query token. ``applies`` says whether a call is covered;
everything else takes the other kernels. Gluon has no CPU interpreter: the kernel is tested on
the GPU and compiled for sm_90 without one (``tests/kernels/test_gluon_gqa.py``).
"""
from __future__ import annotations

import torch

try:  # Gluon ships with Triton >= 3.5; without it the Triton kernels serve every call
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma
    HAVE_GLUON = True
except ImportError:  # pragma: no cover (older Triton)
    HAVE_GLUON = False

from palu_fx.kernels.latent_attention.gluon_rope import call_fits, latent_args, operands_fit
from palu_fx.kernels.latent_attention.gluon_rope_layouts import copy_layout, swizzled_layout, thread_run_layout

if HAVE_GLUON:
    from palu_fx.kernels.latent_attention.gluon_q4 import (_BF16_UNSCALE, _BF16_UP, _F16_UNSCALE, _V_ASM,
                                                           _V_ASM_BF16, _decode)
    from palu_fx.kernels.latent_attention.gluon_rope import _latent_rows
    from palu_fx.kernels.latent_attention.gluon_rope_layouts import _key_channel, _pair_tables

__all__ = ["HAVE_GLUON", "MAX_HEADS", "applies", "launch", "value_words_layout"]

MAX_HEADS = 16  # query heads per KV head: the 16 rows of one ``mma.sync``


def _rot_asm(bf16: bool, minus: bool) -> str:
    """``$1 $2 + $3 $4`` (``minus``: ``- $3 $4``) on pairs of 16-bit values (a multiply, then an FMA;
    the negation folds into the FMA's operand): one RoPE output per channel pair, in the operand
    dtype as the model computes RoPE."""
    t = "bf16x2" if bf16 else "f16x2"
    neg = [".reg .b32 n;", f"neg.{t} n, $3;"] if minus else []
    return "\n".join(["{", ".reg .b32 t;", *neg, f"mul.rn.{t} t, $1, $2;",
                      f"fma.rn.{t} $0, {'n' if minus else '$3'}, $4, t;", "}"])


def value_words_layout(words: int):
    """[4, 16, words] (warp, token of the warp, code word) with thread (g, c) of a warp (lane 4 g + c)
    holding tokens 2c, 2c+1, 2c+8, 2c+9 (the first pair in adjacent registers, as ``_v_asm``
    decodes them) and words g (+8): the token and channel pairs of the value product's B operand."""
    regs = [[0, 1, 0], [0, 8, 0]] + ([[0, 0, 8]] if words == 16 else [])
    return gl.DistributedLinearLayout(regs, [[0, 2, 0], [0, 4, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
                                      [[1, 0, 0], [2, 0, 0]], [], [4, 16, words])


if HAVE_GLUON:
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
    _ROT_PLUS = gl.constexpr(_rot_asm(False, False))
    _ROT_MINUS = gl.constexpr(_rot_asm(False, True))
    _ROT_PLUS_BF16 = gl.constexpr(_rot_asm(True, False))
    _ROT_MINUS_BF16 = gl.constexpr(_rot_asm(True, True))

    @gluon.jit
    def _copy_rows(buf, base, stride, start, hi, W: gl.constexpr, LC: gl.constexpr):
        """Start the copy of a tile's rows (``W`` elements each, row ``t`` at ``base + t stride``) into
        ``buf``; rows past ``hi`` are clamped to the last token (real memory, masked out of the
        scores). 32-bit offsets from a 64-bit base (``applies`` checks they fit): one multiply-add
        per address fewer than ``gluon_rope``'s."""
        t = gl.minimum(start + gl.arange(0, 64, layout=gl.SliceLayout(1, LC)), hi - 1)
        c = gl.expand_dims(gl.arange(0, W, layout=gl.SliceLayout(0, LC)), 0)
        _async_load(buf, base + (gl.expand_dims(t * stride, 1) + c))

    @gluon.jit
    def _copy_stage(kbuf, vbuf, cbuf, sbuf, k_base, v_base, c_base, s_base, sk_s, sv_s, sc_s, ss_s, start, hi,
                    RK: gl.constexpr, RV: gl.constexpr, HALF: gl.constexpr, LCK: gl.constexpr, LCV: gl.constexpr,
                    LCC: gl.constexpr):
        """Start the copies of a tile's key and value latents and its cos/sin rows into one stage."""
        _copy_rows(kbuf, k_base, sk_s, start, hi, RK, LCK)
        _copy_rows(vbuf, v_base, sv_s, start, hi, RV, LCV)
        _copy_rows(cbuf, c_base, sc_s, start, hi, HALF, LCC)
        _copy_rows(sbuf, s_base, ss_s, start, hi, HALF, LCC)

    @gluon.jit
    def _partners(x, HALF: gl.constexpr):
        """[64, 2 HALF] in ``pair_of_column``'s order -> its two parts [64, HALF] (in-thread)."""
        return gl.split(gl.permute(gl.reshape(x, [64, 2, HALF]), [0, 2, 1]))

    @gluon.jit
    def _rot(a, b, c, d, MINUS: gl.constexpr, BF16: gl.constexpr):
        """``a b - c d`` (``MINUS``) or ``a b + c d``, two channels per instruction (``_rot_asm``; Gluon
        takes only a literal dtype for the result, hence the branches)."""
        if BF16:
            r = gl.inline_asm_elementwise(_ROT_MINUS_BF16 if MINUS else _ROT_PLUS_BF16, "=r,r,r,r,r", [a, b, c, d],
                                          dtype=gl.bfloat16, is_pure=True, pack=2)
        else:
            r = gl.inline_asm_elementwise(_ROT_MINUS if MINUS else _ROT_PLUS, "=r,r,r,r,r", [a, b, c, d],
                                          dtype=gl.float16, is_pure=True, pack=2)
        return r

    @gluon.jit
    def _rotated_keys(acc, csn, HALF: gl.constexpr, BF16: gl.constexpr):
        """RoPE on a tile's rebuilt keys [64, 2 HALF] (columns in ``pair_of_column``'s order: part 0
        the first partner of each pair, part 1 the second; ``csn`` the tile's cos (part 0) and sin
        (part 1) in the same order): ``(lo cos - hi sin, hi cos + lo sin)``, in place, in the
        operand dtype, two channels per instruction (``_rot_asm``)."""
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        lo, hi = _partners(acc.to(DT), HALF)
        c, s = _partners(csn.to(DT), HALF)
        k_lo = _rot(lo, c, hi, s, True, BF16)
        k_hi = _rot(hi, c, lo, s, False, BF16)
        return gl.reshape(gl.permute(gl.join(k_lo, k_hi), [0, 2, 1]), [64, 2 * HALF])

    @gluon.jit
    def _head_dim(n, HALF: gl.constexpr):
        """Head dim held at column ``n`` of the rebuilt keys (and the query's): ``part HALF + pair``
        of ``gluon_rope.pair_of_column``."""
        nn = n % HALF
        return (n // HALF) * HALF + (HALF // 4) * ((nn // 2) % 4) + 2 * (nn // 8) + nn % 2

    @gluon.jit
    def _mask_rows(mask_ptr, m_off, sm_k, tok, hi, MASK_KIND: gl.constexpr):
        """(keep, additive base-2 term) of tokens ``tok`` (any layout), fp32."""
        keep = tok < hi
        madd = tok.to(gl.float32) * 0.0
        if MASK_KIND == 3:  # keep flags
            keep = keep & (gl.load(mask_ptr + m_off + tok * sm_k, mask=keep, other=0) != 0)
        elif MASK_KIND == 4:  # additive
            madd = gl.load(mask_ptr + m_off + tok * sm_k, mask=keep, other=0.0).to(gl.float32) * 1.4426950408889634
        return keep, madd

    @gluon.jit
    def _scales(ks_ptr, kz_ptr, vs_ptr, vz_ptr, off, ss_s, tok_k, tok_v, hi, BITS: gl.constexpr):
        """A tile's per-token key scales and zeros (``tok_k``'s layout: the key operand's rows) and
        value scales and zeros (``tok_v``'s: the value product's), fp32; zeros for plain latents."""
        sk = tok_k.to(gl.float32) * 0.0
        zk, sv, zv = sk, tok_v.to(gl.float32) * 0.0, tok_v.to(gl.float32) * 0.0
        if BITS == 4:
            sk, zk = _per_token(ks_ptr, off, ss_s, tok_k, hi), _per_token(kz_ptr, off, ss_s, tok_k, hi)
            sv, zv = _per_token(vs_ptr, off, ss_s, tok_v, hi), _per_token(vz_ptr, off, ss_s, tok_v, hi)
        return sk, zk, sv, zv

    @gluon.jit
    def _per_token(ptr, off, stride, tok, hi):
        """One value per token (``tok``'s layout), fp32; 0 past ``hi``."""
        return gl.load(ptr + off + tok * stride, mask=tok < hi, other=0.0).to(gl.float32)

    @gluon.jit
    def _value_codes(w, OP_B: gl.constexpr, BF16: gl.constexpr):
        """Value code words [4, 16, W] (``value_words_layout``: thread (g, c) of a warp holds its
        tokens 2c, 2c+1 (+8) and words g (+8)) -> the value product's B operand [4, 16, 8 W] of
        exact subnormal codes (``gluon_q4._v_asm``: fp16 ``c 2^-24``, odd channels times 16; bf16
        ``c 2^-133``); column n = 64 m + 8 j + g holds channel j of word g + 8 m (``value_channel``)."""
        x = _decode(w, _V_ASM_BF16 if BF16 else _V_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", 2, BF16)
        W: gl.constexpr = w.shape[2]
        x = gl.reshape(x, [4, 16, W // 8, 8, 2, 2, 2])  # (m, g, e, i, k): channel 4 k + 2 i + e of word g + 8 m
        x = gl.permute(x, [0, 1, 2, 6, 5, 4, 3])  # (m, k, i, e, g)
        return gl.convert_layout(gl.reshape(x, [4, 16, 8 * W]), OP_B)

    @gluon.jit
    def gqa_rope_decode_kernel(
        q_ptr, lk_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, cos_ptr, sin_ptr, mask_ptr, out_ptr, part_ptr,
        lse_ptr, sq_b, sq_h, sq_d, slk_g, slk_d, slk_r, sk_b, sk_s, sv_b, sv_s, ss_b, ss_s,
        sc_b, sc_s, ssn_b, ssn_s, sm_b, sm_k, so_b, so_h,
        Hkv, Skv, chunk, NSPLIT, scale,
        RK: gl.constexpr, RV: gl.constexpr, HALF: gl.constexpr, QPG: gl.constexpr, GS: gl.constexpr,
        STAGES: gl.constexpr, ONE_TABLE: gl.constexpr,
        MASK_KIND: gl.constexpr, DIRECT: gl.constexpr, BF16: gl.constexpr, BITS: gl.constexpr,
        RUN_K: gl.constexpr, VW_L: gl.constexpr, CS_L: gl.constexpr, LCK: gl.constexpr, LCV: gl.constexpr,
        LCC: gl.constexpr,
        SWK: gl.constexpr, SWV: gl.constexpr, SWC: gl.constexpr,
    ):
        # one program: sequence b, KV head kvh (its QPG query heads; head j of latent group grp, whose
        # latents its GS KV heads each read), tokens [lo, hi) of split pid_s. ONE_TABLE: the cos/sin
        # rows copied into one buffer, read before the next tile's copy starts (STAGES 2; ranks over 64:
        # 112 KB instead of 128, two programs per SM). BITS 4: k_ptr / v_ptr the codes as int32 words
        # (word strides), ss_*: scales and zeros [B, S, groups] (shared strides, checked by the host)
        D: gl.constexpr = 2 * HALF
        MH: gl.constexpr = 16  # query heads as the rows of the per-warp products (padded)
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
        A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
        # per-warp products: dim 0 is the warp (its 16 token rows of the key tile)
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1, 1], instr_shape=[1, 16, 8])
        OP_A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        OP_B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
        TOK: gl.constexpr = gl.SliceLayout(1, MMA)  # [4, 16]: (warp, token of the warp)
        HEAD: gl.constexpr = gl.SliceLayout(2, MMA)  # [4, MH]: (warp, query head)
        LW: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0])
        LQ: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 4, 8], [4, 1, 1], [2, 1, 0])
        KW: gl.constexpr = RK // 8 if BITS == 4 else RK  # copied elements per token
        VW: gl.constexpr = RV // 8 if BITS == 4 else RV
        KT: gl.constexpr = gl.int32 if BITS == 4 else DT

        pid_s = gl.program_id(0)
        pid_x = gl.program_id(1)
        b = (pid_x // Hkv).to(gl.int64)
        kvh = pid_x % Hkv
        grp = kvh // GS
        lo = pid_s * chunk
        hi = gl.minimum(lo + chunk, Skv)

        # L^T of the KV head, once: rows in the key operand's inner order (_key_channel), columns
        # in pair_of_column's (a thread's accumulator holds both partners of its pairs)
        WL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([RK, D], DT)
        mch = _key_channel(gl.arange(0, RK, layout=gl.SliceLayout(1, LW)), RK, BITS)
        n = gl.arange(0, D, layout=gl.SliceLayout(0, LW))
        dim = _head_dim(n, HALF) + (kvh % GS) * D  # (the KV head's rows of its group's L_k)
        lt = gl.load(lk_ptr + grp * slk_g + gl.expand_dims(mch * slk_r, 1) + gl.expand_dims(dim * slk_d, 0))
        lt_s = gl.allocate_shared_memory(DT, [RK, D], WL, lt)
        # the query heads as rows (zero past QPG), the head dim in the same column order, every warp a copy
        hq = gl.arange(0, MH, layout=gl.SliceLayout(1, gl.SliceLayout(0, LQ)))
        nq = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(0, LQ)))
        dq = _head_dim(nq, HALF)
        q2 = gl.load(q_ptr + b * sq_b + gl.expand_dims((kvh * QPG + hq) * sq_h, 1) + gl.expand_dims(dq * sq_d, 0),
                     mask=gl.expand_dims(hq < QPG, 1), other=0.0)
        q3 = gl.expand_dims(q2, 0) + gl.zeros([4, MH, D], DT, LQ)
        qa = gl.convert_layout(q3, OP_A)
        fence_async_shared()
        _barrier()

        kbuf = gl.allocate_shared_memory(KT, [STAGES, 64, KW], SWK)
        vbuf = gl.allocate_shared_memory(KT, [STAGES, 64, VW], SWV)
        TS: gl.constexpr = 1 if ONE_TABLE else STAGES
        cbuf = gl.allocate_shared_memory(cos_ptr.dtype.element_ty, [TS, 64, HALF], SWC)
        sbuf = gl.allocate_shared_memory(cos_ptr.dtype.element_ty, [TS, 64, HALF], SWC)
        k_base = k_ptr + (b * sk_b + grp * KW)
        v_base = v_ptr + (b * sv_b + grp * VW)
        s_off = b * ss_b + grp
        c_base = cos_ptr + b * sc_b
        s_base = sin_ptr + b * ssn_b
        m_off = b * sm_b
        n_tiles = gl.cdiv(hi - lo, 64)
        for i in gl.static_range(STAGES - 1):
            _copy_stage(kbuf.index(i), vbuf.index(i), cbuf.index(i), sbuf.index(i), k_base, v_base, c_base, s_base,
                        sk_s, sv_s, sc_s, ssn_s, lo + i * 64, hi, KW, VW, HALF, LCK, LCV, LCC)
            cp.commit_group()

        wv = gl.arange(0, 4, layout=gl.SliceLayout(1, TOK))
        tv = gl.arange(0, 16, layout=gl.SliceLayout(0, TOK))
        tok_n = lo + gl.expand_dims(wv * 16, 1) + gl.expand_dims(tv, 0)  # [4, 16]: row 16 w + t of a tile
        keep_n, madd_n = _mask_rows(mask_ptr, m_off, sm_k, tok_n, hi, MASK_KIND)
        tk_n = lo + gl.arange(0, 64, layout=gl.SliceLayout(1, RUN_K))  # the key operand's rows
        sk_n, zk_n, sv_n, zv_n = _scales(ks_ptr, kz_ptr, vs_ptr, vz_ptr, s_off, ss_s, tk_n, tok_n, hi, BITS)
        m_i = gl.full([4, MH], float("-inf"), gl.float32, HEAD)
        l_i = gl.zeros([4, MH], gl.float32, HEAD)
        z_i = gl.zeros([4, MH], gl.float32, HEAD)  # 4 bits: sum_t p_t z_t (the values' zeros)
        o_i = gl.zeros([4, MH, RV], gl.float32, MMA)
        qscale = scale * 1.4426950408889634
        for it in range(n_tiles):
            stage = it % STAGES
            nxt = (it + STAGES - 1) % STAGES
            if ONE_TABLE:
                cp.wait_group(0)
                _barrier()  # this tile's copies are visible; every thread is done with the last one's stage
                csn = _pair_tables(cbuf.index(0).load(CS_L), sbuf.index(0).load(CS_L), HALF, ACC)
                _barrier()  # the tables are read: the next copy may overwrite them
                _copy_stage(kbuf.index(nxt), vbuf.index(nxt), cbuf.index(0), sbuf.index(0), k_base, v_base, c_base,
                            s_base, sk_s, sv_s, sc_s, ssn_s, lo + (it + 1) * 64, hi, KW, VW, HALF, LCK, LCV, LCC)
                cp.commit_group()
            else:
                _barrier()  # every thread is done with the stage the next copy overwrites
                _copy_stage(kbuf.index(nxt), vbuf.index(nxt), cbuf.index(nxt), sbuf.index(nxt), k_base, v_base,
                            c_base, s_base, sk_s, sv_s, sc_s, ssn_s, lo + (it + STAGES - 1) * 64, hi, KW, VW, HALF,
                            LCK, LCV, LCC)
                cp.commit_group()
                cp.wait_group(STAGES - 1)
                _barrier()  # every thread's copies of this tile are visible
            keep, madd = keep_n, madd_n  # this tile's mask, loaded a tile ahead (its latency hidden)
            tok_n = tok_n + 64
            keep_n, madd_n = _mask_rows(mask_ptr, m_off, sm_k, tok_n, hi, MASK_KIND)
            sk, zk, sv, zv = sk_n, zk_n, sv_n, zv_n
            tk_n = tk_n + 64
            sk_n, zk_n, sv_n, zv_n = _scales(ks_ptr, kz_ptr, vs_ptr, vz_ptr, s_off, ss_s, tk_n, tok_n, hi, BITS)

            a = gl.convert_layout(_latent_rows(kbuf.index(stage), sk, zk, RK, BITS, RUN_K, BF16, DT), A_OP)
            acc = warpgroup_mma(a, lt_s, gl.zeros([64, D], gl.float32, ACC), use_acc=False)
            if not ONE_TABLE:
                csn = _pair_tables(cbuf.index(stage).load(CS_L), sbuf.index(stage).load(CS_L), HALF, ACC)
            k = _rotated_keys(acc, csn, HALF, BF16)
            kb = gl.convert_layout(gl.permute(gl.reshape(k, [4, 16, D]), [0, 2, 1]), OP_B)  # [warp, D, token]
            s = mma_v2(qa, kb, gl.zeros([4, MH, 16], gl.float32, MMA))

            t = gl.where(gl.expand_dims(keep, 1), s * qscale + gl.expand_dims(madd, 1), float("-inf"))
            m_new = gl.maximum(m_i, gl.max(t, axis=2))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(t - gl.expand_dims(m_use, 2))
            alpha = gl.exp2(m_i - m_use)
            l_i = l_i * alpha + gl.sum(p, axis=2)
            m_i = m_new
            if BITS == 4:  # sum_t p_t (s_t c_t + z_t) = sum_t (p_t s_t) c_t + sum_t p_t z_t
                v = _value_codes(vbuf.index(stage).reshape([4, 16, VW]).load(VW_L), OP_B, BF16)
                z_i = z_i * alpha + gl.sum(p * gl.expand_dims(zv, 1), axis=2)
                ps = p * gl.expand_dims(sv * _BF16_UP if BF16 else sv, 1)  # (bf16 codes: c 2^-133)
                o_i = mma_v2(gl.convert_layout(ps.to(DT), OP_A), v, o_i * gl.expand_dims(alpha, 2))
            else:
                v = vbuf.index(stage).reshape([4, 16, RV]).load(OP_B)
                o_i = mma_v2(gl.convert_layout(p.to(DT), OP_A), v, o_i * gl.expand_dims(alpha, 2))
        cp.wait_group(0)

        if BITS == 4:  # the codes' scale undone, the zeros' sums added; channels: value_channel(n)
            n3 = gl.arange(0, RV, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
            if BF16:
                unscale = n3.to(gl.float32) * 0.0 + _BF16_UNSCALE
            else:
                unscale = gl.where((n3 // 8) % 2 == 1, _F16_UNSCALE / 16, _F16_UNSCALE)
            o_i = o_i * gl.expand_dims(gl.expand_dims(unscale, 0), 1) + gl.expand_dims(z_i, 2)
        # merge the four warps' softmax lanes
        mx = gl.max(m_i, axis=0)
        m_fin = gl.where(mx == float("-inf"), 0.0, mx)
        w = gl.exp2(m_i - gl.expand_dims(m_fin, 0))
        l = gl.sum(l_i * w, axis=0)
        o = gl.sum(o_i * gl.expand_dims(w, 2), axis=0)  # [MH, RV]
        LO: gl.constexpr = o.type.layout
        h = gl.arange(0, MH, layout=gl.SliceLayout(1, LO))
        n = gl.arange(0, RV, layout=gl.SliceLayout(0, LO))
        ch = 64 * (n // 64) + 8 * (n % 8) + (n // 8) % 8 if BITS == 4 else n
        lh = gl.convert_layout(l, gl.SliceLayout(1, LO))
        mh = gl.convert_layout(mx, gl.SliceLayout(1, LO))
        empty = lh == 0.0
        val = o / gl.expand_dims(gl.where(empty, 1.0, lh), 1)
        ok = gl.expand_dims(h < QPG, 1) & gl.expand_dims(ch < RV, 0)
        if DIRECT:
            off = b * so_b + gl.expand_dims((kvh * QPG + h) * so_h, 1) + gl.expand_dims(ch, 0)
            gl.store(out_ptr + off, val.to(out_ptr.dtype.element_ty), mask=ok)
        else:  # row slot * QPG + h of the splits' partials, with its base-2 LSE
            row = (pid_x * NSPLIT + pid_s) * QPG + h
            gl.store(part_ptr + gl.expand_dims(row * RV, 1) + gl.expand_dims(ch, 0), val, mask=ok)
            lse = gl.where(empty, float("-inf"), mh + gl.log2(gl.where(empty, 1.0, lh)))
            gl.store(lse_ptr + row, lse, mask=h < QPG)


def applies(q, kl, vl, lk, k_bias, k_norm_weight, cos, sin, rope_style, softcap, is_causal, mask_kind, groups,
            interpret) -> bool:
    """Whether ``gqa_rope_decode_kernel`` serves a fused call (see the module docstring)."""
    B, Hq, Sq, D = q.shape
    if not call_fits(q, lk, k_bias, k_norm_weight, cos, sin, rope_style, softcap, is_causal, mask_kind, interpret):
        return False
    hkv = lk.shape[1] // D * groups
    if lk.shape[0] != groups or lk.shape[1] % D or Hq % hkv or not 2 <= Hq // hkv <= MAX_HEADS:
        return False  # (one query head per KV head, multi-head attention: ``gluon_rope.py``)
    rk, rv = lk.shape[-1], vl.channels // groups
    if kl.bits and rv not in (64, 128):  # (4-bit value words spread over the 8 lanes of a quad row)
        return False
    rows = [kl.data, vl.data, cos, sin] + ([kl.scale, vl.scale] if kl.bits else [])
    if any(t.shape[1] * t.stride(1) >= 2 ** 31 for t in rows):
        return False  # (a sequence's row offsets are 32-bit)
    return operands_fit(q, kl, vl, cos, sin, rk, rv, groups)


def launch(q, lk, kl, vl, cos, sin, mask_kind, mask, sm_b, sm_k, scale, out, nsplit, chunk, part, lse, stages=2,
           probe=False):
    """Launch over ``nsplit`` splits of ``chunk`` tokens; ``part``/``lse``: the split partials, one
    row per query head of a program (its KV head's), as ``common.combine_splits_kernel`` reads
    them. ``cos``/``sin``: [B, S, D] (broadcast strides allowed). ``probe``: return (kernel, grid,
    args, constexprs)."""
    B, Hq, _, D = q.shape
    half = D // 2
    groups, gsd, rk = lk.shape
    gs = gsd // D  # KV heads per latent group
    hkv = groups * gs
    rv = vl.channels // groups
    bits, (kd, vd, ks, kz, vs, vz), ss, (kw, vw, eb) = latent_args(q, kl, vl, rk, rv)
    one_table = bits == 16 and max(rk, rv) > 64  # (plain stages of rank 128 fill the shared memory)
    tb = cos.element_size()
    grid = (nsplit, B * hkv)
    args = (q, lk, kd, vd, ks, kz, vs, vz, cos, sin, mask, out, part, lse,
            q.stride(0), q.stride(1), q.stride(3), lk.stride(0), lk.stride(1), lk.stride(2),
            kd.stride(0), kd.stride(1), vd.stride(0), vd.stride(1), *ss,
            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), sm_b, sm_k, out.stride(0), out.stride(1),
            hkv, kd.shape[1], chunk, nsplit, float(scale))
    consts = dict(RK=rk, RV=rv, HALF=half, QPG=Hq // hkv, GS=gs, STAGES=2 if one_table else stages,
                  ONE_TABLE=one_table, MASK_KIND=mask_kind, DIRECT=nsplit == 1,
                  BF16=q.dtype == torch.bfloat16, BITS=bits, RUN_K=thread_run_layout(kw),
                  VW_L=value_words_layout(vw) if bits == 4 else None, CS_L=thread_run_layout(half),
                  LCK=copy_layout(kw, eb), LCV=copy_layout(vw, eb), LCC=copy_layout(half, tb),
                  SWK=swizzled_layout(kw, eb), SWV=swizzled_layout(vw, eb), SWC=swizzled_layout(half, tb), num_warps=4)
    if probe:
        return gqa_rope_decode_kernel, grid, args, consts
    gqa_rope_decode_kernel[grid](*args, **consts)
