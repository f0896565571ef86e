"""End-to-end decode: Inductor without Palu (StaticCache) vs palu_backend (LatentCache).

A Llama-2-7B-shaped model (``--shape llama3``: Llama-3-8B's, 8 KV heads) with random fp16 weights
decodes with a static cache of
``--context`` slots at ``--batch``; we time compiled decode steps (CUDA events) and read
the peak memory, then compute the largest batch whose weights + cache fit in ``--budget-gb``
from the measured cache bytes per token, at ``--capacity-context`` (32k) tokens per sequence. Run on
the GPU machine:

    PYTHONPATH=. python benchmarks/decode.py --layers 32 --batch 8 --context 16384

``--tiny`` shrinks the model (2 layers, hidden 256) so the script itself can be checked on the
CPU (timings then mean nothing).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
from tabulate import tabulate
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import palu_fx
from palu_fx import LatentCache, PaluConfig


SHAPES = {  # hidden, intermediate, query heads, KV heads, vocab, rope theta
    "llama2": (4096, 11008, 32, 32, 32000, 10000.0),  # Llama-2-7B
    "llama3": (4096, 14336, 32, 8, 128256, 500000.0),  # Llama-3-8B: GQA, 4 query heads per KV head
}


def folded_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    """Hugging Face's SDPA attention, except that a decode step of GQA folds each KV head's query
    heads into the query length (exact for one query token) instead of ``repeat_kv``: under a
    mask, transformers 5.17 (the GPU machine's) copies every KV head's cache once per query head
    (``repeat_kv``, since SDPA's fused kernels take GQA only without a mask), 4x the cache in copies
    at Llama-3-8B's 4 query heads per KV head; 5.24 folds the heads itself (identical logits). The
    strong Inductor baseline of GQA decode (``--gqa-baseline folded``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    B, Hq, Sq, D = query.shape
    Hkv = key.shape[1]
    if Sq != 1 or Hq == Hkv or (attention_mask is not None and attention_mask.shape[1] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kw)
    q = query.reshape(B, Hkv, Hq // Hkv, D)  # query head h -> (KV head h // n, row h % n)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(B, Hq, 1, D).transpose(1, 2), None


def build(layers: int, tiny: bool, device: str, shape: str = "llama2") -> LlamaForCausalLM:
    hidden, inter, heads, kv, vocab, theta = (256, 512, 4, 4 if shape == "llama2" else 2, 32000, 10000.0) if tiny \
        else SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                      num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=131072, rope_theta=theta)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.float16 if device == "cuda" else torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def cache_bytes(cache) -> int:
    if isinstance(cache, LatentCache):
        return cache.nbytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(model, cache, batch: int, steps: int, prompt: int = 1, profile: bool = False) -> tuple[float, float, int, torch.Tensor]:
    """(ms per decode step, peak GiB, cache bytes, greedy tokens), decoding from position 0.

    Every call, the first included, is a one-token step, so one graph is compiled per path
    (the cache is allocated before it).
    The step is timed with the cache nearly empty: both paths read the whole static cache
    (``context`` slots) and mask the unwritten ones, so the cost of a step does not depend on
    how many tokens were written.
    """
    dev = model.device
    cuda = dev.type == "cuda"
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=gen).to(dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokens = []
    with torch.no_grad():
        # same keyword arguments as the steps below: a different set recompiles
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device=dev))
        nxt = out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
        pos = prompt

        def step():
            nonlocal nxt, pos
            logits = model(input_ids=nxt, past_key_values=cache, cache_position=torch.tensor([pos], device=dev)).logits
            nxt = logits[:, -1:].argmax(-1)
            tokens.append(nxt)
            pos += 1

        log("first step (compiled)")
        for _ in range(3):  # warm up
            step()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1000 / steps
        log(f"{steps} steps timed: {ms:.2f} ms/step")
        if profile and cuda:
            from torch.profiler import ProfilerActivity, profile as prof

            with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                step()
                torch.cuda.synchronize()
            ka = p.key_averages()
            print(ka.table(sort_by="cuda_time_total", row_limit=12), file=sys.stderr, flush=True)
            # host time: a decode step whose launches take longer than its kernels is CPU-bound
            print(ka.table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr, flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return ms, peak, cache_bytes(cache), torch.cat(tokens, 1)


def time_prefill(model, cache, batch: int, n: int, reps: int = 5) -> float:
    """Median ms of a compiled prefill of ``n`` tokens from position 0 (after two warm-up calls,
    the first compiling). The cache is emptied before each call (untimed): a second prefill over
    written slots went out of bounds in an index of the compiled graph (CPU, transformers 5.24),
    and from empty every call does the same work."""
    dev = model.device
    ids = torch.randint(3, model.config.vocab_size, (batch, n), generator=torch.Generator().manual_seed(2)).to(dev)
    pos = torch.arange(n, device=dev)
    times = []
    with torch.no_grad():
        for i in range(reps + 2):
            cache.reset()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, cache_position=pos)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
    log(f"prefill of {n} tokens: {', '.join(f'{t:.2f}' for t in times)} ms")
    return sorted(times[2:])[reps // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2",
                   help="llama2: Llama-2-7B (32 KV heads); llama3: Llama-3-8B (8 KV heads, GQA)")
    p.add_argument("--gqa-baseline", choices=["hf", "folded"], default="hf",
                   help="the Inductor path's attention for GQA decode: Hugging Face's SDPA (repeat_kv copies under "
                        "a mask) or the query heads folded into the query length (folded_gqa_sdpa)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--bits", type=int, choices=[2, 3, 4], help="quantize palu's latents (packed rows in the LatentCache)")
    p.add_argument("--budget-gb", type=float, default=100.0)
    p.add_argument("--capacity-context", type=int, default=32768, help="context for the max-batch column")
    p.add_argument("--capacity-layers", type=int, default=32, help="model depth for the max-batch column")
    p.add_argument("--paths", nargs="+", default=["inductor", "palu"], choices=["inductor", "palu"])
    p.add_argument("--modes", nargs="+", default=["default"], choices=["default", "reduce-overhead"],
                   help="torch.compile modes, each run for every path (reduce-overhead: CUDA graphs)")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step per path")
    p.add_argument("--tiny", action="store_true", help="a small model, to check the script on the CPU")
    p.add_argument("--prefill", type=int, default=0,
                   help="time a compiled prefill of this many tokens per path instead of decode steps")
    p.add_argument("--full-rank-check", action="store_true",
                   help="also run palu at rank ratio 1.0 and compare its greedy tokens with inductor's")
    p.add_argument("--gs1-kernel", choices=["default", "group", "per-head"], default="default",
                   help="force the kernel of group-size-1 RoPE decode (experiment; the library picks by default)")
    args = p.parse_args()
    if args.gs1_kernel != "default":
        from palu_fx.kernels.latent_attention import wrapper

        pick = wrapper.choose_config

        def forced(rebuild, gs, *rest, **kw):
            c = pick(rebuild, gs, *rest, **kw)
            if rebuild and gs == 1 and not rest[-1]:  # not under the interpreter
                heads = 1 if args.gs1_kernel == "per-head" else 0
                c = wrapper.KernelConfig(**{**c.__dict__, "group_heads": heads})
            return c

        wrapper.choose_config = forced
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, tokens = [], {}
    weights = None
    runs = []
    for mode in args.modes:
        tag = "" if mode == "default" else f" ({mode})"
        runs += [(n + tag, {"inductor": None, "palu": args.ratio}[n], mode) for n in args.paths]
    runs += [("palu r=1.0", 1.0, "default")] if args.full_rank_check else []
    for name, ratio, mode in runs:
        torch._dynamo.reset()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        log(f"{name}: building the model")
        model = build(args.layers, args.tiny, device, args.shape)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        t0 = time.time()
        mode_arg = None if mode == "default" else mode
        if ratio is None:
            if args.gqa_baseline == "folded":
                from transformers import AttentionInterface
                from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
                AttentionInterface.register("folded_gqa_sdpa", folded_gqa_sdpa)
                AttentionMaskInterface.register("folded_gqa_sdpa", sdpa_mask)
                model.set_attn_implementation("folded_gqa_sdpa")
            model.forward = torch.compile(model.forward, backend="inductor", mode=mode_arg)
            cache = StaticCache(config=model.config, max_cache_len=args.context)
        else:
            cfg = PaluConfig(rank_ratio=ratio, group_size=args.group_size, bits=args.bits)
            model.forward = torch.compile(model.forward, backend=palu_fx.backend(cfg, mode=mode_arg))
            cache = LatentCache(model.config, max_cache_len=args.context, compression=cfg)
        # allocate the cache before the first compiled call: buffers created inside a graph
        # replayed as a CUDA graph would belong to the graph's memory pool (reduce-overhead
        # then fails with "accessing tensor output of CUDAGraphs that has been overwritten")
        cfg_m = model.config
        cache.early_initialization(args.batch, cfg_m.num_key_value_heads, cfg_m.hidden_size // cfg_m.num_attention_heads,
                                   model.dtype, model.device)
        if args.prefill:
            rows.append([name, f"{time_prefill(model, cache, args.batch, args.prefill):.2f}"])
            del model, cache
            continue
        try:
            ms, peak, cbytes, tokens[name] = run(model, cache, args.batch, args.steps, profile=args.profile)
        except Exception as e:  # report and go on: the other rows still mean something
            log(f"{name} FAILED: {type(e).__name__}: {str(e)[:2000]}")
            del model, cache
            continue
        # capacity of the full-depth model (--capacity-layers) from this run's per-layer bytes
        in_layers = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
        scale = args.capacity_layers / args.layers
        full_weights = weights + in_layers * (scale - 1)
        per_seq = cbytes / args.batch * args.capacity_context / args.context * scale
        max_batch = int((args.budget_gb * 1e9 - full_weights) // per_seq)
        rows.append([name, f"{ms:.2f}", f"{args.batch * 1000 / ms:.0f}", f"{peak:.1f}", f"{cbytes / 2**30:.3f}",
                     max_batch, f"{time.time() - t0:.0f}"])
        del model, cache
    shape = ("tiny Llama (hidden 256, 4 heads)" if args.tiny else "Llama-2-7B shape (32 heads, head dim 128)"
             if args.shape == "llama2" else "Llama-3-8B shape (32 query / 8 KV heads, head dim 128)")
    if args.prefill:
        print(f"{shape}, {args.layers} layers, batch {args.batch}, prefill of {args.prefill} tokens, rank ratio "
              f"{args.ratio}, group {args.group_size}, bits {args.bits or 16}")
        print(tabulate(rows, headers=["path", "prefill ms"]))
        return
    print(f"{shape}, {args.layers} layers, batch {args.batch}, context {args.context}, fp16, "
          f"rank ratio {args.ratio}, group {args.group_size}, bits {args.bits or 16}; weights {weights / 2**30:.1f} GiB")
    print(tabulate(rows, headers=["path", "ms/step", "tokens/s", "peak GiB", "cache GiB",
                                  f"max batch @{args.capacity_context // 1024}k, {args.capacity_layers} layers, {args.budget_gb:.0f} GB", "wall s"]))
    by = {r[0]: r for r in rows}
    for mode in args.modes:
        tag = "" if mode == "default" else f" ({mode})"
        ind, pal = by.get("inductor" + tag), by.get("palu" + tag)
        if ind and pal:
            print(f"{mode}: speedup {float(ind[1]) / float(pal[1]):.2f}x, "
                  f"batch capacity {pal[5] / max(ind[5], 1):.2f}x")
    if "palu r=1.0" in tokens:
        same = (tokens["palu r=1.0"] == tokens["inductor"]).float().mean().item()
        print(f"full-rank palu vs inductor: {same:.3f} of greedy tokens identical")


if __name__ == "__main__":
    main()
