"""The Gluon RoPE decode kernel (``gluon_rope.py``): keys rebuilt from plain or 4-bit latents.

Gluon has no CPU interpreter. On the CPU: the dequantizing PTX runs on the emulator of
``test_dequant_words`` (every code in every nibble, fp16 and bf16), the kernel's reshapes
(emulated in torch) put every channel and rotary pair where ``key_channel`` and
``pair_of_column`` say, the dispatch conditions hold, and the kernel compiles for sm_90 without
spills. On a GPU: the kernel, through the public entry points, against the float64 references.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_dequant_words import _bf16, _pair, _unpair, run_asm
from test_gluon_q4 import decode_mask

from palu_fx.kernels.latent_attention import gluon_rope, gluon_rope_layouts, quant, wrapper
from palu_fx.kernels.latent_attention.naive import latent_attention_ref
from palu_fx.kernels.latent_attention.quant_naive import quant_latent_attention_ref
from palu_fx.quant import quantize_packed

CUDA = torch.cuda.is_available()
needs_gluon = pytest.mark.skipif(not gluon_rope.HAVE_GLUON, reason="this Triton has no Gluon")
on_gpu = pytest.mark.skipif(not CUDA or not gluon_rope.HAVE_GLUON, reason="Gluon kernels run on a GPU only")


# ---------------------------------------------------------------- CPU: the dequantizing sequence
@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_dequant_asm_gives_scaled_codes_in_nibble_pairs(kind):
    gen = np.random.default_rng(5)
    for trial in range(40):
        codes = (np.arange(8) + trial) % 16 if trial < 16 else gen.integers(0, 16, 8)  # every code, every nibble
        word = sum(int(c) << (4 * i) for i, c in enumerate(codes))
        s, z = float(np.float16(gen.uniform(0.001, 0.5))), float(np.float16(gen.normal()))
        if kind == "f16":
            inputs = {9: _pair(kind, s, s), 10: _pair(kind, z, z)}
        else:  # heads and the parts they miss
            sh, zh = _bf16(s), _bf16(z)
            inputs = {9: _pair(kind, sh, sh), 10: _pair(kind, zh, zh), 11: _pair(kind, _bf16(s - sh), _bf16(s - sh)),
                      12: _pair(kind, _bf16(z - zh), _bf16(z - zh))}
        out = run_asm(gluon_rope_layouts._dequant_asm(kind == "bf16"), {8: word, **inputs})
        for p in range(4):
            got = _unpair(kind, out[2 * p] | (out[2 * p + 1] << 16))
            want = [s * float(codes[p + 4 * e]) + z for e in (0, 1)]
            # fp16: the exact value rounded once (half an ulp); bf16: two roundings (within an ulp)
            tol = [abs(w) * (2 ** -11 if kind == "f16" else 2 ** -7) + 1e-12 for w in want]
            assert all(abs(g - w) <= t for g, w, t in zip(got, want, tol)), (codes, p, got, want)


def test_value_asm_sums_two_rows_weighted_codes():
    gen = np.random.default_rng(7)
    for trial in range(40):
        c0 = (np.arange(8) + trial) % 16 if trial < 16 else gen.integers(0, 16, 8)
        c1 = gen.integers(0, 16, 8)
        w0, w1 = (sum(int(c) << (4 * i) for i, c in enumerate(x)) for x in (c0, c1))
        p0, p1 = (float(np.float16(x)) for x in gen.uniform(0.0, 0.05, 2))  # softmax weight x scale
        out = run_asm(gluon_rope_layouts._value_asm(),
                      {8: w0, 9: w1, 10: _pair("f16", p0, p0), 11: _pair("f16", p1, p1)})
        for p in range(4):
            got = _unpair("f16", out[2 * p] | (out[2 * p + 1] << 16))
            want = [p0 * float(c0[p + 4 * e]) + p1 * float(c1[p + 4 * e]) for e in (0, 1)]
            # two fp16 roundings (the product, the FMA): within an ulp of the larger term
            assert all(abs(g - w) <= abs(w) * 2 ** -10 + 1e-9 for g, w in zip(got, want)), (c0, c1, p, got, want)


# ---------------------------------------------------------------- CPU: the orders the reshapes give
def _kappa_plain(x, R):  # the kernel's _kappa_plain on a torch tensor
    return x.reshape(-1, 4, R // 16, 2, 2).permute(0, 2, 3, 1, 4).reshape(-1, R)


def _kappa_words(mem_channels, R):
    """The kernel's _kappa_words on the channel numbers that the 8 outputs of each word hold."""
    words = mem_channels.reshape(-1, R // 8, 8)  # word w, nibble j
    # output 4k + 2i + e (stacked at (e, i, k)) = nibble p + 4e with p = 2k + i
    x = torch.stack([torch.stack([torch.stack([words[..., (2 * k + i) + 4 * e] for k in (0, 1)], -1)
                                  for i in (0, 1)], -2) for e in (0, 1)], -3)  # [.., W, e, i, k]
    x = x.reshape(-1, 4, R // 32, 2, 2, 2).permute(0, 2, 5, 4, 1, 3)
    return x.reshape(-1, R)


@pytest.mark.parametrize("rank", [32, 64, 128])
def test_operand_order_matches_key_channel(rank):
    mem = torch.arange(rank)[None, :]
    kap = torch.arange(rank)
    assert torch.equal(_kappa_plain(mem, rank)[0], gluon_rope.key_channel(kap, rank, packed=False))
    assert torch.equal(_kappa_words(mem, rank)[0], gluon_rope.key_channel(kap, rank, packed=True))
    for packed in (False, True):
        ch = gluon_rope.key_channel(kap, rank, packed)
        assert sorted(ch.tolist()) == list(range(rank))
        # thread c of a quad holds kappa 16 b + 8 hi + 2 c + e: one contiguous run of rank/4 channels
        for c in range(4):
            mine = ch[(kap // 2) % 4 == c]
            assert sorted(mine.tolist()) == list(range(c * rank // 4, (c + 1) * rank // 4))


@pytest.mark.parametrize("half", [32, 64])
def test_pair_columns_match_the_tables_reshape(half):
    cos = torch.arange(half)[None, :].float()  # pair numbers as the table row holds them
    x = torch.stack([cos, cos + 1000], -1)  # [1, half, part]: sin marked +1000
    x = x.reshape(1, 4, half // 8, 2, 2).permute(0, 4, 2, 1, 3).reshape(1, 2 * half)[0]
    part, pair = gluon_rope.pair_of_column(torch.arange(2 * half), half)
    assert torch.equal(x, (pair + 1000 * part).float())
    for c in range(4):  # accumulator column 8 j + 2 c + e of a part: a contiguous run of pairs per thread
        n = torch.arange(half)
        assert sorted(pair[:half][(n // 2) % 4 == c].tolist()) == list(range(c * half // 4, (c + 1) * half // 4))


# ---------------------------------------------------------------- inputs
def _tables(Skv, D, dtype, device, batch=1):
    ang = torch.rand(batch, Skv, D // 2, dtype=torch.float64) * 6.3 * torch.linspace(1, 40, D // 2, dtype=torch.float64)
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)


def _case(B=2, H=4, D=128, rk=64, rv=64, S=300, mask=None, dtype=torch.float16, bits=0, device="cpu", seed=0,
          table_dtype=None, per_batch=False, gs=1, Hkv=None):
    """Args of the plain or the quantized entry point (``bits``): ``H`` query heads, ``Hkv`` KV
    heads (default ``H``: multi-head attention), ``gs`` KV heads per latent group."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype).to(device)

    G = (Hkv or H) // gs
    q, hk, hv = rnd(B, H, 1, D), rnd(B, S, G * rk), rnd(B, S, G * rv)
    lk = rnd(G, gs * D, rk, s=rk ** -0.5)
    cos, sin = _tables(S, D, table_dtype or dtype, device, B if per_batch else 1)
    m = decode_mask(mask, B, S, gen, rnd, device)
    if bits:
        return (q, *quantize_packed(hk, bits, rk), *quantize_packed(hv, bits, rv), lk, None, cos, sin, None, m,
                D ** -0.5, bits, rk, bits, rv, 0.0, False, 1)
    return (q, hk, hv, lk, None, cos, sin, None, m, D ** -0.5, 0.0, False, 1)


def _latents(args, bits):
    """The (key, value) ``Latent``s the wrapper builds from a case's args."""
    if bits:
        groups = args[7].shape[0]
        return (wrapper.Latent(*args[1:4], 4, args[7].shape[-1]),
                wrapper.Latent(*args[4:7], 4, args[4].shape[-1] * 2 // groups))
    return wrapper.Latent(args[1]), wrapper.Latent(args[2])


def test_applies_only_where_the_kernel_serves():
    for bits in (0, 4):
        args = _case(bits=bits, S=128)
        q, lk, cos, sin = args[0], args[7 if bits else 3], args[9 if bits else 5], args[10 if bits else 6]
        kl, vl = _latents(args, bits)
        ok = dict(q=q, kl=kl, vl=vl, lk=lk, k_bias=None, k_norm_weight=None, cos=cos.expand(2, 128, 128),
                  sin=sin.expand(2, 128, 128), rope_style=1, softcap=0.0, is_causal=False, mask_kind=4, groups=4,
                  interpret=False)
        assert gluon_rope.applies(**ok) == gluon_rope.HAVE_GLUON, bits
        for bad in (dict(interpret=True), dict(softcap=30.0), dict(is_causal=True), dict(mask_kind=2),
                    dict(groups=2), dict(rope_style=2), dict(q=q.float()), dict(k_bias=torch.zeros(1)),
                    dict(k_norm_weight=torch.zeros(1)), dict(lk=lk[..., :48]),
                    dict(cos=cos.expand(2, 128, 128)[..., :64], sin=sin.expand(2, 128, 128)[..., :64])):
            assert not gluon_rope.applies(**{**ok, **bad}), (bits, bad)
    # two heads per latent group (multi-head): served; the same latents under 8 query heads (GQA): not
    args = _case(S=128, gs=2, rk=128, rv=128)
    kl, vl = _latents(args, 0)
    mha = {**ok, **dict(q=args[0], kl=kl, vl=vl, lk=args[3], groups=2)}
    assert gluon_rope.applies(**mha) == gluon_rope.HAVE_GLUON
    assert not gluon_rope.applies(**{**mha, **dict(q=torch.zeros(2, 8, 1, 128, dtype=torch.float16))})


@needs_gluon
@pytest.mark.parametrize("bits,rank,gs", [(0, 64, 1), (4, 64, 1), (4, 128, 1), (0, 128, 1), (0, 128, 2), (4, 128, 2)])
def test_compiles_for_sm90_without_spills(bits, rank, gs):
    """The defaults at the Llama-2-7B specialization (rank ratio 0.5 at gs 1 and 2; 1.0 at gs1):
    no spills, and two programs fit an SM (registers and shared memory, as
    ``wrapper._resident_programs`` counts)."""
    pytest.importorskip("triton.backends.nvidia")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from kernel_resources import compile_sm90, resources

    H = 32  # the specialization of a Llama-2-7B shape
    args = _case(B=2, H=H, S=512, mask="add", rk=rank, rv=rank, bits=bits, gs=gs)
    q, lk, cos, sin = args[0], args[7 if bits else 3], args[9 if bits else 5], args[10 if bits else 6]
    kl, vl = _latents(args, bits)
    m = args[12 if bits else 8]
    out = torch.empty(2, H, 1, rank, dtype=torch.float16)
    part = torch.empty(64)
    hpp, tables = gluon_rope.default_knobs(bits, H, rank, group_size=gs)
    probe = gluon_rope.launch(q, lk, kl, vl, cos.expand(2, 512, 128), sin.expand(2, 512, 128), 4, m, m.stride(0),
                              m.stride(3), 0.125, out, 2, 256, part, part, hpp, 2, tables, probe=True)
    res = resources(compile_sm90(probe[0], probe[2], probe[3]))
    # gs > 1: two heads on one latent tile spill (Triton 3.6, the H200's: 32 bytes fp16, 112 4-bit;
    # 3.9: up to 240) and are still faster than one head per program, spills and all (RESULTS.md)
    assert res["stack"] <= (256 if gs > 1 else 0) and res["regs"] <= 255, (res["stack"], res["regs"])
    assert wrapper.programs_by_registers(res["regs"], 4) >= 2 and 2 * (res["shared"] + 1024) <= 233472, res


# ---------------------------------------------------------------- GPU: against the references
def _run(args, bits, knobs, monkeypatch, kernel=gluon_rope):
    """The public entry point's result, having checked that ``kernel`` (a Gluon module) launched."""
    launched = []
    real = kernel.launch
    monkeypatch.setattr(kernel, "launch", lambda *a, **k: launched.append(1) or real(*a, **k))
    if kernel is gluon_rope:  # (plain rank 128 goes to gluon_wide.py unless told otherwise)
        knobs = {"gluon_wide_min_rank": 256, **knobs}
    cfg = dataclasses.replace(wrapper.KernelConfig(), gluon=True, **knobs)
    if bits:
        monkeypatch.setattr(quant, "dequantize_packed", lambda *a, **k: pytest.fail("dequantized outside the kernel"))
        out = quant.quant_latent_attention_triton(*args, config=cfg)
    else:
        out = wrapper.latent_attention_triton(*args, config=cfg)
    assert launched, f"{kernel.__name__} did not run"
    return out


def _check(out, args, bits):
    if bits:  # float64 everywhere but the stored fp16 scales and zeros
        up = [a.double() if torch.is_tensor(a) and a.is_floating_point() and i not in (2, 3, 5, 6) else a
              for i, a in enumerate(args)]
        ref = quant_latent_attention_ref(*up)
    else:
        ref = latent_attention_ref(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args])
    assert out.shape == ref.shape and out.dtype == args[0].dtype and torch.isfinite(out).all()
    assert out.stride() == wrapper.new_output(*out.shape, like=out).stride()  # the op's declared layout
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < (4e-3 if out.dtype == torch.float16 else 1.5e-2), f"relative RMS error {err:.2e}"


CASES = [
    pytest.param(dict(), dict(), id="fp16"),
    pytest.param(dict(bits=4), dict(), id="q4"),
    pytest.param(dict(S=1000, mask="add"), dict(num_splits=3), id="fp16-S1000-add-3splits"),
    pytest.param(dict(bits=4, S=1000, mask="add"), dict(num_splits=3), id="q4-S1000-add-3splits"),
    pytest.param(dict(bits=4, S=777, mask="bool"), dict(num_splits=1), id="q4-S777-bool-direct"),
    pytest.param(dict(S=70, H=2, rk=32, rv=128), dict(), id="fp16-S70-rk32-rv128"),
    pytest.param(dict(bits=4, S=4100, rk=128, rv=32, mask="add"), dict(gluon_rope_stages=3), id="q4-rk128-rv32-S4100"),
    pytest.param(dict(D=64, rk=32, rv=64, S=333, bits=4), dict(), id="q4-d64"),
    pytest.param(dict(B=3, H=32, S=2049), dict(), id="fp16-B3-32heads-auto-splits"),
    pytest.param(dict(dtype=torch.bfloat16, S=1000, mask="add"), dict(), id="bf16"),
    pytest.param(dict(dtype=torch.bfloat16, bits=4, S=1000, mask="bool"), dict(num_splits=2), id="bf16-q4"),
    pytest.param(dict(S=1000, mask="add"), dict(gluon_rope_tables=0, gluon_rope_regs=168),
                 id="fp16-tables-from-global-168-regs"),
    pytest.param(dict(bits=4, S=999, mask="bool", B=3),
                 dict(gluon_rope_heads=1, gluon_rope_tables=1, gluon_rope_regs=168),
                 id="q4-1head-tables-copied-168-regs"),
    pytest.param(dict(bits=4, S=1000, mask="add", H=4), dict(gluon_rope_heads=2, gluon_rope_tables=2, num_splits=3),
                 id="q4-2heads-one-table-buffer-3splits"),
    pytest.param(dict(S=777, mask="bool", H=4), dict(gluon_rope_heads=2, gluon_rope_tables=2, num_splits=1),
                 id="fp16-2heads-one-table-buffer-direct"),
    pytest.param(dict(S=300, H=6), dict(gluon_rope_heads=2, gluon_rope_tables=1, gluon_rope_stages=3),
                 id="fp16-2heads-3stages"),
    pytest.param(dict(bits=4, S=500, H=4, dtype=torch.bfloat16), dict(gluon_rope_heads=2, gluon_rope_tables=0),
                 id="bf16-q4-2heads-global-tables"),
    pytest.param(dict(S=700, table_dtype=torch.float32, per_batch=True, mask="add"), dict(),
                 id="fp16-fp32-tables-per-batch"),
    pytest.param(dict(bits=4, S=700, table_dtype=torch.float32, per_batch=True), dict(gluon_rope_tables=1),
                 id="q4-fp32-tables-per-batch-copied"),
    # two or four heads per latent group (multi-head attention): each head its slice of the group's L_k
    pytest.param(dict(gs=2, rk=128, rv=128, S=1000, mask="add"), dict(), id="gs2-fp16-add"),
    pytest.param(dict(gs=2, rk=128, rv=128, S=999, bits=4, mask="bool"), dict(num_splits=3), id="gs2-q4-bool-3splits"),
    pytest.param(dict(gs=2, rk=64, rv=32, S=500, H=6, dtype=torch.bfloat16), dict(gluon_rope_heads=2),
                 id="gs2-bf16-2heads-share-latents"),
    pytest.param(dict(gs=2, rk=64, rv=64, S=400, H=4, bits=4), dict(gluon_rope_heads=2, gluon_rope_tables=1),
                 id="gs2-q4-2heads-share-latents"),
    pytest.param(dict(gs=4, rk=128, rv=64, S=300, H=8, D=64, mask="add"), dict(num_splits=2), id="gs4-d64-fp16"),
    # the three-slot ring (plain, two heads of a group, key rank = value rank): fewer tiles than
    # slots, a tile count not a multiple of three, and a split boundary inside a tile
    pytest.param(dict(gs=2, rk=64, rv=64, S=70, H=8, mask="bool"), dict(), id="gs2-ring-S70-bool"),
    pytest.param(dict(gs=2, rk=128, rv=128, S=1000, B=3, dtype=torch.bfloat16, mask="bool"), dict(num_splits=3),
                 id="gs2-ring-bf16-bool-3splits"),
]


@needs_gluon
def test_three_slot_ring_only_where_it_fits():
    """Two heads of one group on plain latents with equal key and value ranks and cos/sin in
    registers take the three-slot ring (two programs fit an SM); 4-bit latents, one head per
    program, other cos/sin modes or unequal ranks take the copy stages."""
    def ring(bits=0, hpp=2, tables=0, rv=128, gs=2):
        args = _case(B=2, H=8, S=256, rk=128, rv=rv, bits=bits, gs=gs)
        q, lk, cos, sin = args[0], args[7 if bits else 3], args[9 if bits else 5], args[10 if bits else 6]
        kl, vl = _latents(args, bits)
        out = torch.empty(2, 8, 1, rv, dtype=torch.float16)
        probe = gluon_rope.launch(q, lk, kl, vl, cos, sin, 0, q, 0, 0, 0.1, out, 1, 256, out, out, hpp, 2, tables,
                                  probe=True)
        return probe[3]["RING3"]

    assert ring()
    assert not any((ring(bits=4), ring(hpp=1), ring(tables=1), ring(tables=2), ring(rv=64), ring(gs=1, hpp=2)))


@pytest.mark.parametrize("field,value", [("gluon_rope_heads", 3), ("gluon_rope_stages", 1), ("gluon_rope_tables", 5),
                                         ("gluon_rope_regs", 300), ("gluon_wide_min_rank", 64)])
def test_config_rejects_out_of_range_knobs(field, value):
    with pytest.raises(ValueError, match=field):
        wrapper.KernelConfig(**{field: value})


@pytest.mark.parametrize("bits,heads,rank,knobs,want", [
    (4, 32, 64, (0, -1), (2, 0)), (0, 32, 64, (0, -1), (2, 2)), (4, 32, 128, (0, -1), (1, 1)),
    (4, 3, 64, (0, -1), (1, 1)), (0, 8, 64, (1, -1), (1, 1)), (4, 8, 32, (5, 7), (2, 0)), (0, 8, 64, (1, 0), (1, 0)),
    (0, 32, 128, (0, -1), (1, 2)), (0, 32, 128, (0, -1, 2), (2, 0)), (4, 32, 128, (0, -1, 2), (2, 1)),
    (4, 32, 64, (2, -1, 3), (1, 1)), (0, 24, 64, (1, -1, 3), (1, 2)), (0, 12, 32, (0, 1, 4), (2, 1))])
def test_default_knobs(bits, heads, rank, knobs, want):
    assert gluon_rope.default_knobs(bits, heads, rank, *knobs) == want


@on_gpu
@pytest.mark.parametrize("case,knobs", CASES)
def test_matches_reference(case, knobs, monkeypatch):
    bits = case.get("bits", 0)
    args = _case(device="cuda", **case)
    _check(_run(args, bits, knobs, monkeypatch), args, bits)


@on_gpu
@pytest.mark.parametrize("bits", [0, 4])
@pytest.mark.parametrize("splits", [1, 2])
def test_fully_masked_sequence_gives_zeros(bits, splits, monkeypatch):
    args = _case(device="cuda", mask="dead", S=500, bits=bits)
    out = _run(args, bits, dict(num_splits=splits), monkeypatch)
    assert (out[1] == 0).all()
    _check(out[:1], [a[:1] if torch.is_tensor(a) and a.dim() > 2 and a.shape[0] == 2 else a for a in args], bits)


@needs_gluon
@pytest.mark.parametrize("bits", [0, 4])
def test_kernel_resources_records_the_gluon_launch(bits):
    # benchmarks/kernel_resources.py screens the launches a GPU call would make, on the CPU: the
    # Gluon kernel must be recorded, not launched
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import kernel_resources

    args = _case(B=2, H=4, S=256, bits=bits)
    entry = quant.quant_latent_attention_triton if bits else wrapper.latent_attention_triton
    log = kernel_resources.record(lambda: entry(*args))
    assert [fn.__name__ for fn, _, _ in log][:1] == ["rope_decode_kernel"], log
