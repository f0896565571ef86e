"""The Gluon 4-bit absorbed decode kernel (``gluon_q4.py``).

Gluon has no CPU interpreter. On the CPU: the two PTX sequences run on the emulator of
``test_dequant_words`` (every code in every position), the channel orders are permutations,
the dispatch conditions hold, and the kernel compiles for sm_90 (registers, no spills). On a
GPU: the kernel against ``quant_latent_attention_ref`` on fresh random inputs.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_dequant_words import _from_f16_bits, run_asm

from palu_fx.kernels.latent_attention import gluon_q4, quant, wrapper
from palu_fx.kernels.latent_attention.quant_naive import quant_latent_attention_ref
from palu_fx.quant import quantize_packed

CUDA = torch.cuda.is_available()
needs_gluon = pytest.mark.skipif(not gluon_q4.HAVE_GLUON, reason="this Triton has no Gluon")


# ---------------------------------------------------------------- CPU: the instruction sequences
def _sub(bits: int) -> float:
    """An fp16 subnormal's value in units of 2^-24 (the kernels' code scale)."""
    return _from_f16_bits(bits) * 2.0 ** 24


def test_key_asm_gives_channel_pairs_of_one_word():
    gen = np.random.default_rng(1)
    for trial in range(40):
        codes = (np.arange(8) + trial) % 16 if trial < 16 else gen.integers(0, 16, 8)  # every code, every nibble
        word = sum(int(c) << (4 * i) for i, c in enumerate(codes))
        out = run_asm(gluon_q4._k_asm(), {8: word})
        got = [_sub(out[o]) for o in range(8)]
        want = [float(codes[o // 2 + 4 * (o % 2)]) * (16 if (o // 2) % 2 else 1) for o in range(8)]
        assert got == want, f"codes {list(codes)}"


def test_bf16_asm_gives_unscaled_codes():
    # bf16 has 7 mantissa bits: every nibble is shifted down to bits 0-3 (the subnormal c 2^-133)
    gen = np.random.default_rng(3)
    for trial in range(40):
        a, b = (np.arange(8) + trial) % 16, gen.integers(0, 16, 8)
        wa, wb = (sum(int(c) << (4 * i) for i, c in enumerate(x)) for x in (a, b))
        out = run_asm(gluon_q4._k_asm(bf16=True), {8: wa})
        assert [out[o] for o in range(8)] == [int(a[o // 2 + 4 * (o % 2)]) for o in range(8)]
        out = run_asm(gluon_q4._v_asm(bf16=True), {8: wa, 9: wb})
        assert [(out[j] & 0xFFFF, out[j] >> 16) for j in range(8)] == [(int(a[j]), int(b[j])) for j in range(8)]


def test_value_asm_gives_one_channel_of_two_tokens():
    gen = np.random.default_rng(2)
    for trial in range(40):
        a, b = gen.integers(0, 16, 8), (np.arange(8) + trial) % 16
        wa, wb = (sum(int(c) << (4 * i) for i, c in enumerate(x)) for x in (a, b))
        out = run_asm(gluon_q4._v_asm(), {8: wa, 9: wb})
        for j in range(8):  # register j: channel j of token a (low half) and of token b (high half)
            mult = 16 if j % 2 else 1
            assert (_sub(out[j] & 0xFFFF), _sub(out[j] >> 16)) == (mult * float(a[j]), mult * float(b[j])), j


@pytest.mark.parametrize("rank", [64, 128, 256])
def test_channel_orders_are_permutations(rank):
    idx = torch.arange(rank)
    for f in (gluon_q4.key_channel, gluon_q4.value_channel):
        assert sorted(f(idx).tolist()) == list(range(rank))
    # the key fragment of a thread (its kappa in {2t, 2t+1, 2t+8, 2t+9} + 16 s, t = its column in its quad)
    # holds the channels of whole words: t and t + 4
    for t in range(4):
        kap = torch.tensor([16 * s + 8 * i + 2 * t + e for s in range(rank // 16) for i in (0, 1) for e in (0, 1)])
        words = set((gluon_q4.key_channel(kap) // 8).tolist())
        assert words == {t + 4 * m for m in range(rank // 32)}


def decode_mask(kind, B, S, gen, rnd, device):
    """A shared decode mask [B, 1, 1, S]: None, ``bool`` (keep flags), ``add`` (additive, ``rnd``),
    or ``dead`` (sequence 1 sees nothing)."""
    if kind == "bool":
        return (torch.rand(B, 1, 1, S, generator=gen) > 0.3).to(device)
    if kind == "add":
        return rnd(B, 1, 1, S)
    if kind == "dead":
        m = torch.ones(B, 1, 1, S, dtype=torch.bool)
        m[1] = False
        return m.to(device)
    return None


def _quant_case(B=2, Hq=8, R=64, S=300, mask=None, device="cpu", seed=0, G=None, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    G = G or Hq  # latent groups (Hq // G query heads read each)
    q, hk, hv = rnd(B, Hq, 1, R), rnd(B, S, G * R), rnd(B, S, G * R)
    m = decode_mask(mask, B, S, gen, rnd, device)
    return (q, *quantize_packed(hk, 4, R), *quantize_packed(hv, 4, R), None, None, None, None, None, m, R ** -0.5,
            4, R, 4, R, 0.0, False, 0)


def test_applies_only_where_the_kernel_is_exact():
    args = _quant_case()
    q = args[0]
    kl = wrapper.Latent(*args[1:4], 4, 64)
    vl = wrapper.Latent(*args[4:7], 4, 64)
    ok = dict(q=q, kl=kl, vl=vl, lk=None, softcap=0.0, is_causal=False, mask_kind=4, groups=8, interpret=False)
    words = kl.words(q.dtype, False)
    assert gluon_q4.applies(**ok) == (gluon_q4.HAVE_GLUON and words)
    for bad in (dict(interpret=True), dict(softcap=30.0), dict(is_causal=True), dict(mask_kind=2), dict(groups=1),
                dict(q=q.float()), dict(lk=torch.zeros(1)),
                dict(vl=wrapper.Latent(*quantize_packed(torch.randn(2, 300, 512).half(), 4, 32), 4, 32))):
        assert not gluon_q4.applies(**{**ok, **bad}), bad


@needs_gluon
@pytest.mark.parametrize("hpp,block_s,G", [(4, 32, 32), (2, 64, 32), (4, 32, 2)])  # G 2: 16 heads per group
def test_compiles_for_sm90_without_spills(hpp, block_s, G):
    pytest.importorskip("triton.backends.nvidia")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from kernel_resources import compile_sm90, resources

    args = _quant_case(B=2, Hq=32, S=512, mask="add", G=G)  # 32 heads: the specialization of a Llama-2-7B shape
    q = args[0]
    kl, vl = wrapper.Latent(*args[1:4], 4, 64), wrapper.Latent(*args[4:7], 4, 64)
    gp = max(1, gluon_q4.program_rows(G, 32 // G, hpp) // (32 // G))  # latent groups per program
    out = torch.empty(2, 32, 1, 64, dtype=torch.float16)
    part = torch.empty(64)
    m = args[12]
    probe = gluon_q4.launch(q, kl, vl, 4, m, m.stride(0), m.stride(3), 0.125, out, 2, 256, part, part, hpp, block_s, 3,
                            probe=True)
    res = resources(compile_sm90(probe[0], probe[2], probe[3]))
    assert res["stack"] == 0 and res["regs"] <= 255, (res["stack"], res["regs"])
    assert res["shared"] <= 3 * 2 * block_s * gp * 8 * 4 + gp * 64 * 8 * 2, res  # the ring and the queries only


# ---------------------------------------------------------------- GPU: against the reference
def _check(out, args):
    up = [a.double() if torch.is_tensor(a) and a.is_floating_point() and i not in (2, 3, 5, 6) else a
          for i, a in enumerate(args)]
    ref = quant_latent_attention_ref(*up)
    assert out.shape == ref.shape and out.dtype == args[0].dtype and torch.isfinite(out).all()
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < (4e-3 if out.dtype == torch.float16 else 1.2e-2), f"relative RMS error {err:.2e}"


CASES = [
    pytest.param(dict(), dict(), id="default"),
    pytest.param(dict(S=1000, mask="add"), dict(num_splits=3), id="S1000-add-3splits"),
    pytest.param(dict(S=777, mask="bool"), dict(num_splits=1), id="S777-bool-direct"),
    pytest.param(dict(S=70, Hq=4), dict(gluon_heads=2, gluon_block_s=32), id="S70-2heads-32tokens"),
    pytest.param(dict(S=4100, R=128, Hq=4, mask="add"), dict(gluon_heads=2, gluon_block_s=32, gluon_stages=4),
                 id="rank128-S4100"),
    pytest.param(dict(S=2049, B=3, Hq=32), dict(), id="B3-32heads-auto-splits"),
    pytest.param(dict(S=1500, Hq=8, G=2, mask="add"), dict(), id="gqa-4-per-group"),
    pytest.param(dict(S=333, Hq=16, G=8, mask="bool"), dict(num_splits=2), id="gqa-2-per-group-8-groups"),
    pytest.param(dict(S=900, Hq=8, G=1), dict(num_splits=1), id="mqa-8-heads"),
    pytest.param(dict(S=1500, Hq=16, G=1, mask="add"), dict(), id="mqa-16-heads-two-programs"),
    pytest.param(dict(S=1200, Hq=32, G=2, R=256, mask="bool"), dict(num_splits=3), id="gqa-16-per-group-rank256"),
    pytest.param(dict(S=500, Hq=32, G=2, R=128, dtype=torch.bfloat16), dict(num_splits=1), id="bf16-16-per-group"),
    pytest.param(dict(S=640, Hq=12, G=4, R=128), dict(), id="gqa-3-per-group-rank128"),
    pytest.param(dict(S=700, Hq=8, G=2, R=256, mask="add"), dict(), id="rank256-4-per-group"),
    pytest.param(dict(S=1000, mask="add", dtype=torch.bfloat16), dict(), id="bf16"),
    pytest.param(dict(S=777, Hq=8, G=2, R=128, mask="bool", dtype=torch.bfloat16), dict(num_splits=1),
                 id="bf16-gqa-rank128-direct"),
]


@pytest.mark.skipif(not CUDA or not gluon_q4.HAVE_GLUON, reason="Gluon kernels run on a GPU only")
@pytest.mark.parametrize("case,knobs", CASES)
def test_matches_reference(case, knobs, monkeypatch):
    args = _quant_case(device="cuda", **case)
    launched = []
    real = gluon_q4.launch
    monkeypatch.setattr(gluon_q4, "launch", lambda *a, **k: launched.append(1) or real(*a, **k))
    monkeypatch.setattr(quant, "dequantize_packed", lambda *a, **k: pytest.fail("dequantized outside the kernel"))
    cfg = dataclasses.replace(quant.KernelConfig(), gluon=True, **knobs)
    out = quant.quant_latent_attention_triton(*args, config=cfg)
    assert launched, "the Gluon kernel did not run"
    _check(out, args)


@pytest.mark.skipif(not CUDA or not gluon_q4.HAVE_GLUON, reason="Gluon kernels run on a GPU only")
@pytest.mark.parametrize("splits", [1, 2])
def test_fully_masked_sequence_gives_zeros(splits):
    args = _quant_case(device="cuda", mask="dead", S=500)
    cfg = dataclasses.replace(quant.KernelConfig(), gluon=True, num_splits=splits)
    out = quant.quant_latent_attention_triton(*args, config=cfg)
    assert (out[1] == 0).all()
    _check(out[:1], [a[:1] if torch.is_tensor(a) and a.dim() > 1 else a for a in args])


@pytest.mark.parametrize("groups,qpg,hpp,want", [(32, 1, 4, 4), (8, 4, 4, 1), (8, 4, 8, 2), (16, 2, 4, 2), (1, 8, 4, 1),
                                                 (6, 1, 4, 2), (4, 3, 4, 1), (2, 1, 4, 2), (6, 2, 6, 2), (9, 1, 3, 1)])
def test_program_groups(groups, qpg, hpp, want):
    gp = gluon_q4.program_groups(groups, qpg, hpp)
    assert gp == want and groups % gp == 0 and gp * qpg <= 8 and gp in (1, 2, 4)
    assert gluon_q4.program_rows(groups, qpg, hpp) == gp * qpg


@pytest.mark.parametrize("qpg", [16, 32])
def test_large_groups_span_programs_of_eight_heads(qpg):
    assert gluon_q4.program_rows(2, qpg, 4) == 8
    args = _quant_case(Hq=qpg, G=1)
    kl, vl = wrapper.Latent(*args[1:4], 4, 64), wrapper.Latent(*args[4:7], 4, 64)
    ok = dict(q=args[0], kl=kl, vl=vl, lk=None, softcap=0.0, is_causal=False, mask_kind=4, groups=1, interpret=False)
    assert gluon_q4.applies(**ok) == (gluon_q4.HAVE_GLUON and kl.words(args[0].dtype, False))
    q12 = args[0][:, :12]  # 12 heads on one group: neither at most 8 nor a multiple of 8
    assert not gluon_q4.applies(**{**ok, "q": q12})
