"""Host side of the Gluon decode kernels (``gluon_q4.py``, ``gluon_rope.py``, ``gluon_gqa.py``,
``gluon_wide.py``): their knobs from a ``KernelConfig``, the split plan that fills whole waves of
what an SM holds, and the merge of the splits' partials (``wrapper.fused_attention`` calls
``run_q4`` / ``run_rope`` / ``run_gqa`` / ``run_wide`` where the kernels' ``applies`` say so)."""
from __future__ import annotations

import torch

from palu_fx.kernels.latent_attention import gluon_gqa, gluon_q4, gluon_rope, gluon_wide


def _wrapper():
    # the wrapper's occupancy probe, split plan and merge, looked up at call time: the wrapper
    # imports this module, and tests replace its functions
    from palu_fx.kernels.latent_attention import wrapper
    return wrapper


def run_q4(q, kl, vl, mask_kind, mask, mstr, scale, cfg, out):
    """``gluon_q4.q4_absorbed_kernel`` over the splits that fill whole waves of what an SM holds,
    then ``combine_splits_kernel`` (rows = a program's query heads)."""
    B, Hq, _, R = q.shape
    Skv = kl.data.shape[1]
    G = kl.channels // R
    rows = gluon_q4.program_rows(G, Hq // G, cfg.gluon_heads)  # query heads per program
    n_base = B * Hq // rows
    knobs = (cfg.gluon_heads, cfg.gluon_block_s, cfg.gluon_stages)

    def launch(nsplit, chunk, part, lse, probe=False):
        return gluon_q4.launch(q, kl, vl, mask_kind, mask, mstr[0], mstr[3], scale, out, nsplit, chunk, part, lse,
                               *knobs, probe=probe)

    key = ("gluon_q4", knobs, q.dtype, R, Hq // G, mask_kind, q.device.index)
    return _splits(launch, key, out, n_base, rows, R, Skv, cfg.programs_per_sm, cfg.num_splits)


def run_rope(q, lk, kl, vl, cos, sin, mask_kind, mask, mstr, scale, cfg, out):
    """``gluon_rope.rope_decode_kernel`` (``default_knobs`` heads per program) over the splits that
    fill whole waves of what an SM holds, then ``combine_splits_kernel``."""
    B, Hq, _, _ = q.shape
    RV = out.shape[-1]
    Skv = kl.data.shape[1]
    hpp, tables = gluon_rope.default_knobs(kl.bits, Hq, max(lk.shape[-1], RV), cfg.gluon_rope_heads,
                                           cfg.gluon_rope_tables, Hq // lk.shape[0])
    knobs = (hpp, cfg.gluon_rope_stages, tables, cfg.gluon_rope_regs)

    def launch(nsplit, chunk, part, lse, probe=False):
        return gluon_rope.launch(q, lk, kl, vl, cos, sin, mask_kind, mask, mstr[0], mstr[3], scale, out, nsplit,
                                 chunk, part, lse, *knobs, probe=probe)

    key = ("gluon_rope", knobs, q.dtype, cos.dtype, kl.bits, lk.shape[1:], RV, mask_kind, q.device.index)
    return _splits(launch, key, out, B * Hq // hpp, hpp, RV, Skv, 1, cfg.num_splits)


def run_gqa(q, lk, kl, vl, cos, sin, mask_kind, mask, mstr, scale, cfg, out):
    """``gluon_gqa.gqa_rope_decode_kernel`` (a program per sequence and KV head, all of its query
    heads) over the splits that fill whole waves of what an SM holds, then ``combine_splits_kernel``."""
    B, Hq, _, D = q.shape
    hkv, RV = lk.shape[0] * lk.shape[1] // D, out.shape[-1]  # KV heads: groups x heads per group

    def launch(nsplit, chunk, part, lse, probe=False):
        return gluon_gqa.launch(q, lk, kl, vl, cos, sin, mask_kind, mask, mstr[0], mstr[3], scale, out, nsplit,
                                chunk, part, lse, cfg.gluon_rope_stages, probe=probe)

    key = ("gluon_gqa", cfg.gluon_rope_stages, q.dtype, cos.dtype, lk.shape[1:], Hq // hkv, RV, mask_kind,
           q.device.index)
    return _splits(launch, key, out, B * hkv, Hq // hkv, RV, kl.data.shape[1], 1, cfg.num_splits)


def run_wide(q, lk, kl, vl, cos, sin, mask_kind, mask, mstr, scale, cfg, out):
    """``gluon_wide.wide_rope_decode_kernel`` (a program per sequence and query head) over the splits
    that fill whole waves of what an SM holds, then ``combine_splits_kernel``."""
    B, Hq, _, _ = q.shape
    RV = out.shape[-1]

    def launch(nsplit, chunk, part, lse, probe=False):
        return gluon_wide.launch(q, lk, kl, vl, cos, sin, mask_kind, mask, mstr[0], mstr[3], scale, out, nsplit,
                                 chunk, part, lse, cfg.gluon_wide_pairs, probe=probe)

    key = ("gluon_wide", cfg.gluon_wide_pairs, q.dtype, cos.dtype, lk.shape[1:], RV, mask_kind, q.device.index)
    return _splits(launch, key, out, B * Hq, 1, RV, kl.data.shape[1], 1, cfg.num_splits)


def _splits(launch, key, out, n_base, rows, R, Skv, programs_per_sm, num_splits):
    """Run a Gluon decode kernel (``launch(nsplit, chunk, part, lse, probe=False)``; ``n_base``
    programs per split, ``rows`` query heads of ``R`` output channels each) over the splits that
    fill whole waves of what an SM holds (its occupancy compiled once per ``key``), then
    ``combine_splits_kernel`` over the partials."""
    w = _wrapper()
    resident = w._resident_cached(key, launch, out.device)
    plan_cfg = w.KernelConfig(programs_per_sm=max(programs_per_sm, resident), num_splits=num_splits, fill_waves=True)
    NSPLIT, chunk = w._split_plan(plan_cfg, n_base, Skv, w._num_sms(out.device.index or 0), resident)
    if NSPLIT == 1:
        launch(1, chunk, out, out)
        return out
    part = torch.empty(n_base * NSPLIT * rows * R, dtype=torch.float32, device=out.device)
    lse = torch.empty(n_base * NSPLIT * rows, dtype=torch.float32, device=out.device)
    launch(NSPLIT, chunk, part, lse)
    w._merge_splits(part, lse, out, out.shape[1] // rows, 1, 1, NSPLIT, rows, w._p2(rows), rows, R, R, False)
    return out
