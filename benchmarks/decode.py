"""End-to-end decode: Inductor without Palu (StaticCache) vs palu_backend (LatentCache).

A Llama-2-7B-shaped model with random fp16 weights decodes with a static cache of
``--context`` slots at ``--batch``; we time compiled decode steps (CUDA events) and read
the peak memory, then compute the largest batch whose weights + cache fit in ``--budget-gb``
from the measured bytes per sequence. Run on the GPU machine:

    PYTHONPATH=. python benchmarks/decode.py --layers 32 --batch 8 --context 16384
"""
from __future__ import annotations

import argparse
import gc
import time

import torch
from tabulate import tabulate
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import palu_fx
from palu_fx import LatentCache, PaluConfig


def build(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=131072)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    model.generation_config.eos_token_id = None
    return model


def cache_bytes(cache) -> int:
    if isinstance(cache, LatentCache):
        return cache.nbytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def run(model, cache, batch: int, context: int, steps: int) -> tuple[float, float, int]:
    """(ms per decode step, peak GiB, cache bytes) after a short prefill."""
    ids = torch.randint(3, 32000, (batch, 16), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        pos = 16
        for _ in range(3):  # compile + warm up the decode graph
            model(input_ids=nxt, past_key_values=cache, cache_position=torch.tensor([pos], device="cuda"))
            pos += 1
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            model(input_ids=nxt, past_key_values=cache, cache_position=torch.tensor([pos], device="cuda"))
            pos += 1
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / steps, torch.cuda.max_memory_allocated() / 2**30, cache_bytes(cache)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--budget-gb", type=float, default=100.0)
    args = p.parse_args()
    rows = []
    weights = None
    for name in ("inductor", "palu"):
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        model = build(args.layers)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        t0 = time.time()
        if name == "inductor":
            model.forward = torch.compile(model.forward, backend="inductor")
            cache = StaticCache(config=model.config, max_cache_len=args.context)
        else:
            cfg = PaluConfig(rank_ratio=args.ratio, group_size=args.group_size)
            model.forward = torch.compile(model.forward, backend=palu_fx.backend(cfg))
            cache = LatentCache(model.config, max_cache_len=args.context, compression=cfg)
        ms, peak, cbytes = run(model, cache, args.batch, args.context, args.steps)
        per_seq = cbytes / args.batch
        max_batch = int((args.budget_gb * 1e9 - weights) // per_seq)
        rows.append([name, f"{ms:.2f}", f"{args.batch * 1000 / ms:.0f}", f"{peak:.1f}", f"{cbytes / 2**30:.2f}",
                     max_batch, f"{time.time() - t0:.0f}"])
        del model, cache
    base_ms, palu_ms = float(rows[0][1]), float(rows[1][1])
    print(f"Llama-2-7B shape, {args.layers} layers, batch {args.batch}, context {args.context}, fp16, "
          f"rank ratio {args.ratio}, group {args.group_size}; weights {weights / 2**30:.1f} GiB")
    print(tabulate(rows, headers=["path", "ms/step", "tokens/s", "peak GiB", "cache GiB",
                                  f"max batch in {args.budget_gb:.0f} GB", "wall s"]))
    print(f"speedup {base_ms / palu_ms:.2f}x, batch capacity {rows[1][5] / max(rows[0][5], 1):.2f}x")


if __name__ == "__main__":
    main()
