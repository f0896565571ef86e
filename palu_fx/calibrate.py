"""Calibration through the graph: activation Grams and Fisher information, no module names.

Both statistics are gathered by running calibration tokens through an exported program's
own graph: an ``fx.Interpreter`` sees the value of every node, so ``XᵀX`` is accumulated at
the input of each matched K/V projection, and the Fisher information (mean squared
gradient of the LM loss) is read off the weight placeholders the finder matched. A
prefill-only export (``export_prefill_only``) is the natural calibration program; any
program the finder understands works.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from palu_fx.passes.find import AttentionSite

__all__ = ["Calibration", "collect_grams", "collect_fisher", "program_args"]


@dataclass
class Calibration:
    """Statistics keyed by node names of the calibration program."""

    grams: dict  # projection-input node name -> XᵀX [d_in, d_in] (float64)
    tokens: int
    fisher: Optional[dict] = None  # (site index, "key"/"value") -> mean squared gradient [H*D, d_in]


def program_args(ep: ExportedProgram, inputs: dict, requires_grad: frozenset = frozenset()) -> list:
    """Flat placeholder values of ``ep``'s graph: weights, buffers (cloned), user inputs."""
    args = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            if spec.arg.name not in inputs:
                raise ValueError(f"the program needs input '{spec.arg.name}'")
            args.append(inputs[spec.arg.name])
            continue
        t = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
        if spec.kind == InputKind.BUFFER:
            t = t.clone()
        t = t.detach()
        if spec.target in requires_grad:
            t = t.clone().requires_grad_(True)
        args.append(t)
    return args


def _rows(ep: ExportedProgram, batches: Iterable[torch.Tensor]):
    """Re-batch token ids to the program's (static) batch size."""
    ph = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "input_ids")
    b = ph.meta["val"].shape[0]
    b = b if isinstance(b, int) else None
    for ids in batches:
        if ids.dim() != 2:
            raise ValueError(f"calibration batches are token ids [batch, seq], got shape {list(ids.shape)}")
        if b is None or ids.shape[0] == b:
            yield ids
        elif ids.shape[0] % b == 0:
            yield from ids.split(b)
        else:
            raise ValueError(f"the program has a static batch of {b}; got a batch of {ids.shape[0]}")


def _inputs_for(ep: ExportedProgram, ids: torch.Tensor) -> dict:
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    inputs = {"input_ids": ids}
    if "cache_position" in names:
        inputs["cache_position"] = torch.arange(ids.shape[1], device=ids.device)
    return inputs


class _GramCollector(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watched: set[str]):
        super().__init__(gm)
        self.watched = watched
        self.grams: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.watched:
            # products in float32 (fast), accumulated across batches in float64
            x = out.detach().reshape(-1, out.shape[-1]).float()
            g = (x.T @ x).double()
            self.grams[n.name] = self.grams[n.name] + g if n.name in self.grams else g
        return out


def _logits(out) -> torch.Tensor:
    out = out[0] if isinstance(out, (tuple, list)) else out
    return getattr(out, "logits", out)


def collect_grams(ep: ExportedProgram, sites: list[AttentionSite], batches: Iterable[torch.Tensor],
                  progress: bool = True) -> Calibration:
    """Accumulate ``XᵀX`` at each K/V projection input over ``batches`` of token ids [B, T]."""
    watched = {s.key.proj.input.name for s in sites} | {s.value.proj.input.name for s in sites}
    collector = _GramCollector(ep.graph_module, watched)
    tokens = 0
    with torch.no_grad():
        for ids in _progress(list(_rows(ep, batches)), "calibrating (Grams)", progress):
            collector.run(*program_args(ep, _inputs_for(ep, ids)))
            tokens += ids.numel()
    if tokens == 0:
        raise ValueError("calibration needs at least one batch of tokens")
    return Calibration(collector.grams, tokens)


class _OutputRecorder(_GramCollector):
    """Runs the graph with autograd, keeps the outputs of chosen nodes and accumulates the
    Grams of others (so one pass gives both Fisher and activation statistics)."""

    def __init__(self, gm: fx.GraphModule, watched: set[str], grams_of: set[str], grams: dict):
        super().__init__(gm, grams_of)
        self.keep, self.outputs, self.grams = watched, {}, grams

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.keep:
            self.outputs[n.name] = out
        return out


def collect_fisher(ep: ExportedProgram, sites: list[AttentionSite], batches: Iterable[torch.Tensor],
                   progress: bool = True, output_grams: bool = False, input_grams: Optional[dict] = None) -> dict:
    """Mean squared gradient of the LM loss w.r.t. each site's effective K and V weights.

    With ``output_grams`` also ``Σ_t g_t g_tᵀ`` of the loss gradient at each K/V projection
    output (its rows, head-major), keyed ``(site, role, "out")``: the output side of a
    Kronecker-factored Fisher, which the ``kfac`` factorization uses. A dict passed as
    ``input_grams`` is filled with the activation Grams of the same pass (as ``collect_grams``).
    """
    targets = {}
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    for s in sites:
        for role, chain in (("key", s.key), ("value", s.value)):
            targets[(s.index, role)] = (specs[chain.proj.weight.name].target, chain)
    wanted = frozenset(t for t, _ in targets.values())
    order = [s.target for s in ep.graph_signature.input_specs]
    outs = {chain.proj.output.name for _, chain in targets.values()} if output_grams else set()
    acc: dict = {}
    n = 0
    for ids in _progress(list(_rows(ep, batches)), "calibrating (Fisher)", progress):
        args = program_args(ep, _inputs_for(ep, ids), requires_grad=wanted)
        watched_in = ({s.key.proj.input.name for s in sites} | {s.value.proj.input.name for s in sites}
                      if input_grams is not None else set())
        rec = _OutputRecorder(ep.graph_module, outs, watched_in, input_grams if input_grams is not None else {})
        logits = _logits(rec.run(*args))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        leaves = {t: a for t, a in zip(order, args) if t in wanted}
        out_names = sorted(rec.outputs)
        grads = torch.autograd.grad(loss, list(leaves.values()) + [rec.outputs[k] for k in out_names])
        gmap = dict(zip(list(leaves) + out_names, grads))
        for key, (target, chain) in targets.items():
            rows = chain.rows.reshape(-1)
            g = gmap[target].detach()
            g = g.t() if chain.proj.transposed else g
            g2 = g[rows].double() ** 2
            acc[key] = acc[key] + g2 if key in acc else g2
            if output_grams:
                go = gmap[chain.proj.output.name].detach()
                go = go.reshape(-1, go.shape[-1])[:, rows].float()
                gg = (go.T @ go).double()
                okey = key + ("out",)
                acc[okey] = acc[okey] + gg if okey in acc else gg
        n += 1
    if n == 0:
        raise ValueError("Fisher calibration needs at least one batch of tokens")
    return {k: (v / n if len(k) == 2 else v) for k, v in acc.items()}


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm ships with transformers; stay quiet without it
        return items
    return tqdm(items, desc=desc, leave=False)


def calibrated_plan(ep: ExportedProgram, cfg, batches: Iterable[torch.Tensor], progress: bool = True):
    """Calibrate on ``batches`` through ``ep``'s graph, allocate ranks, factor every site.

    Whitened SVD needs the activation Grams; ``kfac`` also the output-gradient Grams of a
    backward pass; the ``fisher`` and ``energy`` allocators use the Fisher information. Returns a ``CompressionPlan`` that
    ``compress_exported`` applies to this or any other export of the same model.
    """
    from palu_fx.exported import analyze_exported

    batches = list(batches)
    sites, skipped, editor, _ = analyze_exported(ep)
    if not sites:
        reasons = "; ".join(f"{u.node.name}: {u.reason}" for u in skipped) or "no attention found"
        raise ValueError(f"nothing to calibrate: {reasons}")
    kfac = cfg.method == "kfac"
    need_grams = cfg.method in ("whitened", "kfac")
    grams = fisher = None
    if cfg.allocator != "uniform" or kfac:  # one forward/backward pass gives Grams and Fisher
        grams = {} if need_grams else None
        fisher = collect_fisher(ep, sites, batches, progress, output_grams=kfac, input_grams=grams)
    elif need_grams:
        grams = collect_grams(ep, sites, batches, progress).grams
    grad_grams = {(s.index, role): fisher[(s.index, role, "out")] for s in sites for role in ("key", "value")} \
        if kfac else None
    plan = plan_from_statistics(sites, editor.tensor, cfg, grams, fisher if cfg.allocator != "uniform" else None,
                                grad_grams)
    plan.meta["calibration_tokens"] = sum(b.numel() for b in batches)
    return plan


def plan_from_statistics(sites, leaf, cfg, grams: Optional[dict], fisher: Optional[dict],
                         grad_grams: Optional[dict]):
    """Allocate ranks (``fisher`` keyed ``(site, role)``, needed by non-uniform allocators)
    and factor every site: the part of ``calibrated_plan`` after the statistics."""
    from palu_fx.compress import MatrixStats, allocate, fisher_scores, singular_values
    from palu_fx.plan import effective_weight, make_plan

    kfac = grad_grams is not None
    ranks = None
    if cfg.allocator != "uniform":
        stats = []
        for s in sites:
            gs = cfg.group_size_for(s.num_kv_heads)
            for role, chain, D in (("key", s.key, s.head_dim), ("value", s.value, s.v_head_dim)):
                w, _ = effective_weight(chain, leaf)
                gram = grams.get(chain.proj.input.name) if grams is not None else None
                gg = grad_grams[(s.index, role)] if kfac else None
                score, trace = fisher_scores(fisher[(s.index, role)])
                spectrum = "loss" if kfac else ("whitened" if gram is not None else "plain")
                stats.append(MatrixStats(
                    f"{s.index}.{role}", s.num_kv_heads // gs, gs * D,
                    singular_values=singular_values(w, s.num_kv_heads // gs, gram, grad_gram=gg), fisher=score,
                    fisher_trace=trace, input_energy=float(torch.trace(gram)) if gram is not None else None,
                    spectrum=spectrum))
        alloc = allocate(stats, cfg)
        ranks = [(alloc[f"{s.index}.key"], alloc[f"{s.index}.value"]) for s in sites]
    return make_plan(sites, leaf, cfg, grams=grams, ranks=ranks, grad_grams=grad_grams)
