"""Quantization probe: what 4/3/2-bit latents, with and without a Hadamard rotation, do to K/V.

Not a test and not perplexity: it measures the *reconstruction error* of keys and values
when the cached latents are quantized, on a real checkpoint, before any kernel or graph
rewrite exists. Per layer and role (K, V) with projection input activations ``X``::

    Y  = X Wᵀ                      full-precision projection (bias left out: it cancels)
    h  = X R_gᵀ                    latents per Palu group (rotated by H if --hadamard)
    Ŷ  = ĥ_g L_gᵀ                  ĥ = dequantize(quantize(h, bits, group = rank))

and reports ``||Y - Ŷ|| / ||Y||`` (total, over all layers), the part quantization adds
``||Ŷ_fp - Ŷ|| / ||Y||``, the latent error ``||h - ĥ|| / ||h||`` (RMS over layers; invariant
under the rotation, so it compares directly), and the real bytes per token
(packed codes + fp16 scales and zeros, all layers, K and V) against the fp16 full cache.

    PYTHONPATH=. python benchmarks/quant_probe.py              # SmolLM2-135M, ratio 0.5
    PYTHONPATH=. python benchmarks/quant_probe.py --methods whitened --eval-on heldout --quant-group 32

Factors: ``calibrated_plan`` on a prefill-only export (whitened SVD: calibration Grams through
the graph; ``svd`` is plain data-free SVD, for contrast: its latents keep the input's
energy profile, the case Hadamard is made for). Activations: the calibration windows
(default) or held-out windows of Pride and Prejudice (``--eval-on heldout``).
About 1-2 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time
from typing import Optional

import torch
import torch.fx as fx
from tabulate import tabulate

from palu_fx import PaluConfig
from palu_fx.calibrate import calibrated_plan, program_args
from palu_fx.compress.hadamard import rotate_plan, rotation_name
from palu_fx.data import austen_split
from palu_fx.export import export_prefill_only
from palu_fx.exported import analyze_exported
from palu_fx.models import load_model
from palu_fx.plan import effective_weight
from palu_fx.quant import bytes_per_token, dequantize, quantize


class _Capture(fx.Interpreter):
    """Keeps the value of the watched nodes (the K/V projection inputs)."""

    def __init__(self, gm: fx.GraphModule, watched: set[str]):
        super().__init__(gm)
        self.watched = watched
        self.values: dict[str, list[torch.Tensor]] = {n: [] for n in watched}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.watched:
            self.values[n.name].append(out.detach().reshape(-1, out.shape[-1]).float())
        return out


def capture_inputs(ep, sites, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    watched = {s.key.proj.input.name for s in sites} | {s.value.proj.input.name for s in sites}
    cap = _Capture(ep.graph_module, watched)
    with torch.no_grad():
        for ids in windows.split(1):
            cap.run(*program_args(ep, {"input_ids": ids}))
    return {k: torch.cat(v) for k, v in cap.values.items()}


def grouped_project(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``[N, d_in] x [G, r, d_in] -> [N, G*r]`` latents, groups concatenated (the cache layout)."""
    return torch.einsum("nd,grd->ngr", x, R).flatten(1)


def grouped_rebuild(h: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``[N, G*r] x [G, gsD, r] -> [N, G*gsD]`` rebuilt projection outputs."""
    G, _, r = L.shape
    return torch.einsum("ngr,gdr->ngd", h.unflatten(1, (G, r)), L).flatten(1)


def probe(ep, sites, editor, plan, acts: dict, bits_list, quant_group: Optional[int]) -> list[dict]:
    """One row per (bits, hadamard): errors aggregated over all layers (sums of squares)."""
    rows = []
    for hadamard in (False, True):
        p = rotate_plan(plan) if hadamard else plan
        acc: dict = {}
        for site, sp in zip(sites, p.sites):
            for role, chain, mf in (("K", site.key, sp.key), ("V", site.value, sp.value)):
                x = acts[chain.proj.input.name]
                w, _ = effective_weight(chain, editor.tensor)
                y = x @ w.float().T
                L, R = mf.L.float(), mf.R.float()
                h = grouped_project(x, R)
                y_fp = grouped_rebuild(h, L)
                for bits in bits_list:
                    if bits is None:
                        h_q, nbytes = h, 2 * h.shape[1]
                    else:
                        g = quant_group or mf.rank
                        h_q = dequantize(quantize(h, bits, g))
                        nbytes = bytes_per_token(h.shape[1], bits, g)
                    y_q = grouped_rebuild(h_q, L)
                    a = acc.setdefault((bits, role), [0.0] * 5)
                    a[0] += float((y - y_q).pow(2).sum())
                    a[1] += float((y_fp - y_q).pow(2).sum())
                    a[2] += float(y.pow(2).sum())
                    a[3] += float((h - h_q).pow(2).sum()) / float(h.pow(2).sum())
                    a[4] += nbytes
        n_layers = len(sites)
        full_bytes = sum(2 * s.num_kv_heads * (s.head_dim + s.v_head_dim) for s in sites)  # fp16 K + V
        for bits in bits_list:
            k, v = acc[(bits, "K")], acc[(bits, "V")]
            token_bytes = k[4] + v[4]
            rows.append({
                "bits": "fp16" if bits is None else bits,
                "hadamard": "yes" if hadamard else "no",
                "K err": (k[0] / k[2]) ** 0.5, "V err": (v[0] / v[2]) ** 0.5,
                "K quant": (k[1] / k[2]) ** 0.5, "V quant": (v[1] / v[2]) ** 0.5,
                "K latent": (k[3] / n_layers) ** 0.5, "V latent": (v[3] / n_layers) ** 0.5,
                "bytes/token": str(int(token_bytes)), "of fp16 KV": f"{100 * token_bytes / full_bytes:.1f}%",
            })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--group-size", type=int, default=None, help="KV heads per Palu group (default: auto)")
    ap.add_argument("--quant-group", type=int, default=None, help="channels per scale (default: the rank)")
    ap.add_argument("--methods", nargs="+", default=["whitened", "svd"], choices=["whitened", "svd"])
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--probe-windows", type=int, default=4, help="windows of 512 tokens whose K/V are measured")
    ap.add_argument("--eval-on", choices=["calib", "heldout"], default="calib")
    args = ap.parse_args()

    t0 = time.time()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    model.eval()
    split = austen_split(tok, calib_windows=args.calib_windows, calib_window=512,
                         eval_windows=args.probe_windows, eval_window=512)
    ep = export_prefill_only(model, seq_len=8)
    sites, _, editor, _ = analyze_exported(ep)
    windows = split.calibration[: args.probe_windows] if args.eval_on == "calib" else split.evaluation
    acts = capture_inputs(ep, sites, windows)
    print(f"{args.model}: {len(sites)} attention sites; loaded, exported, captured in {time.time() - t0:.0f}s")

    bits_list = [None, 4, 3, 2]
    for method in args.methods:
        cfg = PaluConfig(rank_ratio=args.ratio, group_size=args.group_size, method=method)
        t1 = time.time()
        plan = calibrated_plan(ep, cfg, split.calibration.split(1), progress=False)
        ranks = sorted({m.rank for s in plan.sites for m in (s.key, s.value)})
        rows = probe(ep, sites, editor, plan, acts, bits_list, args.quant_group)
        print(f"\n{method} factors, rank ratio {args.ratio}, group size {plan.sites[0].group_size} "
              f"(ranks {ranks}; rotation {', '.join(rotation_name(r) for r in ranks)}), "
              f"quant group {args.quant_group or 'rank'}; {windows.numel()} {args.eval_on} tokens "
              f"[{time.time() - t1:.0f}s]")
        table = [{k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()} for row in rows]
        print(tabulate(table, headers="keys", disable_numparse=True))
    print(f"\n{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {datetime.date.today()}, total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
