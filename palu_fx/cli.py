"""``palu-fx``: the command line.

    palu-fx demo                      the README's main job: a real model, on the CPU
    palu-fx eval --model smollm2-135m ...  perplexity before/after, cache bytes, ranks -> JSON

Model names live here (and in models.py), never in the graph pass.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from palu_fx.config import GROUP_ALL, PaluConfig


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _group(v: str):
    if v in ("all", "j", "J"):
        return GROUP_ALL
    if v in ("auto", "none", "None"):
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer, 'all' or 'auto', got {v!r}") from None


def _config(args) -> PaluConfig:
    return PaluConfig(rank_ratio=args.ratio, group_size=args.group_size, rank_multiple=args.rank_multiple,
                      method=args.method, allocator=args.allocator)


def run_eval(model, tokenizer, split, cfg: PaluConfig, *, progress: bool = True, baseline: bool = True) -> dict:
    """Calibrate, compress and measure perplexity and cache bytes; returns the result dict."""
    from palu_fx.calibrate import calibrated_plan
    from palu_fx.evaluate import perplexity, program_logits_fn
    from palu_fx.export import export_decoder, export_prefill_only
    from palu_fx.exported import compress_exported
    from palu_fx.report import report

    t0 = time.time()
    window = split.evaluation.shape[1]
    ep_pre = export_prefill_only(model, seq_len=min(window, 64), max_seq_len=max(window, split.calibration.shape[1]))
    _log(f"exported the prefill program ({time.time() - t0:.0f}s)")
    plan = calibrated_plan(ep_pre, cfg, list(split.calibration.unsqueeze(1)), progress=progress)
    _log(f"calibrated on {plan.meta['calibration_tokens']} tokens ({time.time() - t0:.0f}s)")
    compressed = compress_exported(ep_pre, plan)
    with torch.no_grad():
        base = perplexity(program_logits_fn(ep_pre), split.evaluation, progress, "ppl (original)") if baseline else None
        ppl = perplexity(program_logits_fn(compressed), split.evaluation, progress, "ppl (palu)")
    # Cache bytes are measured on the decoding program (static KV cache of one window).
    ep_dec = export_decoder(model, batch_size=1, max_cache_len=window + 1)
    dec = compress_exported(ep_dec, plan)
    rep = report(dec)
    return {
        "baseline_ppl": base, "ppl": ppl,
        "cache_bytes_before": rep.cache_bytes_before, "cache_bytes_after": rep.cache_bytes_after,
        "ranks": [list(r) for r in rep.ranks], "config": cfg.to_dict(),
        "eval_tokens": int(split.evaluation.numel()), "calibration_tokens": plan.meta["calibration_tokens"],
        "evaluation_source": split.evaluation_source, "calibration_source": split.calibration_source,
        "seconds": round(time.time() - t0, 1), "_report": rep, "_plan": plan, "_decoder": dec, "_ep_dec": ep_dec,
    }


def generate(ep, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation through an exported static-cache program (prefill, then decode)."""
    mod = ep.module()
    with torch.no_grad():
        logits = mod(input_ids=ids, cache_position=torch.arange(ids.shape[1]))
        out = [logits[:, -1:].argmax(-1)]
        for i in range(new_tokens - 1):
            pos = torch.tensor([ids.shape[1] + i])
            logits = mod(input_ids=out[-1], cache_position=pos)
            out.append(logits[:, -1:].argmax(-1))
    return torch.cat(out, dim=1)


def cmd_demo(args) -> int:
    from palu_fx.data import austen_books, austen_split
    from palu_fx.export import export_decoder
    from palu_fx.models import load_model

    torch.manual_seed(0)
    _log("loading SmolLM2-135M (GGUF, dequantized to fp32)...")
    model, tok = load_model("smollm2-135m")
    books = austen_books(["prideprejudice", "emma"], download=True)
    split = austen_split(tok, eval_windows=args.eval_windows, eval_window=args.window,
                         calib_windows=args.calib_windows, calib_window=args.calib_window, books=books)
    cfg = _config(args)
    res = run_eval(model, tok, split, cfg, progress=not args.quiet)
    rep = res["_report"]
    print(rep)
    print(f"\nperplexity on {res['eval_tokens']} tokens of {res['evaluation_source']} "
          f"(calibrated on {res['calibration_tokens']} tokens of {res['calibration_source']}):")
    print(f"  original {res['baseline_ppl']:.2f}  ->  palu-fx {res['ppl']:.2f} "
          f"({100 * (res['ppl'] / res['baseline_ppl'] - 1):+.1f}%)")
    print(f"KV cache for a {args.window + 1}-token context: {res['cache_bytes_before']:,} -> "
          f"{res['cache_bytes_after']:,} bytes ({res['cache_bytes_after'] / res['cache_bytes_before']:.1%})")
    prompt = "It is a truth universally acknowledged, that a single man in possession of a good fortune,"
    ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
    ep_gen = export_decoder(model, batch_size=1, max_cache_len=ids.shape[1] + args.new_tokens + 1)
    from palu_fx.exported import compress_exported

    gen = compress_exported(ep_gen, res["_plan"])
    cont = generate(gen, ids, args.new_tokens)
    base = generate(ep_gen, ids, args.new_tokens)
    print(f"\nprompt:           {prompt}")
    print(f"original model:   {tok.decode(base[0])!r}")
    print(f"through palu-fx:  {tok.decode(cont[0])!r}")
    print(f"\ndone in {res['seconds']:.0f}s of evaluation")
    return 0


def cmd_eval(args) -> int:
    from palu_fx.data import TextSplit, austen_books, austen_split, read_text_files, token_windows, tokenize
    from palu_fx.models import load_model

    model, tok = load_model(args.model)
    if args.text:
        ids = tokenize(tok, read_text_files(args.text))
        bos = tok.bos_token_id
        n_cal = args.calib_windows * args.calib_window
        cal = token_windows(ids[:n_cal], args.calib_window, args.calib_windows, bos)
        ev = token_windows(ids, args.window, args.eval_windows, bos, offset=n_cal)
        split = TextSplit(cal, ev, f"files[:{n_cal}]", f"files[{n_cal}:]")
    else:
        books = austen_books(["prideprejudice", "emma"], download=True)
        split = austen_split(tok, eval_windows=args.eval_windows, eval_window=args.window,
                             calib_windows=args.calib_windows, calib_window=args.calib_window, books=books)
    res = run_eval(model, tok, split, _config(args), progress=not args.quiet)
    print(res["_report"])
    out = {k: v for k, v in res.items() if not k.startswith("_")}
    out["model"] = args.model
    print(json.dumps(out, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=2))
        _log(f"wrote {args.output}")
    return 0


def _common(p: argparse.ArgumentParser, ratio: float, group, allocator: str) -> None:
    p.add_argument("--ratio", type=float, default=ratio, help="rank ratio in (0, 1] (default %(default)s)")
    p.add_argument("--group-size", type=_group, default=group, help="heads per group: 1 (M-LRD), N, 'all' (J-LRD)")
    p.add_argument("--rank-multiple", type=int, default=16)
    p.add_argument("--method", default="kfac", choices=["svd", "whitened", "kfac"])
    p.add_argument("--allocator", default=allocator, choices=["uniform", "fisher", "energy"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="palu-fx", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compress SmolLM2-135M's KV cache on the CPU and show the cost")
    _common(d, 0.5, GROUP_ALL, "energy")
    d.add_argument("--eval-windows", type=int, default=4)
    d.add_argument("--window", type=int, default=1024)
    d.add_argument("--calib-windows", type=int, default=6)
    d.add_argument("--calib-window", type=int, default=512)
    d.add_argument("--new-tokens", type=int, default=24)
    e = sub.add_parser("eval", help="perplexity of the original and the compressed model, as JSON")
    e.add_argument("--model", default="smollm2-135m", help="smollm2-135m or gemma3-270m")
    _common(e, 0.5, GROUP_ALL, "energy")
    e.add_argument("--text", nargs="*", help="local text files (default: the Austen corpus)")
    e.add_argument("--eval-windows", type=int, default=16)
    e.add_argument("--window", type=int, default=1024)
    e.add_argument("--calib-windows", type=int, default=64)
    e.add_argument("--calib-window", type=int, default=512)
    e.add_argument("--output", "-o", help="write the JSON result here")
    args = parser.parse_args(argv)
    import warnings

    # tracing transformers' models under torch.export is noisy and the noise is not ours
    warnings.filterwarnings("ignore", category=UserWarning, module="torch._dynamo")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return {"demo": cmd_demo, "eval": cmd_eval}[args.cmd](args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"palu-fx {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
