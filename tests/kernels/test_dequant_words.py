"""The word-wise 4-bit dequantization (``common._DEQUANT4_ASM``, ``Latent.words``).

The PTX only runs on a GPU, where ``test_quant_latent_attention`` and the GPU test below run
it inside the kernels. On the CPU the instruction sequence itself is checked by a small
emulator of the five PTX instructions it uses, run on the real string for every byte value.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from palu_fx.kernels.latent_attention.common import _DEQUANT4_ASM
from palu_fx.kernels.latent_attention.wrapper import KernelConfig, Latent
from palu_fx.quant import quantize_packed


def _f16x2(word: int) -> np.ndarray:
    return np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16)


def _word(h: np.ndarray) -> int:
    u = h.astype(np.float16).view(np.uint16)
    return int(u[0]) | (int(u[1]) << 16)


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


def run_asm(asm: str, inputs: dict[int, int]) -> dict[int, np.float16]:
    """Execute the instruction sequence on 32-bit ``inputs`` ($n -> value); returns the 16-bit outputs."""
    regs: dict[str, int] = {f"${n}": v for n, v in inputs.items()}
    outs: dict[int, np.float16] = {}

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    for line in asm.replace("{\n", "\n").split("\n"):
        line = line.strip().rstrip(";")
        if not line or line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):  # unpack a half2 into two 16-bit outputs
            lo, hi, src = re.match(r"\{\s*\$(\d+),\s*\$(\d+)\},\s*(\S+)", rest).groups()
            h = _f16x2(regs[src])
            outs[int(lo)], outs[int(hi)] = h[0], h[1]
            continue
        d, *a = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            regs[d] = val(a[0])
        elif op == "prmt.b32":
            regs[d] = _prmt(val(a[0]), val(a[1]), val(a[2]))
        elif op == "lop3.b32":
            regs[d] = _lop3(val(a[0]), val(a[1]), val(a[2]), val(a[3]))
        elif op == "sub.f16x2":
            regs[d] = _word(_f16x2(val(a[0])).astype(np.float64) - _f16x2(val(a[1])).astype(np.float64))
        elif op == "fma.rn.f16x2":  # exact in float64 for fp16 operands, then one rounding
            x, y, z = (_f16x2(val(t)).astype(np.float64) for t in a)
            regs[d] = _word(x * y + z)
        else:
            raise AssertionError(f"the emulator does not know {op}")
    return outs


def test_asm_dequantizes_every_code_in_channel_order():
    gen = np.random.default_rng(0)
    asm = _DEQUANT4_ASM.value
    for trial in range(40):
        s = np.float16(gen.uniform(1e-3, 2.0))
        z = np.float16(gen.uniform(-8, 8))
        codes = gen.integers(0, 16, 8)
        if trial < 16:  # every code in every channel position
            codes = (np.arange(8) + trial) % 16
        word = sum(int(c) << (4 * i) for i, c in enumerate(codes))
        s2 = _word(np.array([s, np.float16(s * np.float16(0.0625))]))
        z2 = _word(np.array([z, z]))
        out = run_asm(asm, {8: word, 9: s2, 10: z2})
        got = np.array([out[i] for i in range(8)], dtype=np.float64)
        want = (codes.astype(np.float64) * np.float64(s) + np.float64(z)).astype(np.float16).astype(np.float64)
        np.testing.assert_array_equal(got, want, err_msg=f"codes {codes}, scale {s}, zero {z}")


def test_emulator_catches_a_wrong_nibble():
    # the check above can fail: the same emulator on a sequence that swaps the nibbles
    asm = _DEQUANT4_ASM.value.replace("0x00f0000f", "0x000f00f0")
    s2, z2 = _word(np.array([1.0, 0.0625])), _word(np.array([0.0, 0.0]))
    out = run_asm(asm, {8: 0x00000021, 9: s2, 10: z2})
    assert float(out[0]) != 1.0 or float(out[1]) != 2.0


def _latent(bits=4, group=None, channels=64, tokens=5):
    x = torch.randn(2, tokens, channels)
    return Latent(*quantize_packed(x.half(), bits, group or channels), bits, group or channels)


def test_words_only_where_the_asm_applies():
    lat = _latent()
    assert lat.words(torch.float16, interpret=False)
    assert not lat.words(torch.float16, interpret=True)  # the interpreter runs no PTX
    assert not lat.words(torch.bfloat16, interpret=False)
    assert not lat.words(torch.float32, interpret=False)
    assert not _latent(bits=2).words(torch.float16, interpret=False)
    assert not _latent(bits=3).words(torch.float16, interpret=False)
    assert not _latent(group=4, channels=64).words(torch.float16, interpret=False)  # groups of half a word
    assert _latent(group=16, channels=64).words(torch.float16, interpret=False)
    odd = _latent(channels=72)  # 36-byte rows: word-aligned
    assert odd.words(torch.float16, interpret=False)
    sliced = Latent(lat.data[:, :, 2:], lat.scale, lat.zero, 4, 64)  # rows 2 bytes off a word
    assert not sliced.words(torch.float16, interpret=False)
    assert KernelConfig().word_dequant


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the PTX runs on a GPU")
@pytest.mark.parametrize("kernel", ["rope-group", "rope-per-head", "absorbed-group", "absorbed-per-head"])
@pytest.mark.parametrize("group", [None, 16], ids=["one-group", "g16"])
def test_words_match_triton_unpack_on_gpu(kernel, group, monkeypatch):
    from palu_fx.kernels.latent_attention import wrapper
    from palu_fx.kernels.latent_attention.quant import quant_latent_attention_triton
    from test_quant_latent_attention import check, quant_inputs

    seen = []
    launch = wrapper._launch
    monkeypatch.setattr(wrapper, "_launch", lambda k, g, a, c: (seen.append(c.get("K_WORDS")), launch(k, g, a, c)))
    args = quant_inputs(k_bits=4, k_group=group, v_group=group, Hq=4, Hkv=4, gs=1, rk=48, rv=64, Skv=203,
                        mask="add", dtype=torch.float16, absorbed=kernel.startswith("absorbed"))
    outs = []
    for words in (True, False):
        c = KernelConfig(block_s=32, num_warps=4, num_stages=2, num_splits=3,
                         group_heads=2 if kernel.endswith("per-head") else 0, word_dequant=words)
        outs.append(quant_latent_attention_triton(*args, config=c))
        check(outs[-1], args)
    assert seen[0] is True and seen[-1] is False
    assert (outs[0] - outs[1]).abs().max().item() < 2e-2
