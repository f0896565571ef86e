"""Gluon decode kernel: absorbed attention (no RoPE) over a 4-bit latent cache.

Why a second kernel for calls that ``per_head.py`` and ``absorbed.py`` already serve: those
Triton kernels spent their time on the layout of each token tile, not on the bytes (H200,
B=8 x 32k: 0.42 ms where the packed bytes need 0.15, 62% of cycles waiting on a dependent
instruction). Triton picks the register layouts itself: the dequantized codes went to the
tensor cores through shared memory, and the softmax reductions spanned four warps. Gluon
(Triton's layout-explicit dialect, on both Triton stacks we support) lets the kernel choose
them; this one takes 0.16-0.18 ms there (RESULTS.md, issue 5):

* **One warp per program, ``mma.sync`` with both operands in registers.** A program is one
  sequence, 1-4 latent groups (their query heads are the 8 columns of the products) and one
  split of the tokens; its softmax reductions are warp shuffles.
* **Codes decoded straight into the operand layout.** The loads' layouts give each thread
  the code words its operand fragment needs, and the channel order inside the products is
  permuted to what one 32-bit word gives a thread (``key_channel``, ``value_channel``); the
  query and the output columns take the same permutation, so nothing moves between threads.
  Keys: scores are ``tokens x heads = codes x query``; values: ``channels x heads = codes^T x
  weights``, where one byte permute of two tokens' words gives one channel of both.
* **Codes as exact subnormals.** The code bits go under a zero exponent: fp16 ``c 2^-24`` (a
  high nibble, 4 bits up, arrives as ``16 c 2^-24``: its query channel is divided by 16 and
  its output channel at the end), bf16 ``c 2^-133`` (the other operand times 2^100 keeps the
  fp32 products normal). An AND or two per register, no offset to subtract: five
  instructions per 8 key codes and three per 4 value codes in fp16.
* **Scales and zeros stay out of the products.** Per-token asymmetric codes give
  ``q . (s c + z) = s (q . c) + z sum(q)`` and ``sum_t p_t (s_t c_t + z_t) = sum_t (p_t s_t) c_t +
  sum_t p_t z_t``: the scales multiply the score tile and the weights, and the zeros add one
  running sum per query head.
* **Codes streamed with ``cp.async``** into a ring of shared-memory stages (swizzled so that
  the operand loads hit 32 distinct banks); the small per-token vectors (scales, zeros, the
  decode mask row) are loaded a tile ahead into registers.

Covers: fp16 and bf16 queries, 4-bit keys and values with one quantization group per Palu
group's latent (``group_size == rank``), rank 64-256 in steps of 64, up to 8 query heads per
group or a multiple of 8 (MHA, GQA, MQA; a group's heads then span programs of 8), shared
decode masks or none, no softcap, one query token. ``applies`` says whether a call is
covered; anything else takes the Triton kernels. Gluon has no CPU interpreter: the kernel is
tested on the GPU, its PTX sequences on the CPU by an emulator, and it is compiled for sm_90
without a GPU (``tests/kernels/test_gluon_q4.py``).
"""
from __future__ import annotations

import torch

try:  # Gluon ships with Triton >= 3.5; without it the Triton kernels serve every call
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    HAVE_GLUON = True
except ImportError:  # pragma: no cover (older Triton)
    HAVE_GLUON = False

__all__ = ["HAVE_GLUON", "applies", "launch"]

LOG2E = 1.4426950408889634


def _k_asm(bf16: bool = False) -> str:
    """One word of 8 codes (channel j in nibble j) -> 8 16-bit outputs, output o = channel
    ``o // 2 + 4 (o % 2)``, in pairs that share a register. The code bits go straight into the
    mantissa under a zero exponent, so each half is a subnormal: exact, with no offset to
    subtract. Half 0 of a register comes from bits 0-15 of the word and half 1 from bits 16-31,
    so one AND gives channels (0, 4). fp16 (10 mantissa bits): ``c 2^-24`` for even channels and
    ``16 c 2^-24`` for odd ones (their bits sit 4 higher): another AND gives (1, 5), and the
    word shifted by 8 gives (2, 6) and (3, 7), five instructions per 8 codes. bf16 (7 mantissa
    bits, where a high nibble would reach the exponent): every pair is shifted down to bits
    0-3, ``c 2^-133``, seven instructions."""
    if bf16:
        lines = ["{", ".reg .b32 r, s;"]
        for p in range(4):
            src = "$8" if p == 0 else "s"
            lines += ([] if p == 0 else [f"shr.b32 s, $8, {4 * p};"]) + [
                f"and.b32 r, {src}, 0x000f000f;", f"mov.b32 {{${2 * p}, ${2 * p + 1}}}, r;"]
        return "\n".join(lines + ["}"])
    lines = ["{", ".reg .b32 r, s;", "shr.b32 s, $8, 8;"]
    for p, (src, mask) in enumerate([("$8", "0x000f000f"), ("$8", "0x00f000f0"), ("s", "0x000f000f"),
                                     ("s", "0x00f000f0")]):
        lines += [f"and.b32 r, {src}, {mask};", f"mov.b32 {{${2 * p}, ${2 * p + 1}}}, r;"]
    return "\n".join(lines + ["}"])


def _v_asm(bf16: bool = False) -> str:
    """Two tokens' words ($8, $9) -> 8 registers of two 16-bit subnormals, register ``j`` =
    channel ``j`` of both tokens: a byte permute puts byte b of each word in bytes 0 and 2, and
    ANDs keep the low or the high nibbles. fp16: ``c 2^-24`` for even channels, ``16 c 2^-24``
    for odd ones, three instructions per 4 codes; bf16: the high nibbles shifted down first,
    ``c 2^-133``, four."""
    lines = ["{", ".reg .b32 p, t;"]
    for b in range(4):
        lines += [f"prmt.b32 p, $8, $9, 0x{4 + b}{4 + b}{b}{b};", f"and.b32 ${2 * b}, p, 0x000f000f;"]
        if bf16:
            lines += ["shr.b32 t, p, 4;", f"and.b32 ${2 * b + 1}, t, 0x000f000f;"]
        else:
            lines += [f"and.b32 ${2 * b + 1}, p, 0x00f000f0;"]
    return "\n".join(lines + ["}"])


def key_channel(kappa: torch.Tensor) -> torch.Tensor:
    """Latent channel of the key product's inner index ``kappa`` (``_k_operand``'s order); the
    codes of the channels with ``(kappa // 8) % 2 == 1`` arrive times 16."""
    s, i, t, e = kappa // 16, (kappa // 8) % 2, (kappa // 2) % 4, kappa % 2
    return 8 * (4 * (s // 2) + t) + 2 * (s % 2) + i + 4 * e


def value_channel(n: torch.Tensor) -> torch.Tensor:
    """Latent channel of the value product's output row ``n`` (``_v_operand``'s order)."""
    return 64 * (n // 64) + 8 * (n % 8) + (n // 8) % 8


if HAVE_GLUON:
    _K_ASM = gl.constexpr(_k_asm())
    _V_ASM = gl.constexpr(_v_asm())
    _K_ASM_BF16 = gl.constexpr(_k_asm(bf16=True))
    _V_ASM_BF16 = gl.constexpr(_v_asm(bf16=True))
    # renamed after Triton 3.6 (the GPU machine's): the names of the version installed
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
    # the scales the products come out at: fp16 codes are c 2^-24; bf16 codes are c 2^-133 and
    # meet operands times 2^100, which keeps their fp32 products normal
    _F16_UNSCALE = gl.constexpr(2.0 ** 24)
    _BF16_UP = gl.constexpr(2.0 ** 100)
    _BF16_UNSCALE = gl.constexpr(2.0 ** 33)

    @gluon.jit
    def _decode(w, ASM: gl.constexpr, CONSTRAINTS: gl.constexpr, PACK: gl.constexpr, BF16: gl.constexpr):
        """Code words [S, W] -> their 8 outputs per word (``_k_asm`` / ``_v_asm``), stacked
        [S, W, e, i, k] with output ``4k + 2i + e`` at (e, i, k)."""
        if BF16:
            o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(ASM, CONSTRAINTS, [w], dtype=(gl.bfloat16, ) * 8,
                                                                       is_pure=True, pack=PACK)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(ASM, CONSTRAINTS, [w], dtype=(gl.float16, ) * 8,
                                                                       is_pure=True, pack=PACK)
        lo = gl.join(gl.join(o0, o1), gl.join(o2, o3))
        hi = gl.join(gl.join(o4, o5), gl.join(o6, o7))
        return gl.join(lo, hi)

    @gluon.jit
    def _k_operand(w, A_L: gl.constexpr, BF16: gl.constexpr):
        """Code words [S, W] (thread (g, t) holds tokens g + 8r, words t + 4m) -> the key
        operand [S, 8 W] (fp16 codes 2^-24, bf16 codes 2^-133) in ``A_L``; inner index kappa =
        16 (2m + k) + 8 i + 2 t + e holds channel 8 (4m + t) + 2k + i + 4e (``key_channel``),
        in fp16 times 16 where i = 1."""
        x = _decode(w, _K_ASM_BF16 if BF16 else _K_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r", 1, BF16)
        S: gl.constexpr = w.shape[0]
        W: gl.constexpr = w.shape[1]
        x = gl.reshape(x, [S, W // 4, 4, 2, 2, 2])  # (m, t, e, i, k)
        x = gl.permute(x, [0, 1, 5, 4, 2, 3])  # (m, k, i, t, e)
        return gl.convert_layout(gl.reshape(x, [S, W * 8]), A_L)

    @gluon.jit
    def _v_operand(w, A_L: gl.constexpr, BF16: gl.constexpr):
        """Code words [S, W] (thread (g, t) holds tokens 2t, 2t+1 (+ 8r), words g + 8m) -> the
        transposed value operand [8 W, S] (fp16 codes 2^-24, bf16 codes 2^-133) in ``A_L``; row
        n = 64 m + 8 j + g holds channel 64 m + 8 g + j (``value_channel``), in fp16 odd j times 16."""
        # pack=2: the two tokens a thread holds in a row pair share one call (and each output register)
        x = _decode(w, _V_ASM_BF16 if BF16 else _V_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", 2, BF16)
        S: gl.constexpr = w.shape[0]
        W: gl.constexpr = w.shape[1]
        x = gl.reshape(x, [S, W // 8, 8, 2, 2, 2])  # (m, g, e, i, k)
        x = gl.permute(x, [1, 5, 4, 3, 2, 0])  # (m, k, i, e, g, S)
        return gl.convert_layout(gl.reshape(x, [W * 8, S]), A_L)

    @gluon.jit
    def _vectors(ks_ptr, kz_ptr, vs_ptr, vz_ptr, s_off, s_stride, mask_ptr, m_off, sm_k, tok, hi, cols,
                 QPG: gl.constexpr, NCOL: gl.constexpr, MASK_KIND: gl.constexpr):
        """Per-token key/value scales and zeros [S, 8] (column = query head of the program, which
        reads its group's, fp32) and the shared mask row [S] of tokens ``tok``."""
        ok = tok < hi
        ok2 = gl.expand_dims(ok, 1) & gl.expand_dims(cols < NCOL, 0)
        off = s_off + gl.expand_dims(tok, 1) * s_stride + gl.expand_dims(cols // QPG, 0)
        sk = gl.load(ks_ptr + off, mask=ok2, other=0.0).to(gl.float32)
        zk = gl.load(kz_ptr + off, mask=ok2, other=0.0).to(gl.float32)
        sv = gl.load(vs_ptr + off, mask=ok2, other=0.0).to(gl.float32)
        zv = gl.load(vz_ptr + off, mask=ok2, other=0.0).to(gl.float32)
        if MASK_KIND == 3:  # keep flags
            m = (gl.load(mask_ptr + m_off + tok * sm_k, mask=ok, other=0) != 0).to(gl.float32)
        elif MASK_KIND == 4:  # additive
            m = gl.load(mask_ptr + m_off + tok * sm_k, mask=ok, other=0.0).to(gl.float32)
        else:
            m = tok.to(gl.float32) * 0.0
        return sk, zk, sv, zv, m

    @gluon.jit
    def _copy_tile(kbuf, vbuf, k_ptr, v_ptr, kw_off, vw_off, sk_tok, sv_tok, start, hi, LC: gl.constexpr,
                   BLOCK_S: gl.constexpr, WROW: gl.constexpr):
        """Start the asynchronous copies of a token tile's code words (rows past ``hi`` are
        clamped to the last token: real memory, masked out of the scores)."""
        tok = start + gl.arange(0, BLOCK_S, layout=gl.SliceLayout(1, LC))
        tok = gl.minimum(tok, hi - 1)
        col = gl.expand_dims(gl.arange(0, WROW, layout=gl.SliceLayout(0, LC)), 0)
        row = gl.expand_dims(tok, 1).to(gl.int64)
        _async_load(kbuf, k_ptr + kw_off + row * sk_tok + col)
        _async_load(vbuf, v_ptr + vw_off + row * sv_tok + col)

    @gluon.jit
    def _value_step(vt, h: gl.constexpr, W: gl.constexpr, LV: gl.constexpr, A_L: gl.constexpr, wv, o, alpha,
                    BF16: gl.constexpr):
        v = _v_operand(vt.slice(h * W, W, dim=1).load(LV), A_L, BF16)
        return mma_v2(v, wv, o * gl.expand_dims(alpha, 0))

    @gluon.jit
    def store_output(val, l, m, ch, out_ptr, out_off, part_ptr, lse_ptr, row, RV: gl.constexpr, DIRECT: gl.constexpr):
        """A query head's output ``val / l`` at channels ``ch`` (zeros where it saw no token), final
        or as row ``row`` of a split's partials with its base-2 LSE ``m + log2 l`` (as
        ``common.combine_splits_kernel`` reads them, ``RV`` channels per row)."""
        empty = l == 0.0
        val = val / gl.where(empty, 1.0, l)
        if DIRECT:
            gl.store(out_ptr + out_off + ch, val.to(out_ptr.dtype.element_ty))
        else:
            gl.store(part_ptr + row * RV + ch, val)
            gl.store(lse_ptr + row, gl.where(empty, float("-inf"), m + gl.log2(gl.where(empty, 1.0, l))))

    @gluon.jit
    def _finish_head(o, h: gl.constexpr, cols, m_i, l_i, z_i, out_ptr, out_off, part_ptr, lse_ptr, slot,
                     NCOL: gl.constexpr, R: gl.constexpr, RV_P: gl.constexpr, DIRECT: gl.constexpr,
                     MMA: gl.constexpr, BF16: gl.constexpr):
        """Query head ``h``'s output (column ``h`` of its group's [R, 8] accumulator): channel
        order restored, the scale of the codes undone (fp16: 2^-24, 2^-20 for odd channels; bf16:
        2^-133 against weights times 2^100), the zeros' sum added, normalized; stored final or as
        a split's partial with its base-2 LSE."""
        sel = gl.expand_dims(cols == h, 0)
        col = gl.sum(gl.where(sel, o, 0.0), axis=1)  # [R]
        pick = cols == h
        l = gl.sum(gl.where(pick, l_i, 0.0), axis=0)
        z = gl.sum(gl.where(pick, z_i, 0.0), axis=0)
        m = gl.sum(gl.where(pick, m_i, 0.0), axis=0)
        n = gl.arange(0, R, layout=gl.SliceLayout(1, MMA))
        j = (n // 8) % 8
        ch = 64 * (n // 64) + 8 * (n % 8) + j
        if BF16:
            val = col * _BF16_UNSCALE + z
        else:
            val = col * gl.where(j % 2 == 1, _F16_UNSCALE / 16, _F16_UNSCALE) + z
        store_output(val, l, m, ch, out_ptr, out_off, part_ptr, lse_ptr, slot * NCOL + h, RV_P, DIRECT)

    @gluon.jit
    def _finish_group(o, gg: gl.constexpr, cols, m_i, l_i, z_i, out_ptr, out_off, so_h, part_ptr, lse_ptr, slot,
                      QPG: gl.constexpr, NCOL: gl.constexpr, R: gl.constexpr, DIRECT: gl.constexpr,
                      MMA: gl.constexpr, BF16: gl.constexpr):
        """The outputs of group ``gg``'s query heads (columns gg QPG ..)."""
        for j in gl.static_range(QPG):
            _finish_head(o, gg * QPG + j, cols, m_i, l_i, z_i, out_ptr, out_off + (gg * QPG + j) * so_h, part_ptr,
                         lse_ptr, slot, NCOL, R, R, DIRECT, MMA, BF16)

    @gluon.jit
    def q4_absorbed_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, mask_ptr, out_ptr, part_ptr, lse_ptr,
        sq_b, sq_h, sq_d, sk_b, sk_s, sv_b, sv_s, ss_b, ss_s, sm_b, sm_k, so_b, so_h,
        Hq, Skv, chunk, NSPLIT, scale,
        R: gl.constexpr, GP: gl.constexpr, QPG: gl.constexpr, BLOCK_S: gl.constexpr, STAGES: gl.constexpr,
        MASK_KIND: gl.constexpr, DIRECT: gl.constexpr, BF16: gl.constexpr = False, SPLIT_H: gl.constexpr = 1,
    ):
        # k_ptr / v_ptr: the codes as int32 words; strides in words. ss_*: scales and zeros
        # (key and value scales/zeros share strides, checked by the host)
        # a program: GP latent groups of one sequence, each read by QPG query heads (its columns);
        # SPLIT_H > 1 (GP 1): a group's query heads span SPLIT_H programs of QPG heads each
        NCOL: gl.constexpr = GP * QPG
        W: gl.constexpr = R // 8  # code words per token and group
        WROW: gl.constexpr = GP * W  # words of the program's groups per token
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
        LK: gl.constexpr = gl.BlockedLayout([1, 1], [8, 4], [1, 1], [1, 0])
        LV: gl.constexpr = gl.BlockedLayout([2, 1], [4, 8], [1, 1], [0, 1])
        TW: gl.constexpr = WROW // 4 if WROW // 4 < 32 else 32
        LC: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TW, TW], [1, 1], [1, 0])
        LQ: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [1, 1], [1, 0])
        # XOR of 16-byte chunks by row: the operand loads of a warp touch 32 distinct banks
        SWZ: gl.constexpr = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=WROW // 4 if WROW // 4 < 8 else 8,
                                                    order=[1, 0])
        QS: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])

        pid_s = gl.program_id(0)
        pid_x = gl.program_id(1)
        nblk = Hq // NCOL
        b = (pid_x // nblk).to(gl.int64)
        h0 = (pid_x % nblk) * NCOL  # first query head
        g0 = (pid_x % nblk) * GP // SPLIT_H  # first group
        lo = pid_s * chunk
        hi = gl.minimum(lo + chunk, Skv)

        # the program's queries, once: the key product's B operand per group ([R, 8], each of its
        # query heads in that head's column, channels in the key order, those that arrive times
        # 16 divided by 16), and sum(q) per query head
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        qs = gl.allocate_shared_memory(DT, [GP, R, 8], QS)
        kap = gl.arange(0, R, layout=gl.SliceLayout(1, LQ))
        cq = gl.arange(0, 8, layout=gl.SliceLayout(0, LQ))
        s_ = kap // 16
        hi16 = (kap // 8) % 2  # those channels' codes arrive times 16 (``key_channel``)
        ch = 8 * (4 * (s_ // 2) + (kap // 2) % 4) + 2 * (s_ % 2) + hi16 + 4 * (kap % 2)
        q_base = q_ptr + b * sq_b + h0 * sq_h
        for gg in gl.static_range(GP):
            mine = (cq >= gg * QPG) & (cq < gg * QPG + QPG)
            qv = gl.load(q_base + gl.expand_dims(ch * sq_d, 1) + gl.expand_dims(cq * sq_h, 0),
                         mask=gl.expand_dims(mine, 0), other=0.0).to(gl.float32)
            if BF16:
                qv = qv * _BF16_UP
            else:
                qv = gl.where(gl.expand_dims(hi16 == 1, 1), qv * 0.0625, qv)
            qs.index(gg).store(qv.to(DT))
        cols = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
        rr = gl.arange(0, R, layout=gl.SliceLayout(1, LQ))
        qfull = gl.load(q_base + gl.expand_dims(cq * sq_h, 0) + gl.expand_dims(rr * sq_d, 1),
                        mask=gl.expand_dims(cq < NCOL, 0), other=0.0).to(gl.float32)
        qsum = gl.convert_layout(gl.sum(qfull, axis=0), gl.SliceLayout(0, MMA))

        kbuf = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_S, WROW], SWZ)
        vbuf = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_S, WROW], SWZ)
        kw_off = b * sk_b + g0 * W
        vw_off = b * sv_b + g0 * W
        n_tiles = gl.cdiv(hi - lo, BLOCK_S)
        for i in gl.static_range(STAGES - 1):
            _copy_tile(kbuf.index(i), vbuf.index(i), k_ptr, v_ptr, kw_off, vw_off, sk_s, sv_s,
                       lo + i * BLOCK_S, hi, LC, BLOCK_S, WROW)
            cp.commit_group()

        s_off = b * ss_b + g0
        m_off = b * sm_b
        tok_n = lo + gl.arange(0, BLOCK_S, layout=gl.SliceLayout(1, MMA))
        sk_n, zk_n, sv_n, zv_n, mr_n = _vectors(ks_ptr, kz_ptr, vs_ptr, vz_ptr, s_off, ss_s, mask_ptr, m_off,
                                                sm_k, tok_n, hi, cols, QPG, NCOL, MASK_KIND)
        m_i = gl.full([8], float("-inf"), gl.float32, gl.SliceLayout(0, MMA))
        l_i = gl.zeros([8], gl.float32, gl.SliceLayout(0, MMA))
        z_i = gl.zeros([8], gl.float32, gl.SliceLayout(0, MMA))
        o0 = gl.zeros([R, 8], gl.float32, MMA)
        o1 = gl.zeros([R, 8], gl.float32, MMA)
        o2 = gl.zeros([R, 8], gl.float32, MMA)
        o3 = gl.zeros([R, 8], gl.float32, MMA)
        qscale = scale * 1.4426950408889634
        for it in range(n_tiles):
            tok = tok_n
            sk, zk, sv, zv, mr = sk_n, zk_n, sv_n, zv_n, mr_n
            tok_n = tok + BLOCK_S
            sk_n, zk_n, sv_n, zv_n, mr_n = _vectors(ks_ptr, kz_ptr, vs_ptr, vz_ptr, s_off, ss_s, mask_ptr, m_off,
                                                    sm_k, tok_n, hi, cols, QPG, NCOL, MASK_KIND)
            # the stage that tile it + STAGES - 1 overwrites was read in the last iteration
            _barrier()
            nxt = (it + STAGES - 1) % STAGES
            _copy_tile(kbuf.index(nxt), vbuf.index(nxt), k_ptr, v_ptr, kw_off, vw_off, sk_s, sv_s,
                       lo + (it + STAGES - 1) * BLOCK_S, hi, LC, BLOCK_S, WROW)
            cp.commit_group()
            cp.wait_group(STAGES - 1)
            _barrier()  # other threads' copies are visible
            stage = it % STAGES
            kt = kbuf.index(stage)
            s = gl.zeros([BLOCK_S, 8], gl.float32, MMA)
            for gg in gl.static_range(GP):  # each group's product fills its own columns
                kop = _k_operand(kt.slice(gg * W, W, dim=1).load(LK), A_L, BF16)
                s = mma_v2(kop, qs.index(gg).load(B_L), s)
            t = (s * (sk * (_BF16_UNSCALE if BF16 else _F16_UNSCALE)) + zk * gl.expand_dims(qsum, 0)) * qscale
            keep = gl.expand_dims(tok < hi, 1) & gl.expand_dims(cols < NCOL, 0)
            if MASK_KIND == 3:
                keep = keep & gl.expand_dims(mr != 0.0, 1)
            if MASK_KIND == 4:
                t = t + gl.expand_dims(mr * 1.4426950408889634, 1)
            t = gl.where(keep, t, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(t, axis=0))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(t - gl.expand_dims(m_use, 0))
            alpha = gl.exp2(m_i - m_use)
            m_i = m_new
            l_i = l_i * alpha + gl.sum(p, axis=0)
            z_i = z_i * alpha + gl.sum(p * zv, axis=0)
            if BF16:
                wv = gl.convert_layout((p * (sv * _BF16_UP)).to(DT), B_L)
            else:
                wv = gl.convert_layout((p * sv).to(DT), B_L)
            vt = vbuf.index(stage)
            o0 = _value_step(vt, 0, W, LV, A_L, wv, o0, alpha, BF16)
            if GP > 1:
                o1 = _value_step(vt, 1, W, LV, A_L, wv, o1, alpha, BF16)
            if GP > 2:
                o2 = _value_step(vt, 2, W, LV, A_L, wv, o2, alpha, BF16)
                o3 = _value_step(vt, 3, W, LV, A_L, wv, o3, alpha, BF16)
        cp.wait_group(0)

        slot = pid_x * NSPLIT + pid_s
        out_off = b * so_b + h0 * so_h
        _finish_group(o0, 0, cols, m_i, l_i, z_i, out_ptr, out_off, so_h, part_ptr, lse_ptr, slot, QPG, NCOL, R, DIRECT,
                      MMA, BF16)
        if GP > 1:
            _finish_group(o1, 1, cols, m_i, l_i, z_i, out_ptr, out_off, so_h, part_ptr, lse_ptr, slot, QPG, NCOL, R,
                          DIRECT, MMA, BF16)
        if GP > 2:
            _finish_group(o2, 2, cols, m_i, l_i, z_i, out_ptr, out_off, so_h, part_ptr, lse_ptr, slot, QPG, NCOL, R,
                          DIRECT, MMA, BF16)
            _finish_group(o3, 3, cols, m_i, l_i, z_i, out_ptr, out_off, so_h, part_ptr, lse_ptr, slot, QPG, NCOL, R,
                          DIRECT, MMA, BF16)


def program_groups(groups: int, q_per_group: int, heads_per_program: int) -> int:
    """Latent groups per program: about ``heads_per_program`` query heads (its columns, at most
    8, the product's width), at most 4 groups (one accumulator each), dividing ``groups``; one
    where a group has more than 8 query heads (``program_rows``)."""
    gp = max(1, min(4, heads_per_program // q_per_group, 8 // q_per_group))
    gp = 1 << (gp.bit_length() - 1)  # the kernel has 1, 2 or 4 accumulators
    while groups % gp:
        gp //= 2
    return gp


def program_rows(groups: int, q_per_group: int, heads_per_program: int) -> int:
    """Query heads per program: ``program_groups`` groups' heads; a group of more than 8 query
    heads (a multiple of 8: GQA with 4 KV heads per latent group, MQA) spans programs of 8 of
    them, each reading the group's latents (all but the first from L2, as the programs of one
    group are neighbours in the grid)."""
    if q_per_group > 8:
        return 8
    return program_groups(groups, q_per_group, heads_per_program) * q_per_group


def applies(q, kl, vl, lk, softcap, is_causal, mask_kind, groups, interpret) -> bool:
    """Whether ``q4_absorbed_kernel`` serves a fused call (see the module docstring)."""
    _, Hq, Sq, R = q.shape
    return (HAVE_GLUON and not interpret and lk is None and q.dtype in (torch.float16, torch.bfloat16) and Sq == 1
            and Hq % groups == 0 and (Hq // groups <= 8 or Hq // groups % 8 == 0)
            and softcap == 0 and not is_causal and mask_kind in (0, 3, 4)
            and R % 64 == 0 and R <= 256
            and kl.bits == 4 and vl.bits == 4 and kl.group_size == R and vl.group_size == R
            and kl.channels == groups * R and vl.channels == groups * R
            and kl.scale.stride() == kl.zero.stride() == vl.scale.stride() == vl.zero.stride()
            and kl.scale.stride(-1) == 1
            and kl.words(q.dtype, interpret) and vl.words(q.dtype, interpret))


def launch(q, kl, vl, mask_kind, mask, sm_b, sm_k, scale, out, nsplit, chunk, part, lse, heads_per_program=4,
           block_s=32, stages=2, probe=False):
    """Launch over ``nsplit`` splits of ``chunk`` tokens. ``part``/``lse``: the split partials,
    one row per query head of a program (``program_rows`` rows), as
    ``common.combine_splits_kernel`` reads them with ``M_BLOCK = HPG =`` that many rows.
    ``probe``: return (kernel, grid, args, constexprs)."""
    B, Hq, _, R = q.shape
    G = kl.channels // R
    qpg = Hq // G
    rows = program_rows(G, qpg, heads_per_program)
    gp, cols = max(1, rows // qpg), min(rows, qpg)  # groups per program, query heads of each
    kw, vw = kl.data.view(torch.int32), vl.data.view(torch.int32)
    grid = (nsplit, B * Hq // rows)
    args = (q, kw, vw, kl.scale, kl.zero, vl.scale, vl.zero, mask, out, part, lse,
            q.stride(0), q.stride(1), q.stride(3), kw.stride(0), kw.stride(1), vw.stride(0), vw.stride(1),
            kl.scale.stride(0), kl.scale.stride(1), sm_b, sm_k, out.stride(0), out.stride(1),
            Hq, kw.shape[1], chunk, nsplit, float(scale))
    consts = dict(R=R, GP=gp, QPG=cols, BLOCK_S=block_s, STAGES=stages, MASK_KIND=mask_kind, DIRECT=nsplit == 1,
                  BF16=q.dtype == torch.bfloat16, SPLIT_H=qpg // cols, num_warps=1)
    if probe:
        return q4_absorbed_kernel, grid, args, consts
    q4_absorbed_kernel[grid](*args, **consts)
