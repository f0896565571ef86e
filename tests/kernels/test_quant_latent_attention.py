"""Triton latent attention over packed quantized latents against ``quant_latent_attention_ref``.

Same set-up as ``test_latent_attention`` (interpreter in a fresh process when there is no
GPU, fresh random inputs, relative RMS error against the reference in float64). The
reference dequantizes the same packed codes, so the kernels must match it to rounding,
whatever the quantization error itself is.
"""
from __future__ import annotations

import pytest
import torch
from test_latent_attention import DEVICE, IN_PROCESS, TOL, kernel_modules, make_inputs, run_in_fresh_process

from palu_fx.kernels.latent_attention.naive import op_strides
from palu_fx.kernels.latent_attention.quant_naive import quant_latent_attention_ref
from palu_fx.quant import quantize_packed


@pytest.mark.skipif(IN_PROCESS, reason="the kernels run in this process")
def test_quant_kernels_in_fresh_process():
    run_in_fresh_process(__file__)


@pytest.fixture(scope="module")
def qk():
    """The quantized-cache host module."""
    return kernel_modules()["quant"]


def quant_inputs(k_bits=4, v_bits=None, k_group=None, v_group=None, **case):
    """Positional args of ``quant_latent_attention_ref`` for one random case of ``make_inputs``.

    Group sizes default to one Palu group's rank (what the pass uses).
    """
    q, hk, hv, lk, kb, cos, sin, w, m, scale, softcap, causal, rope, eps = make_inputs(**case)
    G = lk.shape[0] if lk is not None else hk.shape[-1] // q.shape[-1]
    k_group = k_group or hk.shape[-1] // G
    v_group = v_group or hv.shape[-1] // G
    v_bits = v_bits or k_bits
    return (q, *quantize_packed(hk, k_bits, k_group), *quantize_packed(hv, v_bits, v_group), lk, kb, cos, sin, w, m,
            scale, k_bits, k_group, v_bits, v_group, softcap, causal, rope, eps)


def check(out, args):
    # float64 everywhere but the stored fp16 scales and zeros (args 2, 3, 5, 6)
    up = [a.double() if torch.is_tensor(a) and a.is_floating_point() and i not in (2, 3, 5, 6) else a
          for i, a in enumerate(args)]
    ref = quant_latent_attention_ref(*up)
    assert out.shape == ref.shape and out.dtype == args[0].dtype
    assert out.stride() == op_strides(*out.shape), f"strides {out.stride()}: not the op's declared layout"
    assert torch.isfinite(out).all()
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[args[0].dtype], f"relative RMS error {err:.2e}"


def no_dequantize(qk, monkeypatch):
    """Make the dequantize-first fallback fail: the call must read the packed codes in the kernel."""
    def refuse(*a, **k):
        raise AssertionError("the cache was dequantized outside the kernel")

    monkeypatch.setattr(qk, "dequantize_packed", refuse)


def cfg(qk, splits):
    return qk.KernelConfig(block_s=64 if DEVICE == "cpu" else 32, num_warps=4, num_stages=1, num_splits=splits)


# ------------------------------------------------------------------ RoPE: keys rebuilt from dequantized latents
ROPE_CASES = [
    pytest.param(dict(k_bits=4, Hq=2, Hkv=2, gs=1), id="q4-mha-gs1-half"),
    pytest.param(dict(k_bits=3, k_group=16, Hq=8, Hkv=4, gs=2, rope=2, Skv=131), id="q3-g16-gqa-gs2-interleaved-S131"),
    pytest.param(dict(k_bits=2, k_group=32, Hq=8, Hkv=4, gs=4, rk=64, rv=64, dtype=torch.float16),
                 id="q2-g32-gs4-fp16"),
    pytest.param(dict(k_bits=4, Hq=4, Hkv=1, gs=1, rk=16, rv=16, Skv=37), id="q4-mqa-rk16-S37"),
    pytest.param(dict(k_bits=4, rk=48, rv=48, Skv=70), id="q4-rank48-one-group"),
    pytest.param(dict(k_bits=3, k_group=16, v_group=16, rk=48, rv=48, Hq=8, Hkv=4, gs=2), id="q3-rank48-g16"),
    pytest.param(dict(k_bits=4, v_bits=2, k_group=16, v_group=32, Hq=8, Hkv=4, gs=2, rv=64, dtype=torch.float16),
                 id="k4-g16-v2-g32-fp16"),
    pytest.param(dict(k_bits=3, v_bits=4, rot=16, bias=True, norm=True, mask="bool"), id="q3-partial-bias-knorm-mask"),
    pytest.param(dict(k_bits=4, k_group=24, v_group=24, rk=48, rv=48), id="q4-g24-dequantized-fallback"),
]


@pytest.mark.parametrize("splits", [1, 3], ids=["split1", "split3"])
@pytest.mark.parametrize("case", ROPE_CASES)
def test_quant_decode_rope(qk, case, splits, monkeypatch):
    args = quant_inputs(**case)
    if case.get("k_group") != 24:
        no_dequantize(qk, monkeypatch)
    check(qk.quant_latent_attention_triton(*args, config=cfg(qk, splits)), args)


@pytest.mark.parametrize("hpp,merge", [(1, True), (2, True), (2, False)], ids=["1-head", "2-heads", "2-heads-unmerged"])
@pytest.mark.parametrize("case", [
    pytest.param(dict(k_bits=4, Skv=100), id="q4-rope-half"),
    pytest.param(dict(k_bits=3, k_group=16, rope=2, Skv=131, dtype=torch.float16), id="q3-g16-rope-interleaved-fp16"),
    pytest.param(dict(k_bits=2, v_bits=4, rot=16, mask="bool", rv=16), id="k2-v4-rope-partial-masked"),
    pytest.param(dict(k_bits=4, v_bits=2, k_group=16, absorbed=True, mask="bool", Skv=70), id="k4-g16-v2-absorbed"),
    pytest.param(dict(k_bits=4, dtype=torch.bfloat16, Skv=70), id="q4-rope-bf16"),
])
def test_quant_decode_per_head(qk, case, hpp, merge, monkeypatch):
    # one query head per latent group: per_head.py's kernel over packed latents
    args = quant_inputs(Hq=4, Hkv=4, gs=1, **case)
    no_dequantize(qk, monkeypatch)
    c = qk.KernelConfig(block_s=64 if DEVICE == "cpu" else 32, num_warps=4, num_stages=1, num_splits=2,
                        group_heads=hpp, merge_heads=merge)
    check(qk.quant_latent_attention_triton(*args, config=c), args)


# ------------------------------------------------------------------ absorbed: scores on dequantized latents
ABSORBED_CASES = [
    pytest.param(dict(k_bits=4, Hq=4, Hkv=4, gs=1), id="q4-mha-gs1"),
    pytest.param(dict(k_bits=3, k_group=16, v_group=32, Hq=8, Hkv=4, gs=2, rk=48, rv=64, Skv=129),
                 id="q3-g16-gqa-gs2-rk48-rv64-S129"),
    pytest.param(dict(k_bits=2, Hq=8, Hkv=1, gs=1, rk=16, rv=16, dtype=torch.float16), id="q2-mqa-fp16"),
    pytest.param(dict(k_bits=4, v_bits=3, k_group=16, Hq=8, Hkv=8, gs=4, rk=64, rv=32, mask="add"),
                 id="k4-g16-v3-gs4-add-mask"),
    pytest.param(dict(k_bits=2, k_group=16, v_group=16, Sq=5, Skv=77, causal=True), id="q2-g16-5-queries-causal"),
]


@pytest.mark.parametrize("case", ABSORBED_CASES)
def test_quant_decode_absorbed(qk, case, monkeypatch):
    args = quant_inputs(absorbed=True, **case)
    no_dequantize(qk, monkeypatch)
    check(qk.quant_latent_attention_triton(*args, config=cfg(qk, 2)), args)


def test_fully_masked_row_gives_zeros(qk):
    args = list(quant_inputs(k_bits=4, mask="bool", Skv=70))
    args[12][1] = False  # sequence 1 sees nothing
    out = qk.quant_latent_attention_triton(*args, config=cfg(qk, 2))
    assert (out[1] == 0).all()
    check(out, args)


@pytest.mark.parametrize("absorbed", [False, True], ids=["rope", "absorbed"])
def test_prefill_dequantizes_then_unquantized_path(qk, absorbed):
    args = quant_inputs(k_bits=3, k_group=16, Sq=48, Skv=48, causal=True, absorbed=absorbed)
    check(qk.quant_latent_attention_triton(*args), args)  # Sq * heads per group > the fused limit


@pytest.mark.parametrize("shape", ["decode", "prefill"])
def test_values_rebuilt_in_the_op(qk, shape, monkeypatch):
    # lv (each KV head's value reconstruction): decode reads the packed codes in the kernel
    # and applies lv after it; prefill dequantizes and rebuilds the values (rv 64 > Dv 32)
    kw = dict(Sq=1, Skv=70) if shape == "decode" else dict(Sq=40, Skv=40, causal=True)
    args = quant_inputs(k_bits=4, Hq=4, Hkv=4, gs=4, rk=64, rv=64, **kw)
    lv = make_inputs(Hkv=4, gs=4, rv=64, values=True)[14]
    args = args + (lv,)
    if shape == "decode":
        no_dequantize(qk, monkeypatch)
    out = qk.quant_latent_attention_triton(*args, config=cfg(qk, 2) if shape == "decode" else None)
    assert out.shape[-1] == 32 and out.stride() == op_strides(*out.shape)
    check(out, args)


@pytest.mark.parametrize("case", [dict(Sq=1, Skv=20), dict(Sq=7, Skv=7, causal=True, k_bits=3, v_bits=2)])
def test_ops_pass_opcheck(case):
    # torch.library's checks (schema, fake against real: shapes, dtypes, strides) of the
    # quantized attention and of the cache write's quantizer, on the CPU
    import palu_fx.ops  # noqa: F401  (registers torch.ops.palu)

    torch.library.opcheck(torch.ops.palu.quant_latent_attention.default, quant_inputs(**case))
    h = torch.randn(2, 5, 64)
    torch.library.opcheck(torch.ops.palu.quantize_latent.default, (h, case.get("k_bits", 4), 32))


def test_op_runs_triton_when_forced(qk, monkeypatch):
    import palu_fx.ops  # noqa: F401  (registers torch.ops.palu)

    args = quant_inputs(k_bits=4, k_group=16, Hq=8, Hkv=4, gs=2, mask="bool")
    monkeypatch.setenv("PALU_FX_KERNEL", "triton")
    out = torch.ops.palu.quant_latent_attention(*args)
    torch.testing.assert_close(out, qk.quant_latent_attention_triton(*args), rtol=0, atol=0)
    check(out, args)


def test_tile_layouts(qk):
    assert qk.tile_layout_ok(64, 4, 64) and qk.tile_layout_ok(48, 3, 48) and qk.tile_layout_ok(48, 2, 16)
    assert not qk.tile_layout_ok(48, 4, 24)  # two groups of 24: not a power of two
    assert not qk.tile_layout_ok(64, 3, 4)  # 3-bit groups need 8 channels per byte plane
    assert not qk.tile_layout_ok(64, 4, 128)  # a group wider than the Palu group


def test_compressed_program_runs_the_kernels(qk, monkeypatch):
    # a quantized exported decoder (3 bits, G-LRD): prefill and decode steps through the
    # Triton path agree with the reference path
    from transformers import LlamaConfig, LlamaForCausalLM

    import palu_fx

    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, head_dim=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(DEVICE).eval()
    ep = palu_fx.compress_exported(palu_fx.export_decoder(model, batch_size=2, max_cache_len=80),
                                   palu_fx.PaluConfig(rank_ratio=0.5, group_size=2, bits=3))
    ids = torch.randint(3, 128, (2, 67), device=DEVICE)
    outs = []
    for kernel in ("triton", "reference"):
        monkeypatch.setenv("PALU_FX_KERNEL", kernel)
        mod = ep.module()
        with torch.no_grad():
            o = [mod(input_ids=ids[:, :64], cache_position=torch.arange(64, device=DEVICE))]
            o += [mod(input_ids=ids[:, t:t + 1], cache_position=torch.tensor([t], device=DEVICE))
                  for t in range(64, 67)]
        outs.append(torch.cat(o, 1).double())
    err = ((outs[0] - outs[1]).norm() / outs[1].norm()).item()
    assert err < (1e-5 if DEVICE == "cpu" else 1e-3), f"relative error {err:.2e}"  # GPU: other summation orders


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "in-loop-loads"])
@pytest.mark.parametrize("kernel", ["rope-group", "rope-per-head", "absorbed-group", "absorbed-per-head"])
def test_scales_loaded_a_tile_ahead(qk, kernel, prefetch, monkeypatch):
    # per-token scales/zeros (one quantization group per Palu group) and the mask row are
    # loaded one tile ahead (KernelConfig.prefetch); several tiles, a ragged last one
    args = quant_inputs(k_bits=4, Hq=4, Hkv=4, gs=1, rk=32, rv=32, Skv=150, mask="add",
                        absorbed=kernel.startswith("absorbed"))
    no_dequantize(qk, monkeypatch)
    c = qk.KernelConfig(block_s=16 if DEVICE == "cpu" else 32, num_warps=4, num_stages=1, num_splits=2,
                        group_heads=4 if kernel.endswith("per-head") else 0, prefetch=prefetch)
    check(qk.quant_latent_attention_triton(*args, config=c), args)


@pytest.mark.parametrize("hq,hkv,splits", [(8, 8, 3), (8, 2, 2), (4, 1, 1), (16, 1, 2)],
                         ids=["mha-3", "gqa-2", "mqa-direct", "mqa-16-heads-over-two-programs"])
def test_gluon_host_side_merges_the_kernels_partials(qk, hq, hkv, splits, monkeypatch):
    # The Gluon kernel runs on a GPU only; here a float64 reference stands in for it and writes
    # what the kernel writes (gluon_q4.launch: per split, one row per query head of a program,
    # the normalized partial output and its base-2 LSE; or the output itself with one split), so
    # the host side (programs, split plan, merge) runs for real under the interpreter.
    import math

    from palu_fx.kernels.latent_attention import gluon_q4
    from palu_fx.quant import dequantize_packed

    wrapper = kernel_modules()["wrapper"]
    args = quant_inputs(k_bits=4, Hq=hq, Hkv=hkv, gs=1, rk=64, rv=64, Skv=700, mask="add", absorbed=True,
                        dtype=torch.float16)
    launched = []

    def fake_launch(q, kl, vl, mask_kind, mask, sm_b, sm_k, scale, out, nsplit, chunk, part, lse, heads_per_program,
                    *knobs, probe=False):
        B, Hq, _, R = q.shape
        G = kl.channels // R
        qpg = Hq // G
        rows = gluon_q4.program_rows(G, qpg, heads_per_program)
        k = dequantize_packed(kl.data, kl.scale, kl.zero, 4, R, torch.float64).view(B, -1, G, R)
        v = dequantize_packed(vl.data, vl.scale, vl.zero, 4, R, torch.float64).view(B, -1, G, R)
        m = args[12].double().view(B, -1)
        launched.append(nsplit)
        for b in range(B):
            for h in range(Hq):
                pid_x, r = divmod(b * Hq + h, rows)
                for s in range(nsplit):
                    lo, hi = s * chunk, min(s * chunk + chunk, k.shape[1])
                    logit = (k[b, lo:hi, h // qpg] @ q[b, h, 0].double()) * scale + m[b, lo:hi]
                    o = torch.softmax(logit, 0) @ v[b, lo:hi, h // qpg]
                    if nsplit == 1:
                        out[b, h, 0] = o.to(out.dtype)
                    else:
                        slot = pid_x * nsplit + s
                        part[(slot * rows + r) * R:(slot * rows + r + 1) * R] = o.float()
                        lse[slot * rows + r] = torch.logsumexp(logit, 0).item() / math.log(2)

    monkeypatch.setattr(gluon_q4, "applies", lambda *a: True)
    monkeypatch.setattr(gluon_q4, "launch", fake_launch)
    monkeypatch.setattr(wrapper, "_resident_cached", lambda *a: 2)
    monkeypatch.setattr(wrapper, "_num_sms", lambda index: 4)
    cfg = qk.KernelConfig(num_splits=splits)
    check(qk.quant_latent_attention_triton(*args, config=cfg), args)
    assert launched == [splits]


@pytest.mark.parametrize("hq,splits,hpp", [(8, 3, 2), (4, 1, 2), (6, 2, 1)], ids=["2heads-3splits", "direct", "1head"])
def test_gluon_rope_host_side_merges_the_kernels_partials(qk, hq, splits, hpp, monkeypatch):
    # As above for the Gluon RoPE kernel (gluon_rope.launch): a float64 reference writes its
    # outputs or its split partials (one row per head of a program), keys rebuilt with RoPE
    import math

    from palu_fx.kernels.latent_attention import gluon_rope
    from palu_fx.kernels.latent_attention.naive import reconstruct_keys
    from palu_fx.quant import dequantize_packed

    wrapper = kernel_modules()["wrapper"]
    args = quant_inputs(k_bits=4, Hq=hq, Hkv=hq, gs=1, D=64, rk=32, rv=32, Skv=600, mask="add", dtype=torch.float16)
    launched = []

    def fake_launch(q, lk, kl, vl, cos, sin, mask_kind, mask, sm_b, sm_k, scale, out, nsplit, chunk, part, lse,
                    heads_per_program, *knobs, probe=False):
        B, Hq, _, D = q.shape
        R = lk.shape[-1]
        hk = dequantize_packed(kl.data, kl.scale, kl.zero, 4, R, torch.float64)
        keys = reconstruct_keys(hk, lk.double(), None, cos.double(), sin.double(), None, D, 1, 1e-6, torch.float64)
        v = dequantize_packed(vl.data, vl.scale, vl.zero, 4, R, torch.float64).view(B, -1, Hq, R)
        m = args[12].double().view(B, -1)
        launched.append((nsplit, heads_per_program))
        for b in range(B):
            for h in range(Hq):
                pid_x, r = divmod(b * Hq + h, heads_per_program)
                for s in range(nsplit):
                    lo, hi = s * chunk, min(s * chunk + chunk, v.shape[1])
                    logit = (keys[b, h, lo:hi] @ q[b, h, 0].double()) * scale + m[b, lo:hi]
                    o = torch.softmax(logit, 0) @ v[b, lo:hi, h]
                    if nsplit == 1:
                        out[b, h, 0] = o.to(out.dtype)
                    else:
                        row = (pid_x * nsplit + s) * heads_per_program + r
                        part[row * R:(row + 1) * R] = o.float()
                        lse[row] = torch.logsumexp(logit, 0).item() / math.log(2)

    monkeypatch.setattr(gluon_rope, "applies", lambda *a: True)
    monkeypatch.setattr(gluon_rope, "launch", fake_launch)
    monkeypatch.setattr(wrapper, "_resident_cached", lambda *a: 2)
    monkeypatch.setattr(wrapper, "_num_sms", lambda index: 4)
    cfg = qk.KernelConfig(num_splits=splits, gluon_rope_heads=hpp)
    check(qk.quant_latent_attention_triton(*args, config=cfg), args)
    assert launched == [(splits, hpp)]
