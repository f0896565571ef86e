"""The word-wise 4-bit dequantization (``common._dequant4_asm``, ``Latent.words``).

The PTX only runs on a GPU, where ``test_quant_latent_attention`` and the GPU test below run
it inside the kernels. On the CPU the instruction sequences themselves (fp16 and bf16) are
checked by a small emulator of the PTX instructions they use, run on the real strings.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from palu_fx.kernels.latent_attention.common import _dequant4_asm
from palu_fx.kernels.latent_attention.wrapper import KernelConfig, Latent
from palu_fx.quant import quantize_packed


# ---------------------------------------------------------------- 16-bit float pairs in a 32-bit word
def _to_f16_bits(x: float) -> int:
    return int(np.array([x], dtype=np.float64).astype(np.float16).view(np.uint16)[0])  # round to nearest even


def _from_f16_bits(b: int) -> float:
    return float(np.array([b], dtype=np.uint16).view(np.float16)[0])


def _to_bf16_bits(x: float) -> int:
    """Round a float64 to bf16 (8 significant bits, to nearest even), exactly, without a float32 step."""
    if x == 0:
        return 0x8000 if math.copysign(1, x) < 0 else 0
    m, e = math.frexp(x)  # x = m 2^e, 0.5 <= |m| < 1
    q = round(m * 256) / 256  # Python's round is half-to-even
    bits = int(np.array([math.ldexp(q, e)], dtype=np.float32).view(np.uint32)[0])  # exact in float32
    assert bits & 0xFFFF == 0
    return bits >> 16


def _from_bf16_bits(b: int) -> float:
    return float(np.array([b << 16], dtype=np.uint32).view(np.float32)[0])


FORMATS = {"f16": (_to_f16_bits, _from_f16_bits), "bf16": (_to_bf16_bits, _from_bf16_bits)}


def _pair(kind: str, lo: float, hi: float) -> int:
    enc = FORMATS[kind][0]
    return enc(lo) | (enc(hi) << 16)


def _unpair(kind: str, word: int) -> tuple[float, float]:
    dec = FORMATS[kind][1]
    return dec(word & 0xFFFF), dec(word >> 16)


# ---------------------------------------------------------------- the emulator
def _prmt(a: int, b: int, sel: int) -> int:
    src = (a | (b << 32)).to_bytes(8, "little")
    return int.from_bytes(bytes(src[(sel >> (4 * i)) & 7] for i in range(4)), "little")


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    # the truth table is indexed as lop3 builds it from (a, b, c) = (0xF0, 0xCC, 0xAA)
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def run_asm(asm: str, inputs: dict[int, int]) -> dict[int, int]:
    """Execute the instruction sequence on 32-bit ``inputs`` ($n -> value); returns the outputs: the
    16-bit halves a ``mov.b32 {$a, $b}`` unpacks, or 32-bit words written to an output directly."""
    regs: dict[str, int] = {f"${n}": v for n, v in inputs.items()}
    outs: dict[int, int] = {}

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    for line in asm.split("\n"):
        line = line.strip().rstrip(";")
        if not line or line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):  # unpack a pair into two 16-bit outputs
            lo, hi, src = re.match(r"\{\s*\$(\d+),\s*\$(\d+)\},\s*(\S+)", rest).groups()
            outs[int(lo)], outs[int(hi)] = regs[src] & 0xFFFF, regs[src] >> 16
            continue
        d, *a = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            regs[d] = val(a[0])
        elif op in ("shr.u32", "shr.b32"):
            regs[d] = val(a[0]) >> val(a[1])
        elif op == "and.b32":
            regs[d] = val(a[0]) & val(a[1])
        elif op == "prmt.b32":
            regs[d] = _prmt(val(a[0]), val(a[1]), val(a[2]))
        elif op == "lop3.b32":
            regs[d] = _lop3(val(a[0]), val(a[1]), val(a[2]), val(a[3]))
        elif op in ("sub.f16x2", "mul.rn.f16x2", "fma.rn.f16x2", "fma.rn.bf16x2"):
            # exact in float64 for 16-bit operands (the sums here stay far inside its range), then one rounding
            kind = "bf16" if "bf16" in op else "f16"
            x = [_unpair(kind, val(t)) for t in a]
            res = [x[0][i] - x[1][i] if op.startswith("sub") else x[0][i] * x[1][i] if op.startswith("mul")
                   else x[0][i] * x[1][i] + x[2][i] for i in (0, 1)]
            regs[d] = _pair(kind, *res)
        else:
            raise AssertionError(f"the emulator does not know {op}")
        if d.startswith("$") and int(d[1:]) not in inputs:
            outs[int(d[1:])] = regs[d]
    return outs


def _bf16(x: float) -> float:
    return _from_bf16_bits(_to_bf16_bits(x))


def _dequantize(kind: str, asm: str, codes, s: float, z: float) -> list[float]:
    """The sequence's outputs for one word of ``codes`` with the fp16 scale and zero ``s``, ``z``,
    given the inputs ``_dequant4_words`` builds."""
    word = sum(int(c) << (4 * i) for i, c in enumerate(codes))
    if kind == "f16":
        inputs = {9: _pair(kind, s, s / 16), 10: _pair(kind, z, z)}
    else:  # bf16 heads and tails
        s_hi, z_hi = _bf16(s), _bf16(z)
        s_lo, z_lo = _bf16(s - s_hi), _bf16(z - z_hi)
        inputs = {9: _pair(kind, s_hi, s_hi), 10: _pair(kind, z_hi, z_hi), 11: _pair(kind, s_lo, s_lo),
                  12: _pair(kind, z_lo, z_lo)}
    out = run_asm(asm, {8: word, **inputs})
    return [FORMATS[kind][1](out[i]) for i in range(8)]


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_asm_dequantizes_every_code_in_channel_order(kind):
    gen = np.random.default_rng(0)
    asm = _dequant4_asm(bf16=kind == "bf16")
    for trial in range(60):
        s, z = _from_f16_bits(_to_f16_bits(gen.uniform(1e-3, 2.0))), _from_f16_bits(_to_f16_bits(gen.uniform(-8, 8)))
        codes = (np.arange(8) + trial) % 16 if trial < 16 else gen.integers(0, 16, 8)  # every code, every position
        got = _dequantize(kind, asm, codes, s, z)
        exact = [float(c) * s + z for c in codes]
        if kind == "f16":  # one rounding of the exact c*s + z
            assert got == [_from_f16_bits(_to_f16_bits(e)) for e in exact], f"codes {list(codes)}, {s}, {z}"
        else:  # head and tail products, then their sum: two bf16 roundings, so within one ulp
            for c, g, e in zip(codes, got, exact):
                ulp = 2.0 ** (math.floor(math.log2(abs(e))) - 7) if e else 0.0
                assert abs(g - e) <= ulp + 2 ** -16 * (c * s + abs(z)), f"codes {list(codes)}, {s}, {z}"
            assert sum(abs(g - e) for g, e in zip(got, exact)) < sum(abs(_bf16(e) - e) for e in exact) + \
                sum(abs(c * (s - _bf16(s)) + (z - _bf16(z))) for c in codes), "no better than bf16 scale and zero"


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_emulator_catches_a_wrong_nibble(kind):
    # the check above can fail: the same emulator on sequences that take the wrong nibbles
    asm = _dequant4_asm(bf16=kind == "bf16").replace("0x00f0000f", "0x000f00f0").replace("0x000f000f", "0x00f000f0")
    assert _dequantize(kind, asm, [1, 2, 0, 0, 0, 0, 0, 0], 1.0, 0.0)[:2] != [1.0, 2.0]


def _latent(bits=4, group=None, channels=64, tokens=5):
    x = torch.randn(2, tokens, channels)
    return Latent(*quantize_packed(x.half(), bits, group or channels), bits, group or channels)


def test_words_only_where_the_asm_applies():
    lat = _latent()
    assert lat.words(torch.float16, interpret=False) and lat.words(torch.bfloat16, interpret=False)
    assert not lat.words(torch.float16, interpret=True)  # the interpreter runs no PTX
    assert not lat.words(torch.float32, interpret=False)
    assert not _latent(bits=2).words(torch.float16, interpret=False)
    assert not _latent(bits=3).words(torch.float16, interpret=False)
    assert not _latent(group=4, channels=64).words(torch.float16, interpret=False)  # groups of half a word
    assert _latent(group=16, channels=64).words(torch.float16, interpret=False)
    assert _latent(channels=72).words(torch.float16, interpret=False)  # 36-byte rows: word-aligned
    sliced = Latent(lat.data[:, :, 2:], lat.scale, lat.zero, 4, 64)  # rows 2 bytes off a word
    assert not sliced.words(torch.float16, interpret=False)
    assert KernelConfig().word_dequant


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the PTX runs on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kernel", ["rope-group", "rope-per-head", "absorbed-group", "absorbed-per-head"])
@pytest.mark.parametrize("group", [None, 16], ids=["one-group", "g16"])
def test_words_match_triton_unpack_on_gpu(kernel, group, dtype, monkeypatch):
    from palu_fx.kernels.latent_attention import wrapper
    from palu_fx.kernels.latent_attention.quant import quant_latent_attention_triton
    from test_quant_latent_attention import check, quant_inputs

    seen = []
    launch = wrapper._launch
    monkeypatch.setattr(wrapper, "_launch", lambda k, g, a, c: (seen.append(c.get("K_WORDS")), launch(k, g, a, c)))
    args = quant_inputs(k_bits=4, k_group=group, v_group=group, Hq=4, Hkv=4, gs=1, rk=48, rv=64, Skv=203,
                        mask="add", dtype=dtype, absorbed=kernel.startswith("absorbed"))
    outs = []
    for words in (True, False):
        c = KernelConfig(block_s=32, num_warps=4, num_stages=2, num_splits=3,
                         group_heads=2 if kernel.endswith("per-head") else 0, word_dequant=words)
        outs.append(quant_latent_attention_triton(*args, config=c))
        check(outs[-1], args)
    assert seen[0] is True and seen[-1] is False
    assert (outs[0].float() - outs[1].float()).abs().max().item() < (2e-2 if dtype == torch.float16 else 1e-1)
