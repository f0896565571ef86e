"""Which knob breaks a quantized absorbed case on the GPU: the case of
``test_quant_decode_absorbed[q2-mqa-fp16]`` (2 bits, 8 query heads on one latent group of rank
16, fp16) and its neighbours, relative RMS error against the float64 reference.

Found (H200, Triton 3.6, 2026-11-29): wrong (rel-RMS ~1) for 2, 3 and 4 bits unpacked by Triton
into 16-channel tiles of 32 tokens in fp16; right in fp32, at rank 32, at 64 tokens, and with the
4-bit word-wise PTX. The wrapper now takes 64-token tiles there (``fused_attention``)."""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "kernels"))
from test_quant_latent_attention import quant_inputs  # noqa: E402

from palu_fx.kernels.latent_attention import quant  # noqa: E402
from palu_fx.kernels.latent_attention.quant_naive import quant_latent_attention_ref  # noqa: E402


def err(case, **knobs):
    args = quant_inputs(absorbed=True, **case)
    cfg = dataclasses.replace(quant.KernelConfig(block_s=32, num_warps=4, num_stages=1, num_splits=2), **knobs)
    out = quant.quant_latent_attention_triton(*args, config=cfg)
    up = [a.double() if torch.is_tensor(a) and a.is_floating_point() and i not in (2, 3, 5, 6) else a
          for i, a in enumerate(args)]
    ref = quant_latent_attention_ref(*up)
    return ((out.double() - ref).norm() / ref.norm()).item()


base = dict(k_bits=2, Hq=8, Hkv=1, gs=1, rk=16, rv=16, dtype=torch.float16)
variants = {
    "as tested": (base, {}),
    "fp32": (dict(base, dtype=torch.float32), {}),
    "4 bits": (dict(base, k_bits=4), {}),
    "3 bits": (dict(base, k_bits=3), {}),
    "rank 32": (dict(base, rk=32, rv=32), {}),
    "Hq 4 (4 per group)": (dict(base, Hq=4), {}),
    "Hq 2": (dict(base, Hq=2), {}),
    "Hq 16": (dict(base, Hq=16), {}),
    "2 groups": (dict(base, Hkv=2, Hq=16), {}),
    "no prefetch": (base, dict(prefetch=False)),
    "1 split": (base, dict(num_splits=1)),
    "64-token tiles": (base, dict(block_s=64)),
    "2 stages": (base, dict(num_stages=2)),
    "4 bits, Triton's unpack": (dict(base, k_bits=4), dict(word_dequant=False)),
}
for name, (case, knobs) in variants.items():
    try:
        print(f"{name:24s} rel-RMS {err(case, **knobs):.2e}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"{name:24s} {type(e).__name__}: {str(e)[:120]}", flush=True)
