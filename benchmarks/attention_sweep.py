"""The tuning sweep of ``attention.py`` (without ``--no-sweep``): candidate configs per kernel
variant at one (batch, context), the best per (shape, group size, RoPE) for the table."""
from __future__ import annotations

import time

from attention import gpu_time, latent_case, rope_tables, run_ours
from palu_fx.kernels.latent_attention.wrapper import KernelConfig


# Candidates screened without a GPU (sm_90 compile, cuobjdump resource usage): no register
# spills (gs 4: the least spilling, 64-150 B) and shared memory under 227 KB.
# (block_s, num_warps, num_stages, chunk, heads_per_program, dynamic_heads)
ROPE_CANDIDATES = {
    1: [(64, 4, 1, 64, 1, 0), (64, 4, 2, 64, 1, 0), (64, 4, 3, 64, 1, 0), (64, 8, 3, 64, 1, 0),
        (128, 8, 1, 64, 1, 0), (128, 8, 2, 64, 1, 0), (128, 8, 3, 64, 1, 0)],
    2: [(64, 4, 1, 64, 1, 0), (64, 4, 2, 64, 1, 0), (64, 8, 2, 64, 1, 0), (128, 8, 1, 64, 1, 0),
        (128, 8, 2, 64, 1, 0), (64, 8, 2, 32, 0, 1), (128, 8, 2, 32, 0, 1), (128, 8, 3, 32, 0, 1),
        (64, 4, 1, 32, 1, 0), (128, 8, 2, 32, 1, 0)],
    4: [(64, 8, 2, 32, 2, 1), (64, 8, 2, 32, 0, 1), (64, 4, 1, 32, 1, 0), (128, 8, 2, 32, 0, 1),
        (64, 8, 1, 32, 1, 0)],
}
ABSORBED_CANDIDATES = {  # (block_s, num_warps, num_stages)
    1: [(64, 4, 3), (128, 4, 3), (128, 8, 4), (256, 8, 3), (256, 4, 2), (128, 4, 2)],
    2: [(64, 4, 3), (64, 8, 4), (128, 8, 3), (128, 4, 2), (128, 8, 2)],
    4: [(64, 4, 2), (64, 4, 3), (64, 8, 2), (64, 8, 3)],
}


def sweep_candidates(rope, gs):
    if not rope:
        return [KernelConfig(block_s=bs, num_warps=w, num_stages=st) for bs, w, st in ABSORBED_CANDIDATES[gs]]
    return [KernelConfig(block_s=bs, num_warps=w, num_stages=st, chunk=ch, heads_per_program=hpp,
                         dynamic_heads=bool(dyn)) for bs, w, st, ch, hpp, dyn in ROPE_CANDIDATES[gs]]


def sweep(shapes, B, S, deadline):
    """Time candidate configs per kernel variant at one (batch, context); returns the best."""
    best = {}
    ranked_first = {}
    for sname, (Hq, Hkv, D) in shapes.items():
        tables = rope_tables(S, D)
        for gs in (1, 2, 4):
            for rope in (True, False):
                if time.time() > deadline:
                    print(f"  sweep: out of time before {sname} gs{gs} rope={rope}")
                    return best
                args = latent_case(Hq, Hkv, D, gs, B, S, rope, tables)
                results = []
                cands = sweep_candidates(rope, gs)
                if (sname, gs, rope) not in ranked_first and ranked_first.get(("*", gs, rope)):
                    cands = ranked_first[("*", gs, rope)][:3]  # later shapes: the first one's top 3
                for c in cands:
                    try:
                        results.append((gpu_time(run_ours, [(args, c)], max_iters=15), c))
                    except Exception as e:  # noqa: BLE001 - a config that fails to compile is skipped
                        print(f"  {sname} gs{gs} rope={rope} {c}: {type(e).__name__} {str(e)[:200]}")
                if not results:
                    continue
                results.sort(key=lambda x: x[0])
                ranked_first.setdefault(("*", gs, rope), [r[1] for r in results])
                t0, c0 = results[0]
                for pps in (2, 8, 16):
                    c = KernelConfig(**{**c0.__dict__, "programs_per_sm": pps})
                    results.append((gpu_time(run_ours, [(args, c)], max_iters=15), c))
                t, c = min(results, key=lambda x: x[0])
                best[(sname, gs, rope)] = c
                if rope:  # what the rotary tables cost: same keys rebuilt, not rotated
                    a2 = list(args)
                    a2[5] = a2[6] = None
                    a2[12] = 0
                    try:
                        t2 = gpu_time(run_ours, [(tuple(a2), c)], max_iters=15)
                        print(f"  diag {sname} gs{gs}: rebuild without RoPE {t2:.3f} ms vs {t:.3f} with")
                    except Exception as e:  # noqa: BLE001
                        print(f"  diag failed: {type(e).__name__} {str(e)[:200]}")
                line = ", ".join(f"{r[1].block_s}/{r[1].num_warps}w/{r[1].num_stages}s/ch{r[1].chunk}"
                                 f"/hpp{r[1].heads_per_program}{'d' if r[1].dynamic_heads else ''}"
                                 f"/pps{r[1].programs_per_sm}={r[0]:.3f}" for r in results)
                print(f"  sweep {sname} gs{gs} rope={rope}: best {t:.3f} ms {c}\n    {line}", flush=True)
                del args
    return best
