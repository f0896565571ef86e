"""Latent-attention decode benchmark (issue 3): our Triton kernels vs SDPA on the full cache.

    PYTHONPATH=. python benchmarks/attention.py            # H200: check, tune, table
    PYTHONPATH=. python benchmarks/attention.py --smoke    # CPU: interpreter, tiny shapes
    # issue 5: quantized rows and checks, Llama-2-7B shape only, one (batch, context)
    PYTHONPATH=. python benchmarks/attention.py --no-sweep --check --shapes llama2 --batch 8 --ctx 32k \
        --quant-bits 4 2 --no-prefill

One table row per (attention shape, batch, context, group size, RoPE or not) at rank ratio
0.5. Columns: our time; SDPA (best of flash, cuDNN, efficient) on the full fp16 cache; the naive PyTorch
latent reference; speedup vs SDPA; the bytes floor (latent bytes / copy bandwidth); the
FLOPs floor (key-reconstruction FLOPs / matmul rate), both ceilings measured in the same
run; efficiency = max(floors) / ours.

Quantized rows (``--quant-bits``, modes "RoPE q4", "absorbed q4", ...): the cache holds
packed codes with fp16 scale and zero per token and Palu group (the pass's default
quantization group), read by the same fused kernels that dequantize in registers; the
bytes floor counts the real packed bytes (codes + scales + zeros), the FLOPs floor and
the efficiency are defined as above, SDPA is the same full fp16 cache. "ours" is the
fastest of the configs ``row_candidates`` lists (every candidate's time is printed, so a
default that loses shows in the log). ``--check`` runs
the quantized kernels against ``quant_latent_attention_ref`` first (bits 2/3/4, group
sizes 1/2/4, masks, ragged lengths) and exits non-zero if any case fails.

Timing: the op runs inside a CUDA graph (one call per input set, several sets rotated so
small cases do not sit in L2), median of replays with CUDA events: GPU time, no Python
launch overhead, as a graph-captured decode step would see it.

Parts in their own modules: the correctness checks (``attention_checks.py``), the tuning
sweep (``attention_sweep.py``) and the prefill table (``prefill_table.py``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SMOKE = "--smoke" in sys.argv
WIDE = "--wide" in sys.argv
PREFETCH_AB = "--prefetch-ab" in sys.argv
DEFAULTS_ONLY = "--defaults-only" in sys.argv
NO_NAIVE = "--no-naive" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from tabulate import tabulate  # noqa: E402

from palu_fx.kernels.latent_attention.naive import latent_attention_ref  # noqa: E402
from palu_fx.kernels.latent_attention.quant import quant_latent_attention_triton  # noqa: E402
from palu_fx.kernels.latent_attention.quant_naive import quant_latent_attention_ref  # noqa: E402
from palu_fx.kernels.latent_attention.wrapper import KernelConfig, latent_attention_triton  # noqa: E402
from palu_fx.quant import bytes_per_token, quantize_packed  # noqa: E402

# (query heads, KV heads, head dim): the MHA and GQA attention shapes of the issue
SHAPES = {"32q/32kv d128": (32, 32, 128), "32q/8kv d128": (32, 8, 128)}
SHAPE_ALIASES = {"llama2": "32q/32kv d128", "mha": "32q/32kv d128", "gqa": "32q/8kv d128"}
RANK_RATIO = 0.5
DEV = "cpu" if SMOKE else "cuda"
DT = torch.float32 if SMOKE else torch.bfloat16 if "--bf16" in sys.argv else torch.float16
L2_BYTES = 50 << 20


# ------------------------------------------------------------------ timing
def gpu_time(fn, sets, min_iters=5, max_iters=50, budget_ms=300.0):
    """Median ms of one ``fn(*args)``: a CUDA graph of one call per input set, replayed."""
    if DEV == "cpu":
        t = time.perf_counter()
        for a in sets:
            fn(*a)
        return (time.perf_counter() - t) * 1e3 / len(sets)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, workspaces) off the capture
        for a in sets:
            fn(*a)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for a in sets:
            fn(*a)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    t_end = None
    while len(times) < max_iters:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / len(sets))
        if t_end is None:
            t_end = max(min_iters, int(budget_ms / max(times[0] * len(sets), 1e-3)))
        if len(times) >= t_end:
            break
    del graph
    return statistics.median(times)


def eager_time(fn, args, iters=3):
    """For the slow naive reference: events around eager calls after one warm-up."""
    fn(*args)
    if DEV == "cpu":
        return gpu_time(fn, [args])
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn(*args)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return statistics.median(times)


def n_sets(bytes_per_set):
    return 1 if DEV == "cpu" else max(1, min(16, math.ceil(4 * L2_BYTES / max(bytes_per_set, 1))))


@triton.jit
def _stream_copy(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


def measure_ceilings():
    """(copy bandwidth B/s counting read + write, fp16 matmul FLOP/s) on this device.

    Copy: the best of ``Tensor.copy_`` and a plain Triton streaming copy over 4 GiB.
    """
    if DEV == "cpu":
        return 1e10, 1e11, {}
    x = torch.randn(1 << 31, device=DEV, dtype=torch.float16)  # 4 GiB
    y = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()
    probes = {
        "torch copy_": gpu_time(lambda: y.copy_(x), [()], min_iters=10),
        "triton copy": gpu_time(lambda: _stream_copy[(triton.cdiv(x.numel(), 8192),)](x, y, x.numel(), BLOCK=8192,
                                                                                       num_warps=8), [()],
                                min_iters=10),
    }
    bws = {k: nbytes / (t * 1e-3) for k, t in probes.items()}
    del x, y
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.float16)
    b = torch.randn(n, n, device=DEV, dtype=torch.float16)
    t = gpu_time(lambda: torch.mm(a, b), [()], min_iters=10)
    return max(bws.values()), 2 * n ** 3 / (t * 1e-3), bws


# ------------------------------------------------------------------ inputs
def rope_tables(S, D, theta=10000.0, interleaved=False):
    """cos/sin [1, S, D] as a model computes them (model dtype, pair partners share an angle)."""
    inv = 1.0 / theta ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D)
    ang = torch.arange(S, device=DEV, dtype=torch.float32)[:, None] * inv[None, :]
    ang = (ang.repeat_interleave(2, -1) if interleaved else torch.cat([ang, ang], -1))[None]
    return ang.cos().to(DT), ang.sin().to(DT)


def latent_case(Hq, Hkv, D, gs, B, S, rope, tables=None, mask=False, with_lv=False):
    """Positional op args at rank ratio 0.5 (rope: reconstruct mode, else absorbed).

    ``with_lv``: as the pass calls the op, with each KV head's value reconstruction ``lv``
    where the value rank passes the head dim (the pass folds ``L_v`` into ``o_proj`` only
    up to the head dim)."""
    G = Hkv // gs
    r = int(RANK_RATIO * gs * D)
    hk = torch.randn(B, S, G * r, device=DEV, dtype=DT)
    hv = torch.randn(B, S, G * r, device=DEV, dtype=DT)
    m = None
    if mask:  # per-sequence lengths: sequence b sees the first S - 37*b slots
        lens = S - 37 * torch.arange(B, device=DEV)
        m = (torch.arange(S, device=DEV)[None, :] < lens[:, None])[:, None, None, :]
    if rope:
        q = torch.randn(B, Hq, 1, D, device=DEV, dtype=DT)
        lk = torch.randn(G, gs * D, r, device=DEV, dtype=DT) / math.sqrt(r)
        cos, sin = tables if tables is not None else rope_tables(S, D)
        args = (q, hk, hv, lk, None, cos, sin, None, m, D ** -0.5, 0.0, False, 1, 1e-6)
    else:
        q = torch.randn(B, Hq, 1, r, device=DEV, dtype=DT)
        args = (q, hk, hv, None, None, None, None, None, m, r ** -0.5, 0.0, False, 0, 1e-6)
    if with_lv and r > D:
        args += (torch.randn(Hkv, D, r, device=DEV, dtype=DT) / math.sqrt(r),)
    return args


def quantized(args, bits, group_size=None):
    """Op args of a plain latent case -> those of the quantized op (hk, hv packed; group size
    default: one Palu group's rank, as the pass stores them)."""
    q, hk, hv, lk, *rest = args
    G = lk.shape[0] if lk is not None else hk.shape[-1] // q.shape[-1]
    kg = group_size or hk.shape[-1] // G
    vg = group_size or hv.shape[-1] // G
    tail = rest[:6]  # k_bias, cos, sin, k_norm_weight, attn_mask, scale
    softcap, causal, rope, eps, *lv = rest[6:]
    return (q, *quantize_tokens(hk, bits, kg), *quantize_tokens(hv, bits, vg), lk, *tail, bits, kg, bits, vg,
            softcap, causal, rope, eps, *lv)


def quantize_tokens(x, bits, group_size, chunk_elems=1 << 27):
    """``quantize_packed`` over slices of tokens (it quantizes each token on its own). On a
    whole 16 GiB latent (B=32 x 128k) its float32 copy and packing temporaries ran out of
    memory: 121 GiB allocated, 32 of them the two fp16 latents, and 16 more asked for (the
    rows before held 0.2 GiB between them: not a leak)."""
    B, S, C = x.shape
    step = max(1, chunk_elems // (B * C))
    outs = None
    for i in range(0, S, step):
        part = quantize_packed(x[:, i:i + step], bits, group_size)
        if outs is None:
            outs = [torch.empty(B, S, t.shape[-1], dtype=t.dtype, device=t.device) for t in part]
        for o, t in zip(outs, part):
            o[:, i:i + step] = t
    return tuple(outs)


def latent_bytes(Hkv, D, gs, B, S, bits=0):
    """Bytes of both latent caches: fp16, or packed codes + fp16 scale/zero per Palu group."""
    G, r = Hkv // gs, int(RANK_RATIO * gs * D)
    if not bits:
        return B * S * G * 2 * r * 2
    return B * S * 2 * G * bytes_per_token(r, bits)


def recon_flops(Hkv, D, gs, B, S, rope):
    return 2 * B * S * Hkv * D * int(RANK_RATIO * gs * D) if rope else 0


# ------------------------------------------------------------------ runners
def run_ours(args, cfg=None):
    return latent_attention_triton(*args, config=cfg)


def run_ours_quant(args, cfg=None):
    return quant_latent_attention_triton(*args, config=cfg)


def sdpa_time(Hq, Hkv, D, B, S):
    """Best SDPA time on the full fp16 cache over its fused backends (flash, cuDNN, memory-
    efficient) and the variants below: native GQA or query heads folded into the query
    length (exact for one decode token), cache in [B, H, S, D] or [B, S, H, D] memory.
    Returns (ms, name of the fastest).

    cuDNN matters: in a compiled Hugging Face Llama-2-7B decode step on the H200 (torch 2.11)
    SDPA ran cuDNN's flash kernel at 0.48 ms per layer for B=8 x 16k, about 4.5 TB/s, where
    the flash backend alone had measured 1.73 ms at 32k (2.5 TB/s): a flash-only baseline
    overstates our speedups by up to ~1.8x.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kv_bytes = 2 * B * Hkv * S * D * 2
    if DEV == "cuda":
        backends = [getattr(SDPBackend, n) for n in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
                    if hasattr(SDPBackend, n)]
    else:
        backends = [SDPBackend.MATH]

    def native(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)

    def folded(q, k, v):
        return F.scaled_dot_product_attention(q.view(B, Hkv, Hq // Hkv, D), k, v)

    best, name = float("inf"), "-"
    for layout in ("BHSD", "BSHD"):
        def kv():
            t = torch.randn(B, Hkv, S, D, device=DEV, dtype=DT) if layout == "BHSD" else \
                torch.randn(B, S, Hkv, D, device=DEV, dtype=DT).transpose(1, 2)
            return t
        sets = [(torch.randn(B, Hq, 1, D, device=DEV, dtype=DT), kv(), kv()) for _ in range(n_sets(kv_bytes))]
        for backend in backends:
            for fn in ([native, folded] if Hq != Hkv else [native]):
                def call(q, k, v, fn=fn, backend=backend):
                    with sdpa_kernel([backend]):
                        return fn(q, k, v)
                try:
                    t = gpu_time(call, sets)
                    if t < best:
                        best, name = t, f"{backend.name.split('_')[0].lower()}/{fn.__name__}/{layout}"
                except RuntimeError as e:  # a backend without GQA or this layout on this torch
                    print(f"  sdpa {backend.name} {fn.__name__}/{layout} failed: {str(e).splitlines()[0]}")
        del sets
    return best, name


def naive_fits(Hq, Hkv, D, gs, B, S):
    # fp32 keys (several temporaries), repeated keys and values per query head
    est = 4 * B * S * (6 * Hkv * D + Hq * D + 2 * Hq * int(RANK_RATIO * gs * D))
    return est < 40e9 and B * S <= 8 * 32768


def row_candidates(tuned, rope, gs, Hq, Hkv, bits):
    """(label, config) pairs a table row takes the fastest of (all are printed): the tuned or
    built-in config, plus, where one query head owns each latent group (group size 1, as
    many KV heads as query heads), ``per_head.py``'s kernel at 1, 2 and 4 heads per
    program and the group kernel, for fp16 and packed caches; absorbed rows over packed
    caches also try two more token tiles of the group kernel. Some of them spill registers
    under Triton 3.6 (``benchmarks/kernel_resources.py`` shows which)."""
    cands = [("default", tuned)]
    if SMOKE or DEFAULTS_ONLY:
        return cands
    if gs == 1 and Hq == Hkv:
        tiles = ((64, 4, 3, 1), (128, 8, 2, 1), (64, 4, 3, 2), (128, 8, 2, 2)) if rope \
            else ((128, 4, 3, 1), (128, 4, 3, 2), (64, 4, 3, 4))
        for bs, w, st, h in tiles:  # (block_s, warps, stages, heads per program)
            cands.append((f"per-head x{h} {bs}/{w}w/{st}s", KernelConfig(block_s=bs, num_warps=w, num_stages=st,
                                                                          programs_per_sm=8 if rope else 4,
                                                                          group_heads=h)))
        if rope:
            cands.append(("rebuild 64/4w/3s", KernelConfig(block_s=64, num_warps=4, num_stages=3, programs_per_sm=8)))
        elif bits:  # the fastest of the --wide sweep at 4 bits (RESULTS.md)
            cands.append(("per-head x4 64/4w/2s/16p", KernelConfig(block_s=64, num_warps=4, num_stages=2,
                                                                   programs_per_sm=16, group_heads=4)))
    if not rope and bits:
        for bs, w, st in ((64, 4, 3), (128, 8, 3)):
            cands.append((f"absorbed {bs}/{w}w/{st}s", KernelConfig(block_s=bs, num_warps=w, num_stages=st)))
    # A/B: 4-bit codes dequantized a 32-bit word at a time (packed half2 PTX) or by Triton's
    # own unpack; with --prefetch-ab, the small per-tile loads a tile ahead or in the loop
    ab = []
    if bits == 4:
        ab += [(f"{label} triton-unpack", dataclasses.replace(cfg, word_dequant=False))
               for label, cfg in cands if cfg is not None]  # (None: the built-in default)
    if bits and PREFETCH_AB:
        ab += [(f"{label} no-prefetch", dataclasses.replace(cfg, prefetch=False)) for label, cfg in cands[1:]]
    if WIDE and gs == 1 and Hq == Hkv:
        cands += wide_candidates(rope, bits)
    return cands + ab


def wide_candidates(rope, bits):
    """``--wide``: occupancy variants of the gs1 candidates. Fewer pipeline stages or shorter
    token tiles free shared memory (the x1 RoPE kernel holds 102 KB at 3 stages, so two
    programs per SM), and more programs per SM give the scheduler more warps to switch
    between; ``benchmarks/kernel_resources.py`` shows registers and shared memory of each."""
    out = []
    if rope:
        grid = [("per-head x1", 1, 64, 4, 2), ("per-head x1", 1, 32, 4, 3), ("per-head x1", 1, 32, 4, 2),
                ("per-head x1", 1, 64, 8, 2), ("rebuild", 0, 64, 4, 2), ("rebuild", 0, 32, 4, 3)]
        if bits:
            grid += [("per-head x2", 2, 64, 4, 2), ("per-head x2", 2, 32, 4, 3)]
    else:
        grid = [("per-head x4", 4, 64, 4, 2), ("per-head x4", 4, 64, 8, 3), ("per-head x4", 4, 128, 4, 3),
                ("per-head x4", 4, 128, 8, 3), ("per-head x8", 8, 64, 4, 3), ("per-head x2", 2, 64, 4, 3)]
        if bits:  # fewer registers per head once the word-wise dequantization freed the ALU
            grid += [("per-head x2", 2, 64, 4, 2), ("per-head x8", 8, 64, 4, 2), ("per-head x8", 8, 64, 8, 2)]
    for name, h, bs, w, st in grid:
        for ppsm in (4, 8, 16):
            out.append((f"{name} {bs}/{w}w/{st}s/{ppsm}p",
                        KernelConfig(block_s=bs, num_warps=w, num_stages=st, programs_per_sm=ppsm, group_heads=h)))
    if rope and not bits:  # the fp16 default's split count: one wave without a merge pass, or two
        for ppsm in (1, 2, 4, 16):
            out.append((f"per-head x1 64/4w/3s/{ppsm}p",
                        KernelConfig(block_s=64, num_warps=4, num_stages=3, programs_per_sm=ppsm, group_heads=1)))
    return out


def model_args_diag(run, args, label, cfg=None):
    """Time ``cfg`` on the arguments a compiled Hugging Face model passes (an additive mask
    ``[B, 1, 1, S]``; cos/sin per sequence ``[B, S, D]``, fp16 or fp32) next to the
    benchmark's (no mask, one ``[1, S, D]`` table), and one table row for every slot
    (stride 0). Computing cos/sin in the kernel from positions and ``inv_freq`` instead of
    reading tables was tried and measured 4.2 ms against 0.99 (RESULTS.md, issue 3)."""
    q, hk, hv, lk, kb, cos, sin, knw, mask, *rest = args
    B, S = hk.shape[:2]
    D = cos.shape[-1]
    add_mask = torch.zeros(B, 1, 1, S, device=DEV, dtype=DT)
    variants = {"benchmark args": args,
                "+ additive mask": (q, hk, hv, lk, kb, cos, sin, knw, add_mask, *rest)}
    for dt in (DT, torch.float32):
        c, sn = (t.expand(B, S, t.shape[-1]).to(dt).contiguous() for t in (cos, sin))
        variants[f"+ mask, per-sequence {str(dt).split('.')[-1]} tables"] = (q, hk, hv, lk, kb, c, sn, knw, add_mask,
                                                                            *rest)
    c1, s1 = (t[:, :1].expand(B, S, D) for t in (cos, sin))
    variants["+ mask, one table row (stride 0)"] = (q, hk, hv, lk, kb, c1, s1, knw, add_mask, *rest)
    runs = [(name, a, cfg) for name, a in variants.items()]
    if cfg is not None:
        runs.append(("+ mask read in the loop (no prefetch)", variants["+ additive mask"],
                     dataclasses.replace(cfg, prefetch=False)))
    times = []
    for name, a, c in runs:
        try:
            times.append(f"{name} {gpu_time(run, [(a, c)], max_iters=15):.3f}")
        except Exception as e:  # noqa: BLE001
            times.append(f"{name} failed ({type(e).__name__}: {str(e)[:200]})")
    print(f"  diag in-model args {label}: " + ", ".join(times) + " ms", flush=True)


# ------------------------------------------------------------------ table
def held() -> str:
    """What the GPU still holds between rows (B=32 x 128k 4-bit rows ran out of memory with
    121 GiB allocated; each row's inputs should be gone by then): allocated GiB, and after a
    garbage collection if that frees any (a reference cycle keeping tensors alive)."""
    if DEV != "cuda":
        return ""
    before = torch.cuda.memory_allocated()
    gc.collect()
    after = torch.cuda.memory_allocated()
    return f"  [held {before / 2**30:.1f} GiB" + (f", {after / 2**30:.1f} after gc]" if after < before else "]")


def table(shapes, batches, contexts, ceilings, best, deadline, group_sizes=(1, 2, 4), bit_widths=(0,)):
    """Rows per (shape, batch, context, group size, mode); ``bit_widths``: 0 = fp16 latents,
    2/3/4 = packed latents (the quantized op)."""
    bw, mm = ceilings
    rows, naive_jobs = [], []
    total_mem = torch.cuda.get_device_properties(0).total_memory if DEV == "cuda" else 1 << 40
    for sname, (Hq, Hkv, D) in shapes.items():
        for B in batches:
            for S in contexts:
                full_bytes = 2 * B * Hkv * S * D * 2
                if full_bytes + latent_bytes(Hkv, D, 4, B, S) > 0.85 * total_mem:
                    print(f"  skip {sname} B={B} S={S}: does not fit")
                    continue
                if time.time() > deadline:
                    print(f"  table: out of time at {sname} B={B} S={S}")
                    return naive_column(rows, naive_jobs)
                t_sdpa, sdpa_name = sdpa_time(Hq, Hkv, D, B, S)
                print(f"  SDPA {sname} B={B} S={S}: {t_sdpa:.3f} ms ({sdpa_name}){held()}", flush=True)
                tables = rope_tables(S, D)
                for gs in group_sizes:
                    for rope, bits in [(r, b) for b in bit_widths for r in (True, False)]:
                        lb = latent_bytes(Hkv, D, gs, B, S, bits)
                        run, ref = (run_ours_quant, quant_latent_attention_ref) if bits else (run_ours,
                                                                                            latent_attention_ref)

                        def case():
                            a = latent_case(Hq, Hkv, D, gs, B, S, rope, tables, with_lv=True)
                            return quantized(a, bits) if bits else a

                        sets, t_ours, timed, best_cfg = [], float("nan"), [], None
                        for label, cfg in row_candidates(best.get((sname, gs, rope)), rope, gs, Hq, Hkv, bits):
                            try:
                                sets = sets or [case() for _ in range(n_sets(lb))]
                                t = gpu_time(run, [(a, cfg) for a in sets])
                                timed.append(f"{label} {t:.3f}")
                                if not t_ours <= t:  # first or faster
                                    t_ours, best_cfg = t, cfg
                            except Exception as e:  # noqa: BLE001 - report the row, keep going
                                print(f"  {sname} B={B} S={S} gs{gs} rope={rope} bits={bits} {label}: "
                                      f"{type(e).__name__} {str(e)[:300]}")
                        if len(timed) > 1:
                            print(f"  {sname} B={B} S={S} gs{gs} rope={rope} bits={bits} ms: {', '.join(timed)}")
                        if rope and not bits and B >= 8 and sets and not DEFAULTS_ONLY:
                            model_args_diag(run, sets[0], f"{sname} B={B} S={S} gs{gs}", best_cfg)
                            if gs == 1:  # the group kernel, what choose_config picks for fp16
                                model_args_diag(run, sets[0], f"{sname} B={B} S={S} gs{gs} group kernel",
                                                KernelConfig(block_s=64, num_warps=4, num_stages=3,
                                                             programs_per_sm=8))
                        if sets and naive_fits(Hq, Hkv, D, gs, B, S) and not NO_NAIVE:
                            naive_jobs.append((len(rows), ref, (Hq, Hkv, D, gs, B, S, rope, bits)))
                        del sets
                        f_bytes = lb / bw * 1e3
                        f_flops = recon_flops(Hkv, D, gs, B, S, rope) / mm * 1e3
                        mode = ("RoPE" if rope else "absorbed") + (f" q{bits}" if bits else "")
                        rows.append([sname, B, f"{S // 1024}k", gs, mode,
                                     t_ours, t_sdpa, float("nan"), t_sdpa / t_ours, f_bytes, f_flops,
                                     max(f_bytes, f_flops) / t_ours])
                        print("  " + " ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in rows[-1])
                              + held(), flush=True)
                if DEV == "cuda":
                    torch.cuda.empty_cache()
    return naive_column(rows, naive_jobs)


def naive_column(rows, jobs):
    """Time the naive reference of each row (column 7) after every kernel row: a kernel timed
    within half a second of it ran slower (absorbed, B=8 x 32k: 0.549 ms, then 0.479 a moment
    later; the GPU's clocks after 30 ms calls of fp32 work, by all signs)."""
    for i, ref, (Hq, Hkv, D, gs, B, S, rope, bits) in jobs:
        try:
            a = latent_case(Hq, Hkv, D, gs, B, S, rope, with_lv=True)
            rows[i][7] = eager_time(ref, quantized(a, bits) if bits else a)
        except torch.OutOfMemoryError:
            pass
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return rows


def main():
    from attention_checks import correctness, quant_correctness  # (they import this module)
    from attention_sweep import sweep
    from prefill_table import PREFILL_HEADS, prefill_table

    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes (code-path check)")
    ap.add_argument("--no-sweep", action="store_true", help="use the built-in config heuristic only")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop adding rows after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", help="comma list of shape names or aliases (llama2/mha, gqa); default all")
    ap.add_argument("--batch", type=int, nargs="+", help="batch sizes of the table (default 1 8 32)")
    ap.add_argument("--ctx", nargs="+", help="contexts of the table, e.g. 4k 32k 128k (default those three)")
    ap.add_argument("--gs", type=int, nargs="+", default=[1, 2, 4], help="group sizes of the table")
    ap.add_argument("--quant-bits", type=int, nargs="*", default=[],
                    help="add quantized rows (packed latents) at these bit widths, e.g. 4 2")
    ap.add_argument("--quant-only", action="store_true", help="table rows for the quantized cache only")
    ap.add_argument("--check", action="store_true",
                    help="check the quantized kernels against the reference first; exit 1 if any case fails")
    ap.add_argument("--check-only", action="store_true", help="checks only (implies --check), no timing")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill table")
    ap.add_argument("--prefill-only", action="store_true", help="only the prefill table")
    ap.add_argument("--wide", action="store_true", help="also time the occupancy variants of the gs1 candidates")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive PyTorch column (its temporaries)")
    ap.add_argument("--defaults-only", action="store_true",
                    help="time only the config the library picks (no candidates, no in-model diag): the full table fast")
    ap.add_argument("--bf16", action="store_true", help="bf16 queries, latents and SDPA cache (default fp16)")
    ap.add_argument("--prefetch-ab", action="store_true",
                    help="also time the packed-cache candidates with the per-tile vectors loaded in the loop")
    a = ap.parse_args()
    t0 = time.time()
    deadline = t0 + a.budget_s
    if SMOKE:
        shapes = {"4q/4kv d32": (4, 4, 32), "8q/4kv d32": (8, 4, 32)}
        batches, contexts, sw_b, sw_s, pre_s = (1, 2), (1024, 2048), 2, 1024, (1024,)
    else:
        shapes, batches, contexts, sw_b, sw_s, pre_s = SHAPES, (1, 8, 32), (4096, 32768, 131072), 8, 32768, (4096, 16384)
    if a.shapes:
        names = [SHAPE_ALIASES.get(n.strip(), n.strip()) for n in a.shapes.split(",")]
        unknown = [n for n in names if n not in shapes]
        if unknown:
            ap.error(f"unknown shapes {unknown}: choose from {list(shapes)} or {list(SHAPE_ALIASES)}")
        shapes = {n: shapes[n] for n in names}
    batches = tuple(a.batch or batches)
    if a.ctx:
        contexts = tuple(int(c[:-1]) * 1024 if c.lower().endswith("k") else int(c) for c in a.ctx)
    bit_widths = tuple(([] if a.quant_only else [0]) + list(a.quant_bits))
    if not bit_widths:
        ap.error("--quant-only needs --quant-bits")
    dev_name = torch.cuda.get_device_name(0) if DEV == "cuda" else "CPU (Triton interpreter)"

    header = (f"{dev_name}, torch {torch.__version__}, triton {triton.__version__}, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(header, flush=True)
    if a.prefill_only:
        prows = prefill_table(shapes, pre_s, deadline)
        print(tabulate(prows, PREFILL_HEADS, floatfmt=".3f", tablefmt="github"), flush=True)
        return
    quant_ok = True
    if a.check or a.check_only:
        quant_ok = quant_correctness(shapes)
        print(f"[{time.time() - t0:.0f}s]", flush=True)
        if a.check_only:
            ok = correctness(shapes) if 0 in bit_widths else True
            sys.exit(0 if quant_ok and ok else 1)
    ok = correctness(shapes) if 0 in bit_widths else True
    bw, mm, bws = measure_ceilings()
    probes = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in bws.items())
    print(f"ceilings: copy {bw / 1e12:.2f} TB/s ({probes}), fp16 matmul {mm / 1e12:.0f} TFLOP/s  "
          f"[{time.time() - t0:.0f}s]", flush=True)
    best = {}
    if not a.no_sweep and 0 in bit_widths:
        best = sweep(shapes, sw_b, sw_s, t0 + 0.45 * a.budget_s)
        print(f"sweep done [{time.time() - t0:.0f}s]", flush=True)
    rows = table(shapes, batches, contexts, (bw, mm), best, deadline, tuple(a.gs), bit_widths)
    print(f"table done [{time.time() - t0:.0f}s]", flush=True)
    prows = [] if a.no_prefill else prefill_table(shapes, pre_s, deadline + 60)
    heads = ["shape", "B", "ctx", "gs", "mode", "ours ms", "SDPA ms", "naive ms", "x SDPA", "bytes floor ms",
             "FLOPs floor ms", "efficiency"]
    text = [header, f"copy {bw / 1e12:.2f} TB/s ({probes}), fp16 matmul {mm / 1e12:.0f} TFLOP/s, "
                    f"rank ratio {RANK_RATIO}",
            tabulate(rows, heads, floatfmt=".3f", tablefmt="github")]
    if prows:
        text += ["", "prefill (B=1, causal, RoPE): ours = the op (keys rebuilt; values latent, or rebuilt where "
                 "the value rank passes the head dim; then SDPA); keys / values ms = the rebuild kernel alone; "
                 "SDPA full = the faster of flash and cuDNN",
                 tabulate(prows, PREFILL_HEADS, floatfmt=".3f", tablefmt="github")]
    if best:
        text += ["", "tuned configs: " + "; ".join(f"{k}: {v}" for k, v in best.items())]
    text.append(f"correctness: {'all ok' if ok else 'FAILURES (see log)'}")
    if a.check:
        text.append(f"quantized-cache correctness: {'all ok' if quant_ok else 'FAILURES (see log)'}")
    report = "\n".join(text)
    print(report)
    if a.out and os.path.isdir(a.out):
        with open(os.path.join(a.out, "attention_table.md"), "w") as f:
            f.write(report + "\n")
    if not (ok and quant_ok):
        sys.exit("FAILED: kernel output differs from the reference (see the check lines above)")


if __name__ == "__main__":
    main()
