"""Gluon decode kernel: RoPE attention in multi-head attention whose latent groups are wide (key
rank 256 per group: group size 4 at rank ratio 0.5, Palu's default grouping; and rank 128: group
size 2, or group size 1 at ratio 1.0), keys rebuilt from plain latents on Hopper's warpgroup MMA.

Why: ``gluon_rope.py`` holds a tile's key operand, its ``[Wa | Wb]`` product and the value tile in
registers; at rank 256 that is 255 registers and 640 bytes of spills, and two heads' ``[Wa | Wb]``
(64 KB each) fill the shared memory. These calls took the Triton kernels: 2.5-2.6 ms for B=8 x 32k
(32 heads of 128, rank ratio 0.5, gs4), a third of what the key products need at the H200's
matmul rate (0.76 ms). Here 1.48-1.58 ms (RESULTS.md, "A Gluon kernel for wide latent groups").
At rank 128 (96 KB: two programs per SM) it also beats ``gluon_rope.py``, whose register
operands and ``[Wa | Wb]`` of two heads cost it occupancy there: 1.03 ms against 1.24 at gs1
(ratio 1.0), 0.83 against 0.91 at gs2:

* **Scores without rotated keys**, as ``gluon_rope.py``: each program (one query head) builds its
  ``[Wa | Wb]`` ([rank, head_dim], columns in ``pair_of_column`` order) in shared memory once; a
  tile's ``[64, head_dim]`` product weighted by the tile's cos/sin and summed per row gives its
  scores. Each thread's two accumulator rows share one softmax lane (``gluon_rope._softmax_step``).
* **Both operands in shared memory**: the product is one asynchronous ``wgmma`` over the
  ``[64, rank]`` key tile, and costs no registers for the key operand.
* **Values one tile behind.** While tile ``i``'s key product runs on the tensor cores, the CUDA
  cores accumulate tile ``i - 1``'s values (``o = o alpha + sum_t p_t h_t`` into fp32, 64
  channels at a time, a thread's two rows summed first in pairs of the latents' dtype: in fp32
  the loop spilled and took 2x as long); then the product is waited for and tile ``i``'s scores
  and softmax weights computed. Values take two stages of their own, refilled after they are
  read, so a tile's copy has a whole iteration to land.
* **Copies streamed with ``cp.async``**, one per tile and buffer into static stages (the loop
  unrolled by two): Triton's barrier pass puts a barrier before every copy into an allocation
  another copy wrote, ten a tile with slices of one ring. The cos/sin and mask rows are loaded
  from global memory during the key product.
* **Bound by shared memory** (an estimate): per tile the product reads 96 KB (the key tile and
  ``[Wa | Wb]``), the copies write 64 KB and the value sums read 32 KB, 1.5x the tensor cores'
  time at peak. Fewer barriers and instructions did not change the time; splitting each product
  into its ``Wa`` and ``Wb`` halves, to overlap every part of the tile, made it 1.6x slower.

Covers: fp16 and bf16, rotate-half RoPE over the whole head (head dim 64 or 128, the tables' last
dim contiguous), multi-head attention at any group size, key rank 128 or 256 (from ``min_rank``)
and value rank 64, 128 or 256 per group, plain latents, shared decode masks or none, no softcap, no key bias or norm, one
query token. One program of four warps per SM at rank 256 (192 KB of shared memory), two at 128. ``applies`` says whether a call is covered; 4-bit latents at these ranks, and
everything else, take the Triton kernels. Gluon has no CPU interpreter: the kernel is tested on
the GPU and compiled for sm_90 without one (``tests/kernels/test_gluon_wide.py``).
"""
from __future__ import annotations

import torch

try:  # Gluon ships with Triton >= 3.5; without it the Triton kernels serve every call
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    HAVE_GLUON = True
except ImportError:  # pragma: no cover (older Triton)
    HAVE_GLUON = False

from palu_fx.kernels.latent_attention.gluon_rope import call_fits
from palu_fx.kernels.latent_attention.gluon_rope_layouts import copy_layout, swizzled_layout, thread_run_layout

if HAVE_GLUON:
    from palu_fx.kernels.latent_attention.gluon_gqa import _mask_rows
    from palu_fx.kernels.latent_attention.gluon_q4 import store_output
    from palu_fx.kernels.latent_attention.gluon_rope import _softmax_init, _softmax_step, _table_rows
    from palu_fx.kernels.latent_attention.gluon_rope_layouts import _pair_tables

__all__ = ["HAVE_GLUON", "SHARED_BYTES", "applies", "launch", "shared_bytes"]

SHARED_BYTES = 200 * 1024  # what one program may take (the H200's 227 KB, less the compiler's scratch)
SLICE = 64  # value channels per accumulator (a thread holds 16 of each of its two rows)


def shared_bytes(rk: int, rv: int, head_dim: int, stages: int = 2) -> int:
    """Shared memory of one program: ``[Wa | Wb]``, and ``stages`` key and value tiles of 64 tokens."""
    return 2 * (rk * head_dim + stages * 64 * (rk + rv))


if HAVE_GLUON:
    _SLICE = gl.constexpr(SLICE)
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared

    @gluon.jit
    def _copy_rows(buf, base, stride, start, hi, W: gl.constexpr, LC: gl.constexpr):
        """Start the copy of a tile's rows (``W`` elements each, row ``t`` at ``base + t stride``) into
        ``buf``: one copy per tile and buffer (the barrier pass puts a barrier before every copy into
        an allocation another copy wrote); rows past ``hi`` are clamped to the last token (real
        memory, masked out of the scores). 32-bit offsets from a 64-bit base (``applies`` checks)."""
        t = gl.minimum(start + gl.arange(0, 64, layout=gl.SliceLayout(1, LC)), hi - 1)
        rows = base + gl.expand_dims(t * stride, 1)  # (a pointer per row: the columns become immediate offsets)
        _async_load(buf, rows + gl.expand_dims(gl.arange(0, W, layout=gl.SliceLayout(0, LC)), 0))

    @gluon.jit
    def _value_slice(buf, p, a_o, o_i, PAIRS: gl.constexpr, RUN: gl.constexpr):
        """``o alpha + sum_t p_t h_t`` over a thread's two rows of one 64-channel value slice (fp32
        accumulators; ``PAIRS``: the two rows' products summed in pairs of the latents' dtype first)."""
        v = gl.reshape(buf.load(RUN), [4, 2, 8, _SLICE])  # (warp, row pair, quad, channel)
        pv = gl.expand_dims(gl.convert_layout(p, gl.SliceLayout(3, v.type.layout)), 3)
        if PAIRS:
            t = gl.sum(pv.to(v.dtype) * v, axis=1).to(gl.float32)
        else:
            t = gl.sum(pv * v.to(gl.float32), axis=1)
        return o_i * a_o + t

    @gluon.jit
    def _values(vbuf, p, alpha, o0, o1, o2, o3, NV: gl.constexpr, PAIRS: gl.constexpr, RUN: gl.constexpr):
        """One tile's values into the accumulators of its ``NV`` 64-channel slices (unused ones pass
        through)."""
        a_o = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(2, o0.type.layout)), 2)
        o0 = _value_slice(vbuf.slice(0, _SLICE, dim=1), p, a_o, o0, PAIRS, RUN)
        if NV > 1:
            o1 = _value_slice(vbuf.slice(_SLICE, _SLICE, dim=1), p, a_o, o1, PAIRS, RUN)
        if NV > 2:
            o2 = _value_slice(vbuf.slice(2 * _SLICE, _SLICE, dim=1), p, a_o, o2, PAIRS, RUN)
        if NV > 3:
            o3 = _value_slice(vbuf.slice(3 * _SLICE, _SLICE, dim=1), p, a_o, o3, PAIRS, RUN)
        return o0, o1, o2, o3

    @gluon.jit
    def _store_slice(o_i, w, l, mx, j: gl.constexpr, out_ptr, out_off, part_ptr, lse_ptr, row, RV: gl.constexpr,
                     DIRECT: gl.constexpr):
        """Slice ``j``'s channels of the head's output: the softmax lanes merged with weights ``w``."""
        wo = gl.expand_dims(gl.convert_layout(w, gl.SliceLayout(2, o_i.type.layout)), 2)
        o = gl.sum(gl.sum(o_i * wo, axis=1), axis=0)
        ch = j * _SLICE + gl.arange(0, _SLICE, layout=o.type.layout)
        store_output(o, l, mx, ch, out_ptr, out_off, part_ptr, lse_ptr, row, RV, DIRECT)

    @gluon.jit
    def _tile(kt, kn, vl, wab, cos_ptr, sin_ptr, mask_ptr, k_base, v_base, c_off, s_off, m_off, sk_s, sv_s, sc_s,
              ssn_s, sm_k, tok, nxt, hi, qscale, p, alpha, m_i, l_i, o0, o1, o2, o3, N: gl.constexpr,
              RK: gl.constexpr, RV: gl.constexpr, NV: gl.constexpr, HALF: gl.constexpr, MASK_KIND: gl.constexpr,
              PAIRS: gl.constexpr, ACC: gl.constexpr, CS_L: gl.constexpr, LCK: gl.constexpr, LCV: gl.constexpr,
              RUN: gl.constexpr):
        """One tile (tokens ``tok``; keys in ``kt``) and the last tile's values (in ``vl``, with its
        weights ``p`` and rescale ``alpha``); starts the copies of the next tile's keys into ``kn``
        and values into ``vl``, at token ``nxt``."""
        cp.wait_group(1)  # this tile's keys (and the last tile's values) have landed
        fence_async_shared()  # (the products read the keys through the async proxy)
        _barrier()  # ... for every thread; and every thread is done with the last tile's keys
        _copy_rows(kn, k_base, sk_s, nxt, hi, RK, LCK)
        cp.commit_group()
        acc = warpgroup_mma(kt, wab, gl.zeros([64, N], gl.float32, ACC), use_acc=False, is_async=True)
        # the last tile's values while the tensor cores rebuild this one's scores
        o0, o1, o2, o3 = _values(vl, p, alpha, o0, o1, o2, o3, NV, PAIRS, RUN)
        # this tile's cos/sin and mask rows (their latency hidden behind the rest of the product)
        cs, sn = _table_rows(cos_ptr, sin_ptr, c_off, s_off, sc_s, ssn_s, tok, hi, HALF, CS_L)
        keep, madd = _mask_rows(mask_ptr, m_off, sm_k, tok, hi, MASK_KIND)
        _barrier()  # every thread is done with the last tile's values: their stage takes the next's
        _copy_rows(vl, v_base, sv_s, nxt, hi, RV, LCV)
        cp.commit_group()
        acc = warpgroup_mma_wait(0, deps=[acc])
        s = gl.sum(acc * _pair_tables(cs, sn, HALF, ACC).to(gl.float32), axis=1)
        p, alpha, m_i, l_i = _softmax_step(s, keep, madd, qscale, m_i, l_i)
        return p, alpha, m_i, l_i, o0, o1, o2, o3

    @gluon.jit
    def wide_rope_decode_kernel(
        q_ptr, lk_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, mask_ptr, out_ptr, part_ptr, lse_ptr,
        sq_b, sq_h, sq_d, slk_g, slk_d, slk_r, sk_b, sk_s, sv_b, sv_s,
        sc_b, sc_s, ssn_b, ssn_s, sm_b, sm_k, so_b, so_h,
        Hq, Skv, chunk, NSPLIT, scale,
        RK: gl.constexpr, RV: gl.constexpr, HALF: gl.constexpr, GS: gl.constexpr, MASK_KIND: gl.constexpr,
        DIRECT: gl.constexpr, BF16: gl.constexpr, CS_L: gl.constexpr, LCK: gl.constexpr, LCV: gl.constexpr,
        SWK: gl.constexpr, SWV: gl.constexpr, RUN: gl.constexpr, PAIRS: gl.constexpr = False,
    ):
        # one program: sequence b, query head h (slice h % GS of latent group g's L_k), tokens [lo, hi)
        N: gl.constexpr = 2 * HALF
        NK: gl.constexpr = RK // _SLICE  # row blocks of [Wa | Wb] built in turn
        NV: gl.constexpr = RV // _SLICE  # value slices: accumulators
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])
        ROW: gl.constexpr = gl.SliceLayout(1, ACC)
        LW: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0])

        pid_s = gl.program_id(0)
        pid_x = gl.program_id(1)
        b = (pid_x // Hq).to(gl.int64)
        h = pid_x % Hq
        g = h // GS
        lo = pid_s * chunk
        hi = gl.minimum(lo + chunk, Skv)

        # [Wa | Wb], once, a 64-channel slice at a time (registers): for pair f (partners lo/hi),
        # Wa_f = q_lo L_lo + q_hi L_hi, Wb_f = q_hi L_lo - q_lo L_hi; columns in pair_of_column order
        WL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_SLICE, N], DT)
        wab = gl.allocate_shared_memory(DT, [RK, N], WL)
        n = gl.arange(0, N, layout=gl.SliceLayout(0, LW))
        part = n // HALF
        nn = n % HALF
        f = (HALF // 4) * ((nn // 2) % 4) + 2 * (nn // 8) + nn % 2
        qrow = q_ptr + b * sq_b + h * sq_h
        q_lo = gl.expand_dims(gl.load(qrow + f * sq_d).to(gl.float32), 0)
        q_hi = gl.expand_dims(gl.load(qrow + (f + HALF) * sq_d).to(gl.float32), 0)
        lrow = lk_ptr + g * slk_g + (h % GS) * N * slk_d
        for j in gl.static_range(NK):
            r = gl.expand_dims((j * _SLICE + gl.arange(0, _SLICE, layout=gl.SliceLayout(1, LW))) * slk_r, 1)
            l_lo = gl.load(lrow + r + gl.expand_dims(f * slk_d, 0)).to(gl.float32)
            l_hi = gl.load(lrow + r + gl.expand_dims((f + HALF) * slk_d, 0)).to(gl.float32)
            w = gl.where(gl.expand_dims(part == 0, 0), q_lo * l_lo + q_hi * l_hi, q_hi * l_lo - q_lo * l_hi)
            wab.slice(j * _SLICE, _SLICE).store(w.to(DT))

        # two stages of keys and of values, each its own allocation (the barrier pass puts a barrier
        # before every copy into an allocation another copy wrote); "tile -1"'s values are zeros
        k0 = gl.allocate_shared_memory(DT, [64, RK], SWK)
        k1 = gl.allocate_shared_memory(DT, [64, RK], SWK)
        v0 = gl.allocate_shared_memory(DT, [64, RV], SWV)
        v1 = gl.allocate_shared_memory(DT, [64, RV], SWV, gl.zeros([64, RV], DT, LCV))
        fence_async_shared()
        _barrier()

        k_base = k_ptr + (b * sk_b + g * RK)
        v_base = v_ptr + (b * sv_b + g * RV)
        c_off = b * sc_b
        s_off = b * ssn_b
        m_off = b * sm_b
        n_tiles = gl.cdiv(hi - lo, 64)
        # commit groups in order: K0, V0, then per tile i: K(i+1), V(i+1)
        _copy_rows(k0, k_base, sk_s, lo, hi, RK, LCK)
        cp.commit_group()
        _copy_rows(v0, v_base, sv_s, lo, hi, RV, LCV)
        cp.commit_group()

        m_i, l_i, _, _ = _softmax_init(_SLICE, ROW, RUN)  # (its value lanes unused: o0 below)
        o0 = gl.sum(gl.reshape(gl.zeros([64, _SLICE], gl.float32, RUN), [4, 2, 8, _SLICE]), axis=1)
        o1, o2, o3 = o0, o0, o0
        p = gl.reshape(gl.zeros([64], gl.float32, ROW), [4, 2, 8])  # tile -1's weights (its values: zeros)
        alpha = l_i + 1.0
        qscale = scale * 1.4426950408889634
        tok = lo + gl.arange(0, 64, layout=ROW)
        for it in range(0, n_tiles, 2):  # tile it from stage 0, tile it + 1 from stage 1
            p, alpha, m_i, l_i, o0, o1, o2, o3 = _tile(
                k0, k1, v1, wab, cos_ptr, sin_ptr, mask_ptr, k_base, v_base, c_off, s_off, m_off, sk_s, sv_s, sc_s,
                ssn_s, sm_k, tok, lo + (it + 1) * 64, hi, qscale, p, alpha, m_i, l_i, o0, o1, o2, o3, N, RK, RV,
                NV, HALF, MASK_KIND, PAIRS, ACC, CS_L, LCK, LCV, RUN)
            tok = tok + 64
            if it + 1 < n_tiles:
                p, alpha, m_i, l_i, o0, o1, o2, o3 = _tile(
                    k1, k0, v0, wab, cos_ptr, sin_ptr, mask_ptr, k_base, v_base, c_off, s_off, m_off, sk_s, sv_s,
                    sc_s, ssn_s, sm_k, tok, lo + (it + 2) * 64, hi, qscale, p, alpha, m_i, l_i, o0, o1, o2, o3, N,
                    RK, RV, NV, HALF, MASK_KIND, PAIRS, ACC, CS_L, LCK, LCV, RUN)
                tok = tok + 64
        cp.wait_group(0)
        _barrier()
        if n_tiles % 2 == 1:  # the last tile's values: stage 0 after an odd count
            o0, o1, o2, o3 = _values(v0, p, alpha, o0, o1, o2, o3, NV, PAIRS, RUN)
        else:
            o0, o1, o2, o3 = _values(v1, p, alpha, o0, o1, o2, o3, NV, PAIRS, RUN)

        # merge the 32 softmax lanes; store the output (or the split's partial with its base-2 LSE)
        mx = gl.max(gl.max(m_i, axis=1), axis=0)
        m_use = gl.where(mx == float("-inf"), 0.0, mx)
        w = gl.exp2(m_i - m_use)
        l = gl.sum(gl.sum(l_i * w, axis=1), axis=0)
        row = pid_x * NSPLIT + pid_s
        out_off = b * so_b + h * so_h
        _store_slice(o0, w, l, mx, 0, out_ptr, out_off, part_ptr, lse_ptr, row, RV, DIRECT)
        if NV > 1:
            _store_slice(o1, w, l, mx, 1, out_ptr, out_off, part_ptr, lse_ptr, row, RV, DIRECT)
        if NV > 2:
            _store_slice(o2, w, l, mx, 2, out_ptr, out_off, part_ptr, lse_ptr, row, RV, DIRECT)
        if NV > 3:
            _store_slice(o3, w, l, mx, 3, out_ptr, out_off, part_ptr, lse_ptr, row, RV, DIRECT)


def applies(q, kl, vl, lk, k_bias, k_norm_weight, cos, sin, rope_style, softcap, is_causal, mask_kind, groups,
            interpret, min_rank: int = 128) -> bool:
    """Whether ``wide_rope_decode_kernel`` serves a fused call (see the module docstring); key
    ranks from ``min_rank`` (128 also takes rank 128, which ``gluon_rope.py`` serves otherwise)."""
    B, Hq, Sq, D = q.shape
    if not call_fits(q, lk, k_bias, k_norm_weight, cos, sin, rope_style, softcap, is_causal, mask_kind, interpret):
        return False
    if Hq % groups or tuple(lk.shape[:2]) != (groups, Hq // groups * D):  # multi-head: a KV head per query head
        return False
    rk, rv = lk.shape[-1], vl.channels // groups
    if rk not in (128, 256) or rk < min_rank or rv not in (64, 128, 256):
        return False
    if shared_bytes(rk, rv, D) > SHARED_BYTES:
        return False
    if kl.bits or vl.bits or kl.channels != groups * rk:
        return False
    if cos.dtype != sin.dtype or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        return False
    rows = (kl.data, vl.data)
    if any(x.dtype != q.dtype or x.stride(-1) != 1 or x.data_ptr() % 16 or x.stride(0) % 8 or x.stride(1) % 8
           for x in rows):
        return False  # (16-byte copies)
    return all(t.shape[1] * t.stride(1) < 2 ** 31 for t in rows)  # (a sequence's row offsets are 32-bit)


def launch(q, lk, kl, vl, cos, sin, mask_kind, mask, sm_b, sm_k, scale, out, nsplit, chunk, part, lse, pairs=False,
           probe=False):
    """Launch over ``nsplit`` splits of ``chunk`` tokens; ``part``/``lse``: the split partials, one
    row per program, as ``common.combine_splits_kernel`` reads them. ``cos``/``sin``: [B, S, D]
    (broadcast strides allowed). ``probe``: return (kernel, grid, args, constexprs)."""
    B, Hq, _, D = q.shape
    groups, _, rk = lk.shape
    rv = vl.channels // groups
    kd, vd = kl.data, vl.data
    grid = (nsplit, B * Hq)
    args = (q, lk, kd, vd, cos, sin, mask, out, part, lse,
            q.stride(0), q.stride(1), q.stride(3), lk.stride(0), lk.stride(1), lk.stride(2),
            kd.stride(0), kd.stride(1), vd.stride(0), vd.stride(1),
            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), sm_b, sm_k, out.stride(0), out.stride(1),
            Hq, kd.shape[1], chunk, nsplit, float(scale))
    consts = dict(RK=rk, RV=rv, HALF=D // 2, GS=Hq // groups, MASK_KIND=mask_kind, DIRECT=nsplit == 1,
                  BF16=q.dtype == torch.bfloat16, CS_L=thread_run_layout(D // 2), LCK=copy_layout(SLICE, 2),
                  LCV=copy_layout(SLICE, 2),
                  SWK=gl.NVMMASharedLayout.get_default_for([64, rk], gl.bfloat16 if q.dtype == torch.bfloat16
                                                           else gl.float16),
                  SWV=swizzled_layout(rv, 2), RUN=thread_run_layout(SLICE),
                  PAIRS=pairs, num_warps=4)
    if probe:
        return wide_rope_decode_kernel, grid, args, consts
    wide_rope_decode_kernel[grid](*args, **consts)
