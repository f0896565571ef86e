"""Perplexity table for issue 6: rank ratio x group size x method, through palu-fx's pipeline.

Everything goes through the exported prefill program: calibration (activation Grams, Fisher
information and output-gradient Grams) runs once per model through the graph, then every
config gets its own plan (factors + ranks) and its own compressed program, whose perplexity
is measured on held-out Austen text (default: 16 x 1024 tokens of Pride and Prejudice,
calibration on 64 x 512 tokens of Emma, the issue-6 reference setting).

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/accuracy.py --model smollm2-135m \
        --ratios 0.7 0.5 --groups 1 all --methods svd whitened kfac-energy \
        --output benchmarks/results/accuracy_smollm2.json

Methods (``factorization-allocator``; short names in brackets):
    svd-uniform [svd], whitened-uniform [whitened], kfac-energy [default],
    whitened-fisher [palu-fisher: Palu's own allocator], any other ``<method>-<allocator>``.

``--path weights`` evaluates a config without the graph rewrite: the prefill program with
each K/V weight replaced by its factored product ``L @ R`` (the same function at fp32 up to
rounding). ``--check-paths`` measures both paths for every config (to validate the shortcut).
Results are appended to ``--output`` after every config; configs already there are skipped
(``--force`` re-measures), so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from palu_fx.calibrate import plan_from_statistics

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palu_fx.calibrate import collect_fisher, collect_grams  # noqa: E402
from palu_fx.config import GROUP_ALL, PaluConfig  # noqa: E402
from palu_fx.data import austen_split, default_cache_dir  # noqa: E402
from palu_fx.evaluate import perplexity, program_logits_fn  # noqa: E402
from palu_fx.export import export_decoder, export_prefill_only  # noqa: E402
from palu_fx.exported import analyze_exported, compress_exported  # noqa: E402
from palu_fx.quant import bytes_per_token as quant_bytes_per_token  # noqa: E402
from palu_fx.report import report as palu_report  # noqa: E402

ALIASES = {"svd": "svd-uniform", "whitened": "whitened-uniform", "default": "kfac-energy",
           "palu-fisher": "whitened-fisher"}
ROLES = ("key", "value")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_method(name: str) -> tuple[str, str]:
    method, _, allocator = ALIASES.get(name, name).partition("-")
    PaluConfig(method=method, allocator=allocator or "uniform")  # validates both
    return method, allocator or "uniform"


def parse_group(v: str):
    return GROUP_ALL if v in ("all", "J", "j") else int(v)


# --------------------------------------------------------------------------- calibration
def calibrate(ep, sites, batches, cache: Path | None, progress: bool, fisher: bool = True) -> dict:
    """Grams (and, with ``fisher``, Fisher + output-gradient Grams) keyed by (site, role).

    The statistics do not depend on the config, so they are computed once per model (and
    cached); the Fisher pass (a backward per batch) is only run when a config needs it.
    """
    calib = {}
    if cache is not None and cache.is_file():
        log(f"calibration statistics from {cache}")
        calib = torch.load(cache, weights_only=True)
    has_fisher = "seconds_fisher" in calib
    if "seconds_grams" in calib and (has_fisher or not fisher):
        return calib
    calib["tokens"] = int(sum(b.numel() for b in batches))
    if "seconds_grams" not in calib:
        t = time.time()
        grams = collect_grams(ep, sites, batches, progress).grams
        calib["seconds_grams"] = round(time.time() - t, 1)
        for s in sites:
            for role, chain in zip(ROLES, (s.key, s.value)):
                calib[f"{s.index}.{role}.gram"] = grams[chain.proj.input.name]
        log(f"Grams on {calib['tokens']} tokens in {calib['seconds_grams']}s")
    if fisher:
        t = time.time()
        fish = collect_fisher(ep, sites, batches, progress, output_grams=True)
        calib["seconds_fisher"] = round(time.time() - t, 1)
        for s in sites:
            for role in ROLES:
                calib[f"{s.index}.{role}.fisher"] = fish[(s.index, role)]
                calib[f"{s.index}.{role}.grad_gram"] = fish[(s.index, role, "out")]
        log(f"Fisher + gradient Grams on {calib['tokens']} tokens in {calib['seconds_fisher']}s")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(calib, cache)
    return calib


def build_plan(sites, editor, cfg: PaluConfig, calib: dict):
    """What ``calibrated_plan`` does, from precomputed statistics."""
    kfac = cfg.method == "kfac"
    grams = None
    if cfg.method in ("whitened", "kfac"):
        grams = {}
        for s in sites:
            for role, chain in zip(ROLES, (s.key, s.value)):
                grams[chain.proj.input.name] = calib[f"{s.index}.{role}.gram"]
    grad_grams = {(s.index, r): calib[f"{s.index}.{r}.grad_gram"] for s in sites for r in ROLES} if kfac else None
    fisher = ({(s.index, r): calib[f"{s.index}.{r}.fisher"] for s in sites for r in ROLES}
              if cfg.allocator != "uniform" else None)
    plan = plan_from_statistics(sites, editor.tensor, cfg, grams, fisher, grad_grams)
    plan.meta["calibration_tokens"] = calib["tokens"] if calib else 0
    return plan


def cache_bytes_per_token(sites, plan=None, bytes_per_elem: int = 4) -> int:
    """Latent (or full) K+V cache bytes per token over all layers, fp32."""
    if plan is None:
        return sum(s.num_kv_heads * (s.head_dim + s.v_head_dim) for s in sites) * bytes_per_elem
    return sum(sp.key.groups * sp.key.rank + sp.value.groups * sp.value.rank for sp in plan.sites) * bytes_per_elem


def quant_bytes_formula(plan) -> int:
    """Expected latent cache bytes per token of ``plan``: packed codes + fp16 scale and zero per
    quantization group (default: one per Palu group's latent), or fp32 latents when unquantized."""
    c, total = plan.config, 0
    for sp in plan.sites:
        for m in (sp.key, sp.value):
            channels = m.groups * m.rank
            total += (quant_bytes_per_token(channels, c.bits, c.quant_group_size or m.rank) if c.bits is not None
                      else channels * 4)
    return total


CACHE_SUFFIXES = ("_codes", "_scale", "_zero", "_latent")


def is_palu_cache(leaf: str) -> bool:
    return leaf.startswith("palu_") and leaf.endswith(CACHE_SUFFIXES)


def is_kv_cache(leaf: str, buf: torch.Tensor) -> bool:
    """The export wrapper's static K/V caches (``key_cache_{i}`` / ``value_cache_{i}``)."""
    return buf.dim() == 4 and leaf.startswith(("key_cache_", "value_cache_"))


def program_cache_bytes(ep) -> dict:
    """Cache bytes per token slot measured from a decoder program's buffers.

    Each cache buffer is ``[B, slots, ...]`` (latents, packed codes, fp16 scales, zeros:
    slot axis 1) or the original ``[B, H, slots, D]`` K/V caches (slot axis 2); a layer with
    a sliding window has fewer slots, so bytes are summed per slot, i.e. per cached token.
    ``positions`` is palu-fx's int64 slot-position cache (one per distinct cache length, shared
    by the layers: RoPE needs each cached token's position).
    """
    mod = ep.module()
    out = {"latents": 0, "positions": 0, "kv": 0, "codes": 0, "scales_zeros": 0}
    for name, buf in mod.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("palu_positions"):
            out["positions"] += buf.element_size() * buf.numel() // buf.shape[1]
        elif is_palu_cache(leaf):
            nb = buf.element_size() * buf.numel() // buf.shape[1]
            out["latents"] += nb
            if leaf.endswith("_codes"):
                out["codes"] += nb
            elif leaf.endswith(("_scale", "_zero")):
                out["scales_zeros"] += nb
        elif is_kv_cache(leaf, buf):
            out["kv"] += buf.element_size() * buf.numel() // buf.shape[2]
    return out


# --------------------------------------------------------------------------- evaluation
def decoder_logits(ep):
    """The static-cache decoder program: each window is one prefill call at positions 0..T-1
    (it overwrites the slots the previous window wrote; the causal mask hides the rest)."""
    mod = ep.module()

    def fn(ids: torch.Tensor) -> torch.Tensor:
        out = mod(input_ids=ids, cache_position=torch.arange(ids.shape[1]))
        return getattr(out, "logits", out)

    fn.module = mod
    return fn


def poison_caches(mod, seed: int = 0) -> int:
    """Fill every cache buffer (K/V, latents, codes, scales, zeros; not positions) with random
    data; returns how many buffers were filled. Logits that do not change afterwards read
    no slot outside the current window."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, buf in mod.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        # only palu-fx's latent caches and the wrapper's K/V caches (not e.g. Gemma's ``embed_scale``)
        if not (is_palu_cache(leaf) or is_kv_cache(leaf, buf)):
            continue
        if buf.dtype == torch.uint8:
            buf.copy_(torch.randint(0, 256, buf.shape, generator=g, dtype=torch.uint8))
        elif buf.is_floating_point():
            buf.copy_((torch.randn(buf.shape, generator=g) * 3).to(buf.dtype))
        else:
            continue
        n += 1
    return n


def check_decoder(ep_pre, ep_dec, plans: dict, windows: torch.Tensor, progress: bool) -> dict:
    """Decoder-program path vs prefill-program path, and the window-leak check.

    ``plans`` maps a label to a plan (or None: the uncompressed programs). For unquantized
    plans both programs compute the same function: perplexity over ``windows`` must agree.
    For every plan, the logits of window 1 after window 0, and after filling every cache
    buffer with random data, must equal those of window 1 in a fresh program.
    """
    res = {}
    for label, plan in plans.items():
        t = time.time()
        entry = {}
        dec = compress_exported(ep_dec, plan) if plan is not None else ep_dec
        fn_dec = decoder_logits(dec)
        if plan is None or plan.config.bits is None:
            pre = compress_exported(ep_pre, plan) if plan is not None else ep_pre
            p_pre = perplexity(program_logits_fn(pre), windows, progress, f"check {label} prefill")
            p_dec = perplexity(fn_dec, windows, progress, f"check {label} decoder")
            entry.update(ppl_prefill=p_pre, ppl_decoder=p_dec, rel_diff=abs(p_dec / p_pre - 1))
            with torch.no_grad():
                a = program_logits_fn(pre)(windows[:1])
                b = fn_dec(windows[:1])
            entry["logits_max_abs_diff_window0"] = float((a - b).abs().max())
        # leak: fresh program on window 1 vs after window 0 vs after poisoning the caches
        with torch.no_grad():
            fn_dec(windows[0:1])
            after = fn_dec(windows[1:2]).clone()
            n = poison_caches(fn_dec.module)
            poisoned = fn_dec(windows[1:2]).clone()
            # positive control: the same window one slot later reads slot 0, which holds random data now
            T = windows.shape[1]
            poison_caches(fn_dec.module, seed=1)
            shifted = fn_dec.module(input_ids=windows[1:2, : T - 1], cache_position=torch.arange(1, T))
            shifted = getattr(shifted, "logits", shifted)
        entry.update(poisoned_buffers=n, leak_max_abs_diff=float((after - poisoned).abs().max()),
                     control_max_abs_diff=float((after[:, : T - 1] - shifted).abs().max()))
        entry["seconds"] = round(time.time() - t, 1)
        log(f"check {label}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in entry.items()))
        res[label] = entry
    return res


class WeightSubstitution:
    """The prefill program with K/V weights replaced by ``L @ R`` (the 'weights' path)."""

    def __init__(self, ep, sites):
        self.mod = ep.module()
        specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
        self.targets = []
        for s in sites:
            for role, chain in zip(ROLES, (s.key, s.value)):
                target = specs[chain.proj.weight.name].target
                self.targets.append((s.index, role, chain, target))
        self.originals = {t: self._param(t).detach().clone() for *_, t in self.targets}

    def _param(self, target: str) -> torch.Tensor:
        obj = self.mod
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def apply(self, plan) -> None:
        for i, role, chain, target in self.targets:
            mf = getattr(plan.sites[i], role)
            w = self.originals[target].clone()
            prod = torch.bmm(mf.L.double(), mf.R.double()).reshape(-1, mf.R.shape[-1]).to(w.dtype)
            rows = chain.rows.reshape(-1)
            if chain.proj.transposed:
                w[:, rows] = prod.t()
            else:
                w[rows] = prod
            self._param(target).data.copy_(w)

    def restore(self) -> None:
        for *_, target in self.targets:
            self._param(target).data.copy_(self.originals[target])

    def logits_fn(self):
        def fn(ids):
            out = self.mod(input_ids=ids)
            return getattr(out, "logits", out)

        return fn


def config_key(model: str, ratio: float, group, method: str, allocator: str, bits=None, hadamard: bool = False,
               quant_group=None) -> str:
    """Row key; unquantized, unrotated configs keep the issue-6 key (``model|ratio|group|method|allocator``)."""
    key = f"{model}|{ratio}|{group}|{method}|{allocator}"
    if bits is None and not hadamard:
        return key
    return key + f"|bits={bits or 'none'}|hadamard={'on' if hadamard else 'off'}|qgroup={quant_group or 'rank'}"


def parse_bits(v: str):
    if v.lower() in ("none", "off", "fp", "16", "32"):
        return None
    b = int(v)
    PaluConfig(bits=b)  # validates
    return b


def parse_quant_group(v: str):
    return None if v.lower() in ("none", "rank", "r") else int(v)


def is_quant_row(r: dict) -> bool:
    return r.get("bits") is not None or bool(r.get("hadamard"))


METHOD_ORDER = ["baseline", "svd-uniform", "whitened-uniform", "whitened-fisher", "whitened-energy", "kfac-uniform",
                "kfac-fisher", "kfac-energy"]


def format_table(doc: dict, model: str, markdown: bool = False) -> str:
    from tabulate import tabulate

    rows = [r for r in doc["rows"] if r["model"] == model and not is_quant_row(r)]
    base = next((r["ppl"] for r in rows if r["method"] == "baseline"), None)

    def name(r):
        return r["method"] if r["allocator"] == "-" else f"{r['method']}-{r['allocator']}"

    def order(r):
        n = name(r)
        return (r["method"] != "baseline", -r["ratio"], str(r["group"]) != "all", str(r["group"]),
                METHOD_ORDER.index(n) if n in METHOD_ORDER else len(METHOD_ORDER), n)

    table = []
    for r in sorted(rows, key=order):
        ch = (r["ppl"] / base - 1) * 100 if base else float("nan")
        table.append([model, r["ratio"], r["group"], name(r), r["ppl"], ch, r["cache_bytes_per_token"],
                      r["cache_fraction"], r["path"]])
    return tabulate(table, headers=["model", "ratio", "group", "method", "ppl", "change %", "cache B/token",
                                    "of full", "path"], tablefmt="github" if markdown else "simple",
                    floatfmt=(".2f", ".2f", "", "", ".2f", "+.1f", "", ".3f"))


def format_quant_table(doc: dict, model: str, markdown: bool = False) -> str:
    """Issue 5: quantized latent caches (decoder program). 'of fp16 full' is the latent cache
    (codes + fp16 scales and zeros) over the uncompressed K/V cache stored in fp16."""
    from tabulate import tabulate

    rows = [r for r in doc["rows"] if r["model"] == model]
    by_key = {r["key"]: r for r in rows}
    base = next((r["ppl"] for r in rows if r["method"] == "baseline"), None)
    quant = [r for r in rows if is_quant_row(r)]

    def order(r):
        return (r["method"] != "kfac", r["method"], -r["ratio"], str(r["group"]), -(r.get("bits") or 99),
                r.get("quant_group") or 0, not r.get("hadamard"))

    table = []
    for r in sorted(quant, key=order):
        unq = by_key.get(config_key(model, r["ratio"], r["group"], r["method"], r["allocator"]))
        name = f"{r['method']}-{r['allocator']}"
        table.append([r["ratio"], r["group"], name, r.get("bits") or "-", "on" if r.get("hadamard") else "off",
                      r.get("quant_group") or "rank", r["ppl"], (r["ppl"] / base - 1) * 100 if base else float("nan"),
                      unq["ppl"] if unq else float("nan"), r["cache_bytes_per_token"], r["cache_fraction"],
                      r.get("cache_bytes_positions", 0),
                      (r["cache_bytes_per_token"] + r.get("cache_bytes_positions", 0)) / r["fp16_full_bytes_per_token"]
                      if r.get("fp16_full_bytes_per_token") else float("nan"), r.get("eval_seconds_decoder")])
    return tabulate(table, headers=["ratio", "group", "method", "bits", "Hadamard", "quant group", "ppl",
                                    "change %", "ppl unquantized", "latent B/token", "of fp16 full",
                                    "positions B/token", "of fp16 full, with positions", "eval s"],
                    tablefmt="github" if markdown else "simple",
                    floatfmt=(".2f", "", "", "", "", "", ".2f", "+.1f", ".2f", "", ".4f", "", ".4f", ".0f"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m or gemma3-270m")
    ap.add_argument("--ratios", nargs="+", type=float, default=[1.0, 0.7, 0.5])
    ap.add_argument("--groups", nargs="+", type=parse_group, default=[1, GROUP_ALL],
                    help="heads per group: 1 (M-LRD), N (G-LRD), all (J-LRD); sizes that do not divide "
                         "the model's KV heads are skipped")
    ap.add_argument("--methods", nargs="+", default=["svd", "whitened", "kfac-energy"],
                    help="<factorization>-<allocator>, or svd / whitened / default / palu-fisher")
    ap.add_argument("--full-rank-once", action="store_true",
                    help="at ratio 1.0 run only the first group x method (all are lossless)")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--calib-window", type=int, default=512)
    ap.add_argument("--rank-multiple", type=int, default=16)
    ap.add_argument("--path", choices=["program", "weights", "decoder"], default="program",
                    help="program: the compressed palu-fx prefill program; weights: L@R substituted into the prefill "
                         "program; decoder: the compressed static-cache decoder program (one prefill call per window; "
                         "always used for quantized configs)")
    ap.add_argument("--bits", nargs="+", type=parse_bits, default=[None],
                    help="latent cache bits: 2, 3, 4 or none (issue 5); quantized configs run through the decoder "
                         "program, whose cache holds the packed codes")
    ap.add_argument("--hadamard", nargs="+", choices=["off", "on"], default=["off"],
                    help="rotate the latents by a Hadamard-type matrix folded into the factors")
    ap.add_argument("--quant-groups", nargs="+", type=parse_quant_group, default=[None],
                    help="latent channels per scale/zero: none (one group per Palu group's latent) or an integer "
                         "that divides every rank; ignored for unquantized configs")
    ap.add_argument("--check-decoder", type=int, default=0, metavar="N",
                    help="before the sweep: on the first N windows compare the decoder and prefill programs "
                         "(unquantized configs) and check that no window reads another's cache slots")
    ap.add_argument("--check-only", action="store_true", help="stop after --check-decoder")
    ap.add_argument("--quant-table", action="store_true",
                    help="print the quantized-latent table (issue 5) instead of the issue-6 table")
    ap.add_argument("--check-paths", action="store_true", help="measure both paths for every config")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--calib-cache", default="auto", help="calibration statistics file ('auto': in the palu-fx "
                    "cache dir, 'none': do not cache)")
    ap.add_argument("--output", "-o", help="JSON results file (appended to; existing configs are skipped)")
    ap.add_argument("--force", action="store_true", help="re-measure configs already in --output")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--table-only", action="store_true", help="only print the table of --output (no model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from palu_fx.models import load_model

    progress = not args.quiet
    out_path = Path(args.output) if args.output else None
    doc = json.loads(out_path.read_text()) if out_path and out_path.is_file() else {"rows": []}
    done = {r["key"]: r for r in doc["rows"]}
    if args.table_only:
        print((format_quant_table if args.quant_table else format_table)(doc, args.model, args.markdown))
        return 0

    def save() -> None:
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(doc, indent=1))

    t0 = time.time()
    model, tok = load_model(args.model)
    model.eval()
    split = austen_split(tok, eval_windows=args.eval_windows, eval_window=args.window,
                         calib_windows=args.calib_windows, calib_window=args.calib_window)
    ep = export_prefill_only(model, seq_len=64, max_seq_len=max(split.evaluation.shape[1], split.calibration.shape[1]))
    sites, skipped, editor, _ = analyze_exported(ep)
    log(f"{args.model}: loaded and exported, {len(sites)} attention sites ({time.time() - t0:.0f}s)")
    full_bpt = cache_bytes_per_token(sites)
    doc["settings"] = {
        "model": args.model, "eval_tokens": int(split.evaluation.numel()), "eval_windows": args.eval_windows,
        "window": args.window, "evaluation_source": split.evaluation_source,
        "calibration_source": split.calibration_source, "calibration_windows": args.calib_windows,
        "calibration_window": args.calib_window, "rank_multiple": args.rank_multiple,
        "kv_heads": sorted({s.num_kv_heads for s in sites}), "head_dim": sorted({s.head_dim for s in sites}),
        "layers": len(sites), "full_cache_bytes_per_token": full_bpt, "threads": args.threads,
        "torch": torch.__version__,
    }

    base_key = config_key(args.model, 1.0, "-", "baseline", "-")
    if not args.no_baseline and (args.force or base_key not in done):
        t = time.time()
        with torch.no_grad():
            ppl = perplexity(program_logits_fn(ep), split.evaluation, progress, "baseline")
        row = {"key": base_key, "model": args.model, "ratio": 1.0, "group": "-", "method": "baseline",
               "allocator": "-", "path": "program", "ppl": ppl, "cache_bytes_per_token": full_bpt,
               "cache_fraction": 1.0, "eval_seconds": round(time.time() - t, 1)}
        done[base_key] = row
        doc["rows"] = list(done.values())
        save()
        log(f"baseline ppl {ppl:.4f} ({row['eval_seconds']}s)")
    baseline = done[base_key]["ppl"] if base_key in done else None

    # method-major order (then group, then ratio): list the most important methods first
    groups, seen_groups = [], set()
    kv = {s.num_kv_heads for s in sites}
    for group in args.groups:
        try:
            gsz = tuple(sorted({PaluConfig(group_size=group).group_size_for(h) for h in kv}))
        except ValueError as e:
            log(f"skipping group size {group}: {e}")
            continue
        if gsz in seen_groups:  # e.g. group 4 on 1 KV head is the same as 'all'
            log(f"skipping group size {group}: same grouping as one already in the sweep")
            continue
        seen_groups.add(gsz)
        groups.append(group)
    configs = [(ratio, group, *parse_method(name), bits, had == "on", qg if bits is not None else None)
               for name in args.methods for group in groups for ratio in args.ratios
               for bits in args.bits for had in args.hadamard for qg in args.quant_groups]
    configs = list(dict.fromkeys(configs))  # quant groups collapse for unquantized configs
    if args.full_rank_once:
        full = [c for c in configs if c[0] >= 1.0]
        configs = [c for c in configs if c[0] < 1.0 or c == full[0]]

    todo = [c for c in configs if args.force or config_key(args.model, *c) not in done]
    calib = None
    if any(m != "svd" or a != "uniform" for _, _, m, a, *_ in todo + ([] if not args.check_decoder else configs)):
        cache = None
        if args.calib_cache == "auto":
            cache = default_cache_dir() / "accuracy" / (
                f"{args.model}-calib{args.calib_windows}x{args.calib_window}.pt")
        elif args.calib_cache != "none":
            cache = Path(args.calib_cache)
        need_fisher = any(m == "kfac" or a != "uniform" for _, _, m, a, *_ in todo + configs)
        calib = calibrate(ep, sites, list(split.calibration.unsqueeze(1)), cache, progress, need_fisher)
        doc["settings"]["calibration_tokens"] = calib["tokens"]
        doc["settings"]["calibration_seconds"] = {k[len("seconds_"):]: v for k, v in calib.items()
                                                  if k.startswith("seconds_")}

    def make_cfg(ratio, group, method, allocator, bits, hadamard, qg):
        return PaluConfig(rank_ratio=ratio, group_size=group, rank_multiple=args.rank_multiple, method=method,
                          allocator=allocator, bits=bits, hadamard=hadamard, quant_group_size=qg)

    def plan_for(cfg):
        # one thread for the small SVDs / Cholesky factorizations: with MKL's OpenMP threads on
        # a busy 2-core machine a 192 x 576 SVD took ~2 s instead of ~10 ms
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return build_plan(sites, editor, cfg, calib)
        finally:
            torch.set_num_threads(threads)

    ep_dec = None
    window_len = int(split.evaluation.shape[1])

    def decoder_program():
        nonlocal ep_dec
        if ep_dec is None:
            t = time.time()
            # one window per prefill call: the cache needs window + 1 slots (the program takes at
            # most max_cache_len - 1 tokens per call); the last slot is never written or read
            ep_dec = export_decoder(model, batch_size=1, max_cache_len=window_len + 1)
            measured = program_cache_bytes(ep_dec)
            doc["settings"]["decoder_max_cache_len"] = window_len + 1
            doc["settings"]["decoder_full_cache_bytes_per_token_measured"] = measured["kv"]
            log(f"exported the decoder program (cache {window_len + 1} slots, {measured['kv']} B/token of K/V "
                f"buffers) in {time.time() - t:.0f}s")
        return ep_dec

    if args.check_decoder:
        windows = split.evaluation[: args.check_decoder]
        plans = {"uncompressed": None}
        for c in configs:
            plans[config_key(args.model, *c)] = plan_for(make_cfg(*c))
        with torch.no_grad():
            checks = check_decoder(ep, decoder_program(), plans, windows, progress)
        doc.setdefault("checks", {})
        for label, entry in checks.items():
            entry["windows"] = args.check_decoder
            doc["checks"][f"decoder|{args.model}|{label}"] = entry
        save()
        if args.check_only:
            return 0

    subst = WeightSubstitution(ep, sites) if args.path == "weights" or args.check_paths else None
    for ratio, group, method, allocator, bits, hadamard, qg in todo:
        cfg = make_cfg(ratio, group, method, allocator, bits, hadamard, qg)
        t = time.time()
        plan = plan_for(cfg)
        t_plan = time.time() - t
        row = {"key": config_key(args.model, ratio, group, method, allocator, bits, hadamard, qg),
               "model": args.model, "ratio": ratio, "group": group, "method": method, "allocator": allocator,
               "ranks": [[sp.key.rank, sp.value.rank] for sp in plan.sites],
               "groups_per_layer": sorted({sp.key.groups for sp in plan.sites}),
               "cache_bytes_per_token": cache_bytes_per_token(sites, plan),
               "plan_seconds": round(t_plan, 1)}
        row["cache_fraction"] = row["cache_bytes_per_token"] / full_bpt
        if bits is not None or hadamard:
            row.update(bits=bits, hadamard=hadamard, quant_group=qg)
        if bits is not None:
            paths = ["decoder"]
        else:
            paths = ["program", "weights"] if args.check_paths else [args.path]
        for path in paths:
            t = time.time()
            with torch.no_grad():
                if path == "program":
                    prog = compress_exported(ep, plan)
                    fn = program_logits_fn(prog)
                elif path == "decoder":
                    prog = compress_exported(decoder_program(), plan)
                    fn = decoder_logits(prog)
                    measured = program_cache_bytes(prog)
                    rep = palu_report(prog)
                    # fp16 full cache: the K/V caches of the decoder program stored at 2 bytes per element
                    fp16_full = full_bpt // 2
                    row.update(
                        cache_bytes_per_token=measured["latents"],
                        cache_bytes_codes=measured["codes"], cache_bytes_scales_zeros=measured["scales_zeros"],
                        cache_bytes_positions=measured["positions"],
                        fp16_full_bytes_per_token=fp16_full,
                        cache_fraction=measured["latents"] / (fp16_full if bits is not None else full_bpt),
                        report_cache_bytes_before=rep.cache_bytes_before,
                        report_cache_bytes_after=rep.cache_bytes_after,
                        formula_bytes_per_token=quant_bytes_formula(plan),
                    )
                else:
                    subst.apply(plan)
                    fn = subst.logits_fn()
                ppl = perplexity(fn, split.evaluation, progress, f"{ratio}/{group}/{method}-{allocator}/{path}")
                if path == "weights":
                    subst.restore()
            row[f"ppl_{path}"] = ppl
            row[f"eval_seconds_{path}"] = round(time.time() - t, 1)
        row["path"] = paths[0] if len(paths) == 1 else "program (weights checked)"
        row["eval_windows"] = int(split.evaluation.shape[0])
        row["ppl"] = row[f"ppl_{paths[0]}"]
        if args.check_paths:
            row["path_rel_diff"] = abs(row["ppl_weights"] / row["ppl_program"] - 1)
        done[row["key"]] = row
        doc["rows"] = list(done.values())
        save()
        timings = ", ".join(f"{p} {row['eval_seconds_' + p]}s" for p in paths)
        log(f"{ratio} / {group} / {method}-{allocator} / bits {bits} hadamard {hadamard} qgroup {qg}: "
            f"ppl {row['ppl']:.4f}, {row['cache_bytes_per_token']} B/token ({row['cache_fraction']:.4f}) "
            f"({timings}, plan {row['plan_seconds']}s)"
            + (f", weights vs program rel diff {row['path_rel_diff']:.2e}" if args.check_paths else ""))

    if any(is_quant_row(r) for r in doc["rows"] if r["model"] == args.model):
        print(format_quant_table(doc, args.model, args.markdown))
    print(format_table(doc, args.model, args.markdown))
    log(f"done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
