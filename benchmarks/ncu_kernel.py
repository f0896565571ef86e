"""Run one latent-attention kernel call a few times, for Nsight Compute to profile.

The target point of issues 3 and 5 (Llama-2-7B shape, batch 8, 32k, rank ratio 0.5, gs1).
Profile the last launch of the kernel, with the clocks left alone:

    ncu --clock-control none --kernel-name regex:per_head --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section Occupancy \\
        python benchmarks/ncu_kernel.py --rope --group-heads 1

``--mask`` passes the additive ``[B, 1, 1, S]`` mask a compiled model passes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from attention import DEV, DT, latent_case, quantized, run_ours, run_ours_quant  # noqa: E402

from palu_fx.kernels.latent_attention.wrapper import KernelConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rope", action="store_true", help="keys rebuilt with RoPE (else absorbed)")
    ap.add_argument("--bits", type=int, default=0)
    ap.add_argument("--mask", action="store_true")
    ap.add_argument("--group-heads", type=int, default=-1, help="per-head kernel width; -1: the library default")
    ap.add_argument("--block-s", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--programs-per-sm", type=int, default=8)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--triton-unpack", action="store_true", help="4 bits: Triton's unpack, not the word-wise PTX")
    a = ap.parse_args()
    args = list(latent_case(32, 32, 128, 1, 8, 32768, a.rope))
    if a.mask:
        args[8] = torch.zeros(8, 1, 1, 32768, device=DEV, dtype=DT)
    args = tuple(args)
    if a.bits:
        args = quantized(args, a.bits)
    cfg = None
    if a.group_heads >= 0:
        cfg = KernelConfig(block_s=a.block_s, num_warps=a.warps, num_stages=a.stages,
                           programs_per_sm=a.programs_per_sm, group_heads=a.group_heads)
    if a.triton_unpack:
        from palu_fx.kernels.latent_attention.wrapper import choose_config

        base = cfg or choose_config(a.rope, 1, 64, 64, 128, 1, False, quantized=True)
        cfg = dataclasses.replace(base, word_dequant=False)
    run = run_ours_quant if a.bits else run_ours
    for _ in range(a.calls):
        run(args, cfg)
    torch.cuda.synchronize()
    print("done", flush=True)


if __name__ == "__main__":
    main()
