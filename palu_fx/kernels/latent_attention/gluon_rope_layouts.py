"""Where each thread's values live in the Gluon RoPE decode kernel (``gluon_rope.py``): the
permuted channel and column orders that make a thread's latents and cos/sin values contiguous
runs, the register and shared-memory layouts built on them, the reshapes into the ``wgmma``
operand order, and the PTX of the 4-bit dequantizations (checked on the CPU by
``test_gluon_rope.py``: an emulator for the PTX, torch reshapes for the orders)."""
from __future__ import annotations

import torch

try:  # Gluon ships with Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    HAVE_GLUON = True
except ImportError:  # pragma: no cover (older Triton)
    HAVE_GLUON = False

BLOCK_S = 64  # token rows per tile: the M of one warpgroup MMA


def _dequant_asm(bf16: bool) -> str:
    """One word of 8 codes (channel j in nibble j) -> 8 dequantized 16-bit values ``s c + z``,
    output ``2p + e`` = nibble ``p + 4e``. $9/$10: the token's (scale, scale) and (zero, zero)
    pairs; bf16 adds $11/$12, the parts of the fp16 scale and zero that bf16 heads $9/$10 miss.
    An AND-OR puts nibbles p and p+4 under the exponent of 1024 (fp16) or 128 (bf16), and a
    packed subtract takes that off exactly. fp16: one FMA applies scale and zero (one rounding);
    bf16: heads and tails as in ``common._dequant4_asm`` (bf16's 8 bits would otherwise round
    the fp16 scale first)."""
    # lop3 0xea: (a & b) | c
    if bf16:
        lines = ["{", ".reg .b32 r, t, u, one, neg;", "mov.b32 one, 0x3f803f80;", "mov.b32 neg, 0xc300c300;"]
        step = ["lop3.b32 r, {src}, 0x000f000f, 0x43004300, 0xea;", "fma.rn.bf16x2 r, r, one, neg;",
                "fma.rn.bf16x2 u, r, $11, $12;", "fma.rn.bf16x2 r, r, $9, $10;", "fma.rn.bf16x2 r, u, one, r;"]
    else:
        lines = ["{", ".reg .b32 r, t, neg;", "mov.b32 neg, 0x64006400;"]
        step = ["lop3.b32 r, {src}, 0x000f000f, 0x64006400, 0xea;", "sub.f16x2 r, r, neg;",
                "fma.rn.f16x2 r, r, $9, $10;"]
    for p in range(4):
        src = "$8"
        if p:
            lines.append(f"shr.b32 t, $8, {4 * p};")
            src = "t"
        lines += [x.format(src=src) for x in step] + [f"mov.b32 {{${2 * p}, ${2 * p + 1}}}, r;"]
    return "\n".join(lines + ["}"])


def _value_asm() -> str:
    """Two rows' words of 8 value codes ($8, $9), each row's ``p s`` as an fp16 pair ($10, $11) ->
    8 fp16 sums ``p_0 s_0 c_0 + p_1 s_1 c_1``, output ``2p + e`` = nibble ``p + 4e``: the codes made
    exact as in ``_dequant_asm`` (AND-OR, packed subtract), then one packed multiply and one
    packed FMA per channel pair for both rows. fp16 whatever the model's dtype: codes and the
    fp16 scales are exact in it, and the sums go to fp32 accumulators once per tile."""
    lines = ["{", ".reg .b32 a, b, s, t, neg;", "mov.b32 neg, 0x64006400;"]
    for p in range(4):
        src0, src1 = "$8", "$9"
        if p:
            lines += [f"shr.b32 s, $8, {4 * p};", f"shr.b32 t, $9, {4 * p};"]
            src0, src1 = "s", "t"
        lines += [f"lop3.b32 a, {src0}, 0x000f000f, 0x64006400, 0xea;", "sub.f16x2 a, a, neg;",
                  f"lop3.b32 b, {src1}, 0x000f000f, 0x64006400, 0xea;", "sub.f16x2 b, b, neg;",
                  "mul.rn.f16x2 a, a, $10;", "fma.rn.f16x2 a, b, $11, a;", f"mov.b32 {{${2 * p}, ${2 * p + 1}}}, a;"]
    return "\n".join(lines + ["}"])


def key_channel(kappa: torch.Tensor, rank: int, packed: bool) -> torch.Tensor:
    """Latent channel held at inner index ``kappa`` of the key product (and at the same index of
    the value accumulators): ``kappa = 16 b + 8 hi + 2 c + e`` is what the operand layout gives
    thread ``c`` of a quad; thread ``c`` reads channels ``c rank/4 ..`` of a row. Plain latents
    in order (``4 b + 2 hi + e``); 4-bit words in ``_dequant_asm``'s order."""
    b, hi, c, e = kappa // 16, (kappa // 8) % 2, (kappa // 2) % 4, kappa % 2
    if packed:
        return c * (rank // 4) + 8 * (b // 2) + 2 * (b % 2) + hi + 4 * e
    return c * (rank // 4) + 4 * b + 2 * hi + e


def pair_of_column(n: torch.Tensor, half: int):
    """(part, rotary pair) of column ``n`` of ``[Wa | Wb]``: part 0 = ``Wa``. Column ``8 j + 2 c + e``
    of a part is what thread ``c`` of a quad holds in the accumulator; it takes pair
    ``c half/4 + 2 j + e``, so the thread's pairs are one contiguous run of the cos/sin tables."""
    part, nn = n // half, n % half
    return part, (half // 4) * ((nn // 2) % 4) + 2 * (nn // 8) + nn % 2


def thread_run_layout(width: int):
    """[64, width] with thread (warp w, lane 4 g + c) holding rows ``16 w + g (+ 8)`` (the rows
    of its ``wgmma`` accumulator) and columns ``c width/4 ..`` (one contiguous run per row)."""
    cw = width // 4
    regs = [[0, 1 << i] for i in range(cw.bit_length() - 1)] + [[8, 0]]
    return gl.DistributedLinearLayout(regs, [[0, cw], [0, 2 * cw], [1, 0], [2, 0], [4, 0]], [[16, 0], [32, 0]],
                                      [], [BLOCK_S, width])


def head_columns_layout(heads: int):
    """[64, heads] with the rows of ``thread_run_layout`` and every column in each of them (the
    per-token vectors of a program's heads)."""
    regs = [[0, 1 << i] for i in range(heads.bit_length() - 1)] + [[8, 0]]
    return gl.DistributedLinearLayout(regs, [[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]], [[16, 0], [32, 0]], [],
                                      [BLOCK_S, heads])


def copy_layout(width: int, elem_bytes: int):
    """Blocked layout of 16-byte copies of a [64, width] tile over 4 warps."""
    vec = max(1, 16 // elem_bytes)
    tw = max(1, min(32, width // vec))
    return gl.BlockedLayout([1, min(vec, width)], [32 // tw, tw], [4, 1], [1, 0])


def swizzled_layout(width: int, elem_bytes: int):
    """XOR of 16-byte chunks by row: a quad's row runs hit distinct banks across rows."""
    vec = max(1, 16 // elem_bytes)
    chunks = max(1, width // vec)
    return gl.SwizzledSharedLayout(vec=vec, per_phase=1, max_phase=min(8, chunks), order=[1, 0])


if HAVE_GLUON:
    _ASM_F16 = gl.constexpr(_dequant_asm(False))
    _ASM_BF16 = gl.constexpr(_dequant_asm(True))
    _ASM_VALUES = gl.constexpr(_value_asm())

    @gluon.jit
    def _key_channel(kappa, R: gl.constexpr, BITS: gl.constexpr):
        """``key_channel`` in the kernel (the Python one is what the tests check the reshapes against)."""
        b, hi, c, e = kappa // 16, (kappa // 8) % 2, (kappa // 2) % 4, kappa % 2
        if BITS == 4:
            ch = c * (R // 4) + 8 * (b // 2) + 2 * (b % 2) + hi + 4 * e
        else:
            ch = c * (R // 4) + 4 * b + 2 * hi + e
        return ch

    @gluon.jit
    def _kappa_plain(x, R: gl.constexpr):
        """[64, R] in memory order (thread c holds channels c R/4 ..) -> the inner-index order of
        the key operand (``key_channel``, plain)."""
        x = gl.reshape(x, [64, 4, R // 16, 2, 2])  # (c, b, hi, e)
        x = gl.permute(x, [0, 2, 3, 1, 4])  # (b, hi, c, e)
        return gl.reshape(x, [64, R])

    @gluon.jit
    def _both_halves(x):
        """16-bit values -> int32 words holding each twice (the packed operands of ``_dequant_asm``)."""
        b = x.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return b | (b << 16)

    @gluon.jit
    def _kappa_words(w, s, z, R: gl.constexpr, BF16: gl.constexpr):
        """Code words [64, R/8] (thread c holds words c R/32 ..) with their row's fp32 scale and zero
        (same shape) -> dequantized [64, R] in the inner-index order of the key operand
        (``key_channel``, packed)."""
        if BF16:
            sh = s.to(gl.bfloat16)
            zh = z.to(gl.bfloat16)
            o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(
                _ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r",
                [w, _both_halves(sh), _both_halves(zh), _both_halves((s - sh.to(gl.float32)).to(gl.bfloat16)),
                 _both_halves((z - zh.to(gl.float32)).to(gl.bfloat16))],
                dtype=(gl.bfloat16, ) * 8, is_pure=True, pack=1)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(
                _ASM_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [w, _both_halves(s.to(gl.float16)),
                                                          _both_halves(z.to(gl.float16))],
                dtype=(gl.float16, ) * 8, is_pure=True, pack=1)
        # output 4k + 2i + e at (e, i, k): nibble 2k + i + 4e
        x = gl.join(gl.join(gl.join(o0, o1), gl.join(o2, o3)), gl.join(gl.join(o4, o5), gl.join(o6, o7)))
        x = gl.reshape(x, [64, 4, R // 32, 2, 2, 2])  # (c, u, e, i, k)
        x = gl.permute(x, [0, 2, 5, 4, 1, 3])  # (u, k, i, c, e)
        return gl.reshape(x, [64, R])

    @gluon.jit
    def _pair_tables(cs, sn, HALF: gl.constexpr, ACC: gl.constexpr):
        """A tile's cos and sin rows [64, HALF] each -> [64, 2 HALF] in the accumulator's layout
        (table dtype: converted where used): column n holds cos (first half) or sin of pair
        ``pair_of_column(n)``."""
        x = gl.join(cs, sn)  # [64, HALF, part]
        x = gl.reshape(x, [64, 4, HALF // 8, 2, 2])  # (c, j, e, part)
        x = gl.permute(x, [0, 4, 2, 1, 3])  # (part, j, c, e)
        return gl.convert_layout(gl.reshape(x, [64, 2 * HALF]), ACC)

    @gluon.jit
    def _value_sums(w, ps, RV: gl.constexpr):
        """Value code words [64, RV/8] and the rows' ``p s`` [4, 2, 8] (fp32) -> sum over each
        thread's two rows of ``p s c`` [4, 8, RV] in fp32, channels in the key operand's order
        (``key_channel``, packed)."""
        W: gl.constexpr = RV // 8
        w0, w1 = gl.split(gl.permute(gl.reshape(w, [4, 2, 8, W]), [0, 2, 3, 1]))  # [4, 8, W] per row
        p0, p1 = gl.split(gl.permute(ps, [0, 2, 1]))  # [4, 8]
        WL: gl.constexpr = gl.SliceLayout(2, w0.type.layout)
        p0 = gl.expand_dims(gl.convert_layout(_both_halves(p0.to(gl.float16)), WL), 2) + gl.zeros_like(w0)
        p1 = gl.expand_dims(gl.convert_layout(_both_halves(p1.to(gl.float16)), WL), 2) + gl.zeros_like(w0)
        o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(
            _ASM_VALUES, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r", [w0, w1, p0, p1], dtype=(gl.float16, ) * 8, is_pure=True,
            pack=1)
        # output 4k + 2i + e at (e, i, k): nibble 2k + i + 4e (as _kappa_words)
        x = gl.join(gl.join(gl.join(o0, o1), gl.join(o2, o3)), gl.join(gl.join(o4, o5), gl.join(o6, o7)))
        x = gl.reshape(x, [4, 8, 4, W // 4, 2, 2, 2])  # (w, g, c, u, e, i, k)
        x = gl.permute(x, [0, 1, 3, 6, 5, 2, 4])  # (w, g, u, k, i, c, e)
        return gl.reshape(x, [4, 8, RV]).to(gl.float32)
