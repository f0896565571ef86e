"""The Gluon RoPE decode kernel for wide latent groups (``gluon_wide.py``): multi-head attention at
key rank 256 per group (group size 4 at rank ratio 0.5), both ``wgmma`` operands in shared
memory, values accumulated one tile behind the key product.

Gluon has no CPU interpreter. On the CPU: the dispatch conditions (disjoint from the other Gluon
RoPE kernels'), the wrapper's launch, and sm_90 compiles (no spills where the default runs, the
shared memory it claims). On a GPU: the kernel, through the public entry point, against the
float64 reference.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_gluon_rope import _case
from test_gluon_rope import _check as check_against_reference
from test_gluon_rope import _run as run_kernel

from palu_fx.kernels.latent_attention import gluon_gqa, gluon_rope, gluon_wide, wrapper

CUDA = torch.cuda.is_available()
needs_gluon = pytest.mark.skipif(not gluon_wide.HAVE_GLUON, reason="this Triton has no Gluon")
on_gpu = pytest.mark.skipif(not CUDA or not gluon_wide.HAVE_GLUON, reason="Gluon kernels run on a GPU only")


def _wide(**kw):
    """A multi-head case at group size 4 and rank 256 unless told otherwise."""
    return _case(**{**dict(H=8, gs=4, rk=256, rv=256), **kw})


def _applies(args, min_rank=128, **over):
    q, hk, hv, lk, cos, sin = args[0], args[1], args[2], args[3], args[5], args[6]
    B, S = hk.shape[:2]
    kw = dict(q=q, kl=wrapper.Latent(hk), vl=wrapper.Latent(hv), lk=lk, k_bias=None, k_norm_weight=None,
              cos=cos.expand(B, S, -1), sin=sin.expand(B, S, -1), rope_style=1, softcap=0.0, is_causal=False,
              mask_kind=4, groups=lk.shape[0], interpret=False)
    kw.update(over)
    return (gluon_wide.applies(**kw, min_rank=min_rank), gluon_rope.applies(**kw), gluon_gqa.applies(**kw))


def test_applies_only_where_the_kernel_serves():
    args = _wide(S=128)
    assert _applies(args) == (gluon_wide.HAVE_GLUON, False, False)  # this kernel, and only it
    for bad in (dict(interpret=True), dict(softcap=30.0), dict(is_causal=True), dict(mask_kind=2),
                dict(rope_style=2), dict(q=args[0].float()), dict(k_bias=torch.zeros(1)),
                dict(k_norm_weight=torch.zeros(1)), dict(kl=wrapper.Latent(args[1].float())),
                dict(vl=wrapper.Latent(args[2][..., :-64])),  # value rank 240 (not a power of two)
                dict(cos=args[5][..., :64], sin=args[6][..., :64])):
        assert _applies(args, **bad)[0] is False, bad
    assert _applies(_wide(S=128, rv=64))[0] == gluon_wide.HAVE_GLUON  # value rank 64
    assert _applies(_wide(S=128, D=64, gs=8, H=8))[0] == gluon_wide.HAVE_GLUON  # head dim 64
    # rank 128 (``gluon_rope.py`` serves it too; the wrapper asks this kernel first, from
    # ``KernelConfig.gluon_wide_min_rank``), not below; 512: the shared memory of one program
    assert _applies(_wide(S=128, gs=2, rk=128, rv=128)) == (gluon_wide.HAVE_GLUON, gluon_rope.HAVE_GLUON, False)
    assert _applies(_wide(S=128, gs=2, rk=128, rv=128), min_rank=256)[0] is False
    assert _applies(_wide(S=128, gs=2, rk=64, rv=64))[0] is False
    assert _applies(_wide(S=128, gs=3, H=6, rk=192, rv=192))[0] is False  # (tiles of power-of-two widths)
    assert _applies(_wide(S=128, rk=512, rv=64))[0] is False  # (the shared memory of one program)
    # GQA at rank 256 (4 query heads per KV head): not multi-head attention
    assert _applies(_wide(S=128, H=16, Hkv=4))[0] is False
    # 4-bit latents stay with the Triton kernels
    q4 = _wide(S=128, bits=4)
    kl, vl = wrapper.Latent(*q4[1:4], 4, 256), wrapper.Latent(*q4[4:7], 4, 256)
    assert _applies(args, kl=kl, vl=vl)[0] is False


def test_wrapper_launches_it_for_wide_groups():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from kernel_resources import record

    args = _wide(S=256, mask="add")
    names = [fn.__name__ for fn, _, _ in record(lambda: wrapper.latent_attention_triton(*args))]
    assert ("wide_rope_decode_kernel" in names) == gluon_wide.HAVE_GLUON, names
    cfg = wrapper.KernelConfig(gluon=False)
    names = [fn.__name__ for fn, _, _ in record(lambda: wrapper.latent_attention_triton(*args, config=cfg))]
    assert "wide_rope_decode_kernel" not in names, names


@needs_gluon
@pytest.mark.parametrize("D,rk,rv,pairs", [(128, 256, 256, True), (128, 256, 64, True), (64, 256, 128, True),
                                           (128, 256, 256, False), (128, 128, 128, True)])
def test_compiles_for_sm90(D, rk, rv, pairs):
    """The Llama-2-7B specialization at gs4 (rank ratio 0.5) and neighbours: the shared memory that
    ``applies`` counts, and at most 128 bytes of spills with the values summed in fp16 pairs (the
    fp16 default; Triton 3.6, the H200's stack: none; 3.9: 112 bytes at rank 256). fp32 sums
    (bf16's) spill about 100 bytes and were 2x slower on the H200 (RESULTS.md)."""
    pytest.importorskip("triton.backends.nvidia")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from kernel_resources import compile_sm90, resources

    H = 32
    args = _wide(B=2, H=H, D=D, gs=rk * 2 // D, rk=rk, rv=rv, S=512, mask="add")
    q, hk, hv, lk, cos, sin, m = args[0], args[1], args[2], args[3], args[5], args[6], args[8]
    out = torch.empty(2, H, 1, rv, dtype=torch.float16)
    part = torch.empty(64)
    probe = gluon_wide.launch(q, lk, wrapper.Latent(hk), wrapper.Latent(hv), cos.expand(2, 512, D),
                              sin.expand(2, 512, D), 4, m, m.stride(0), m.stride(3), 0.125, out, 2, 256, part, part,
                              pairs, probe=True)
    res = resources(compile_sm90(probe[0], probe[2], probe[3]), loop=True)
    assert res["shared"] <= gluon_wide.shared_bytes(rk, rv, D) + 1024, res
    assert res["regs"] <= 255, res
    if pairs:
        assert res["stack"] <= 128 and res["loop"]["spills"] <= 32, res
    if rk == 128:  # two programs per SM (registers and shared memory, as ``wrapper._resident_programs`` counts)
        assert res["stack"] == 0 and wrapper.programs_by_registers(res["regs"], 4) >= 2, res
        assert 2 * (res["shared"] + 1024) <= 233472, res


# ---------------------------------------------------------------- GPU: against the reference
def _run(args, knobs, monkeypatch):
    return run_kernel(args, 0, knobs, monkeypatch, gluon_wide)


CASES = [
    pytest.param(dict(), dict(), id="gs4-rank256"),
    pytest.param(dict(S=1000, mask="add"), dict(num_splits=3), id="S1000-add-3splits"),
    pytest.param(dict(S=777, mask="bool"), dict(num_splits=1), id="S777-bool-direct"),
    pytest.param(dict(S=64), dict(num_splits=1), id="one-tile"),
    pytest.param(dict(S=70, mask="add"), dict(num_splits=1), id="S70-two-tiles"),
    pytest.param(dict(S=129), dict(num_splits=1), id="S129-three-tiles"),
    pytest.param(dict(B=3, H=32, S=2049), dict(), id="llama2-shape-B3-auto-splits"),
    pytest.param(dict(dtype=torch.bfloat16, S=1000, mask="add"), dict(), id="bf16"),
    pytest.param(dict(S=1000, mask="add"), dict(gluon_wide_pairs=False), id="fp32-value-sums"),
    pytest.param(dict(rv=64, S=333), dict(num_splits=2), id="rv64"),
    pytest.param(dict(D=64, gs=8, H=8, rv=128, S=300, mask="bool"), dict(), id="d64-gs8"),
    pytest.param(dict(S=700, table_dtype=torch.float32, per_batch=True, mask="add"), dict(),
                 id="fp32-tables-per-batch"),
    # rank 128: group size 2 at ratio 0.5, group size 1 at ratio 1.0
    pytest.param(dict(gs=2, rk=128, rv=128, S=1000, mask="add"), dict(num_splits=3), id="gs2-rank128-3splits"),
    pytest.param(dict(gs=1, H=4, rk=128, rv=128, S=777, mask="bool", dtype=torch.bfloat16), dict(),
                 id="gs1-rank128-bf16"),
    pytest.param(dict(gs=2, rk=128, rv=64, S=300, D=64, H=8), dict(), id="gs2-d64-rank128"),
]


@on_gpu
@pytest.mark.parametrize("case,knobs", CASES)
def test_matches_reference(case, knobs, monkeypatch):
    torch.manual_seed(0)
    args = _wide(device="cuda", **case)
    check_against_reference(_run(args, knobs, monkeypatch), args, 0)


@on_gpu
@pytest.mark.parametrize("splits", [1, 2])
def test_fully_masked_sequence_gives_zeros(splits, monkeypatch):
    args = _wide(device="cuda", mask="dead", S=500, H=16)  # (4 latent groups: lk's first dim is not the batch's)
    out = _run(args, dict(num_splits=splits), monkeypatch)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    check_against_reference(out[:1], [a[:1] if torch.is_tensor(a) and a.dim() > 2 and a.shape[0] == 2 else a
                                      for a in args], 0)
