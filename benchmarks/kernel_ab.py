"""A/B timing of decode-kernel configs at the issue targets' point, interleaved over rounds.

Llama-2-7B shape (32 heads, head dim 128; ``--kv-heads 8``: Llama-3-8B's), rank ratio 0.5, gs1
(``--gs``), B=8, 32k, with the additive decode mask a compiled model passes. For each case (RoPE /
absorbed x fp16 / 4-bit latents) the default config and any ``--variant`` are timed in turn,
round after round (identical configs timed in one block differed by up to 6-12% on the H200),
and the median is printed:

    PYTHONPATH=. python benchmarks/kernel_ab.py --variant rope:2s=num_stages=2
    mkdir -p .ab/old && git archive REV palu_fx | tar -x -C .ab/old    # the code at REV (keep .ab ignored)
    PYTHONPATH=.ab/old python benchmarks/kernel_ab.py --tag old       # ... timed in its own process

A variant is ``case:name=field=value[,field=value...]`` over ``KernelConfig`` fields, with
``case`` one of rope, abs, rope4, abs4. Run two copies of the package (two processes, same
machine) to A/B a code change; ``--tag`` labels the rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(__file__))
import attention  # noqa: E402
from attention import gpu_time, latent_case, quantized, run_ours, run_ours_quant  # noqa: E402

import palu_fx  # noqa: E402
from palu_fx.kernels.latent_attention import wrapper  # noqa: E402
from palu_fx.kernels.latent_attention.wrapper import choose_config  # noqa: E402

CASES = {"rope": (True, 0), "abs": (False, 0), "rope4": (True, 4), "abs4": (False, 4)}


def parse_variant(text: str):
    case, rest = text.split(":", 1)
    name, _, fields = rest.partition("=")
    if case not in CASES:
        raise SystemExit(f"--variant {text!r}: case must be one of {sorted(CASES)}")
    kw = {}
    for item in fields.split(","):
        key, _, value = item.partition("=")
        kw[key] = value.lower() == "true" if value.lower() in ("true", "false") else int(value)
    return case, name, kw


def brief(cfg) -> str:
    """The fields of a config that differ from ``KernelConfig()``'s."""
    default = wrapper.KernelConfig()
    return " ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                    if getattr(cfg, f.name) != getattr(default, f.name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[], type=parse_variant)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--gs", type=int, default=1, help="KV heads per latent group")
    ap.add_argument("--kv-heads", type=int, default=32, help="KV heads (32 query heads; 8: the Llama-3-8B shape)")
    ap.add_argument("--rank-ratio", type=float, default=0.5, help="rank = ratio x gs x 128")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="")
    ap.add_argument("--no-mask", action="store_true", help="no attention mask (attention.py's table has none)")
    ap.add_argument("--smoke", action="store_true", help="fp32 on the CPU under TRITON_INTERPRET=1 (a script check)")
    args = ap.parse_args()
    B, S = args.batch, args.ctx
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (interpreter)"
    print(f"{device}, torch {torch.__version__}, palu_fx at {os.path.dirname(palu_fx.__file__)}; "
          f"B={B}, {S} tokens, 32 query / {args.kv_heads} KV heads, d128, rank ratio {args.rank_ratio}, gs{args.gs}, "
          f"{'no mask' if args.no_mask else 'additive mask'}; "
          f"median ms of {args.rounds} interleaved rounds", flush=True)
    rows = []
    for case in args.cases:
        rope, bits = CASES[case]
        attention.RANK_RATIO = args.rank_ratio  # (latent_case reads it)
        r = int(args.rank_ratio * args.gs * 128)
        base = choose_config(rope, args.gs, r, r, 128, args.gs * 32 // args.kv_heads, False, quantized=bits > 0)
        cfgs = {"default": base}
        for vcase, name, kw in args.variant:
            if vcase == case:
                cfgs[name] = dataclasses.replace(base, **kw)
        op = list(latent_case(32, args.kv_heads, 128, args.gs, B, S, rope))
        if not args.no_mask:
            op[8] = torch.zeros(B, 1, 1, S, device=op[0].device, dtype=op[0].dtype)
        if bits:
            op, run = quantized(op, bits), run_ours_quant
        else:
            run = run_ours
        times = {n: [] for n in cfgs}
        for _ in range(args.rounds):
            for n, cfg in cfgs.items():
                times[n].append(gpu_time(lambda: run(op, cfg), [()]))
        for n, t in times.items():
            rows.append([args.tag, case, n, f"{statistics.median(t):.3f}", f"{min(t):.3f}-{max(t):.3f}", brief(cfgs[n])])
            print(rows[-1], flush=True)
        del op
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"programs resident per SM, per compiled variant: {sorted(set(wrapper._RESIDENT.values()))}")
    print(tabulate(rows, headers=["code", "case", "config", "ms", "range", "KernelConfig"], tablefmt="github"))


if __name__ == "__main__":
    main()
