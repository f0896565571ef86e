"""How many sequence splits (flash-decoding) the gs1 fp16 kernels should make, timed on a GPU.

The "waves" column is ``KernelConfig.fill_waves``: the fewest splits that fill whole waves of
the programs an SM holds at once (from the compiled kernel), the RoPE default since 13:30 UTC.

``KernelConfig.programs_per_sm`` sets the split count: splits = ceil(programs_per_sm x SMs /
programs per split). In one ``attention.py --wide`` row, one split per program at batch 8
(256 programs, one wave at two resident programs per SM, no merge pass) timed 0.707 ms
against 0.749-0.793 for the default of 8 per SM, but identical configs in that row differed
by 6%. This script times the candidates interleaved over rounds (median of the rounds) at
several batch sizes and contexts, with the additive decode mask a compiled model passes:

    PYTHONPATH=. python benchmarks/split_counts.py
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(__file__))
from attention import gpu_time, latent_case, run_ours  # noqa: E402

from palu_fx.kernels.latent_attention import wrapper  # noqa: E402
from palu_fx.kernels.latent_attention.wrapper import _num_sms, _split_plan, choose_config  # noqa: E402

SHAPES = [(1, 32768), (8, 16384), (8, 32768), (32, 32768)]
PPSM = [1, 2, 4, 8, 16]
ROUNDS = 3


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B x S, 32 heads, d128, rank ratio 0.5, gs1, "
          f"additive mask; ms (median of {ROUNDS} interleaved rounds)", flush=True)
    rows = []
    for rope in (True, False):
        base = choose_config(rope, 1, 64, 64, 128, 1, False)
        for B, S in SHAPES:
            args = list(latent_case(32, 32, 128, 1, B, S, rope))
            args[8] = torch.zeros(B, 1, 1, S, device="cuda", dtype=args[0].dtype)
            cfgs = {p: dataclasses.replace(base, programs_per_sm=p, fill_waves=False) for p in PPSM}
            cfgs["waves"] = dataclasses.replace(base, fill_waves=True)
            times = {p: [] for p in cfgs}
            for _ in range(ROUNDS):
                for p, cfg in cfgs.items():
                    times[p].append(gpu_time(lambda: run_ours(args, cfg), [()]))
            n_base = B * 32 // base.group_heads
            med = {p: statistics.median(t) for p, t in times.items()}
            best = min(PPSM, key=med.get)
            splits = {p: _split_plan(dataclasses.replace(base, programs_per_sm=p, fill_waves=False), n_base, S,
                                     _num_sms(0))[0] for p in PPSM}
            rows.append(["RoPE" if rope else "absorbed", B, S // 1024] +
                        [f"{med[p]:.3f} ({splits[p]})" for p in PPSM] + [best, f"{med['waves']:.3f}"])
            print(rows[-1], flush=True)
            del args
            torch.cuda.empty_cache()
    print(f"SMs: {_num_sms(0)}; cells: ms (splits); programs resident per SM, per compiled variant: "
          f"{sorted(set(wrapper._RESIDENT.values()))}")
    print(tabulate(rows, headers=["mode", "B", "ctx k"] + [f"{p}/SM" for p in PPSM] + ["best of those", "waves"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
