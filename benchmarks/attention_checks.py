"""Correctness checks of ``attention.py`` (run before its tables): the GPU kernels against the
float64 references on ragged lengths, masks, every group size and mode, the few-query,
prefill and bf16 paths, and the quantized-cache kernels at 2/3/4 bits."""
from __future__ import annotations

import torch

from attention import DEV, DT, SMOKE, latent_case, quantized, rope_tables
from palu_fx.kernels.latent_attention.naive import latent_attention_ref
from palu_fx.kernels.latent_attention.quant import quant_latent_attention_triton
from palu_fx.kernels.latent_attention.quant_naive import quant_latent_attention_ref
from palu_fx.kernels.latent_attention.wrapper import KernelConfig, latent_attention_triton


def check_case(name, args, tol, quant=False, cfg=None):
    """Ours vs the float64 reference (quant: the packed-cache op; stored fp16 scales/zeros kept)."""
    out = (quant_latent_attention_triton if quant else latent_attention_triton)(*args, config=cfg)
    keep = (2, 3, 5, 6) if quant else ()
    up = [a.double() if torch.is_tensor(a) and a.is_floating_point() and i not in keep else a
          for i, a in enumerate(args)]
    ref = (quant_latent_attention_ref if quant else latent_attention_ref)(*up)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    ok = bool(torch.isfinite(out).all()) and err < tol
    print(f"  check {name:<42} rel-RMS {err:.2e} {'ok' if ok else 'FAIL'}")
    return ok


def masked_cases(shapes, S):
    """(name, group size, op args) of the masked decode checks: every shape, group size and mode."""
    for sname, (Hq, Hkv, D) in shapes.items():
        for gs in (1, 2, 4):
            for rope in (True, False):
                yield f"{sname} gs{gs} {'rope' if rope else 'absorbed'}", gs, latent_case(Hq, Hkv, D, gs, 2, S, rope,
                                                                                          mask=True)


def correctness(shapes):
    """GPU kernels vs the float64 reference on ragged lengths, masks and the odd paths."""
    print("correctness (fp16 unless noted):")
    ok = True
    S = 67 if SMOKE else 4099
    for name, _, args in masked_cases(shapes, S):
        ok &= check_case(f"{name} masked", args, 5e-3)
    Hq, Hkv, D = next(iter(shapes.values()))
    args = list(latent_case(Hq, Hkv, D, 2, 2, S, True))
    args[4] = torch.randn(Hkv * D, device=DEV, dtype=DT)           # key bias
    args[7] = torch.rand(D, device=DEV, dtype=DT) + 0.5            # k-norm
    args[5], args[6] = rope_tables(S, D // 2, interleaved=True)    # partial rotary
    args[12] = 2                                                    # interleaved
    ok &= check_case("partial interleaved rope + bias + k-norm", args, 5e-3)
    q = torch.randn(2, Hq, 33, D, device=DEV, dtype=DT)
    args = list(latent_case(Hq, Hkv, D, 2, 2, S, True))
    args[0], args[10] = q, 30.0
    ok &= check_case("33 queries, softcap (fused, query tiles)", args, 5e-3)
    args = list(latent_case(Hq, Hkv, D, 4, 1, 1030, True, with_lv=True))
    args[0] = torch.randn(1, Hq, 1030, D, device=DEV, dtype=DT)
    args[11] = True
    ok &= check_case("prefill 1030 tokens causal gs4 (keys and values rebuilt + SDPA)", args, 5e-3)
    args = [a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a
            for a in latent_case(Hq, Hkv, D, 2, 2, S, True)]
    ok &= check_case("bf16 gs2 rope", args, 2.5e-2)
    return ok


def quant_correctness(shapes):
    """Quantized kernels vs ``quant_latent_attention_ref``: every group size and mode at 4
    bits, 3 and 2 bits with smaller quantization groups, per-sequence lengths (masks), a
    context that is not a multiple of any block, and the few-query / prefill / bf16 paths."""
    print("quantized-cache correctness (fp16 unless noted):")
    ok = True
    S = 67 if SMOKE else 4099
    for name, gs, base in masked_cases(shapes, S):
        for bits, qg in [(4, None)] + ([(3, 32), (2, 16)] if gs != 2 else []):
            ok &= check_case(f"{name} q{bits} group {qg or 'rank'} masked", quantized(base, bits, qg), 5e-3, quant=True)
    for sname, (Hq, Hkv, D) in shapes.items():
        if Hq == Hkv:  # per_head.py's kernel (one query head per group) at every program width
            for rope in (True, False):
                mode = "rope" if rope else "absorbed"
                base = latent_case(Hq, Hkv, D, 1, 2, S, rope, mask=True)
                for h in ((1, 2) if rope else (1, 2, 4)):  # RoPE programs take at most two heads
                    c = KernelConfig(block_s=32 if SMOKE else 64, num_warps=4, num_stages=1 if SMOKE else 3,
                                     group_heads=h)
                    ok &= check_case(f"{sname} gs1 {mode} per-head x{h} unquantized masked", base, 5e-3, cfg=c)
                    ok &= check_case(f"{sname} gs1 {mode} per-head x{h} q4 masked", quantized(base, 4), 5e-3,
                                     quant=True, cfg=c)
            ok &= check_case(f"{sname} gs1 rope group kernel q4 masked",
                             quantized(latent_case(Hq, Hkv, D, 1, 2, S, True, mask=True), 4), 5e-3, quant=True,
                             cfg=KernelConfig(block_s=64, num_warps=4, num_stages=1 if SMOKE else 3))
    Hq, Hkv, D = next(iter(shapes.values()))
    args = list(quantized(latent_case(Hq, Hkv, D, 2, 2, S, True), 4))
    args[0], args[18] = torch.randn(2, Hq, 33, D, device=DEV, dtype=DT), 30.0
    ok &= check_case("q4 33 queries, softcap (fused, query tiles)", args, 5e-3, quant=True)
    args = list(quantized(latent_case(Hq, Hkv, D, 4, 1, 1030, True, with_lv=True), 3, 32))
    args[0], args[19] = torch.randn(1, Hq, 1030, D, device=DEV, dtype=DT), True
    ok &= check_case("q3 prefill 1030 tokens causal gs4 (dequantize + SDPA)", args, 5e-3, quant=True)
    args = [a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() and i not in (2, 3, 5, 6) else a
            for i, a in enumerate(quantized(latent_case(Hq, Hkv, D, 2, 2, S, True), 4))]
    ok &= check_case("bf16 q4 gs2 rope", args, 2.5e-2, quant=True)
    if DEV == "cuda":  # the op's dispatch on CUDA is the Triton path
        import palu_fx.ops  # noqa: F401

        args = quantized(latent_case(Hq, Hkv, D, 1, 2, S, True, mask=True), 4)
        same = torch.equal(torch.ops.palu.quant_latent_attention(*args), quant_latent_attention_triton(*args))
        print(f"  check {'palu::quant_latent_attention runs the Triton kernels':<42} {'ok' if same else 'FAIL'}")
        ok &= same
    print(f"quantized-cache correctness: {'all ok' if ok else 'FAILED'}", flush=True)
    return ok
