"""Latent-attention decode benchmark (issue 3): our Triton kernels vs SDPA on the full cache.

    PYTHONPATH=. python benchmarks/attention.py            # H200: check, tune, table
    PYTHONPATH=. python benchmarks/attention.py --smoke    # CPU: interpreter, tiny shapes

One table row per (attention shape, batch, context, group size, RoPE or not) at rank ratio
0.5. Columns: our time; SDPA (flash backend) on the full fp16 cache; the naive PyTorch
latent reference; speedup vs SDPA; the bytes floor (latent bytes / copy bandwidth); the
FLOPs floor (key-reconstruction FLOPs / matmul rate), both ceilings measured in the same
run; efficiency = max(floors) / ours.

Timing: the op runs inside a CUDA graph (one call per input set, several sets rotated so
small cases do not sit in L2), median of replays with CUDA events: GPU time, no Python
launch overhead, as a graph-captured decode step would see it.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from tabulate import tabulate  # noqa: E402

from palu_fx.kernels.latent_attention.naive import latent_attention_ref  # noqa: E402
from palu_fx.kernels.latent_attention.wrapper import KernelConfig, latent_attention_triton  # noqa: E402

# (query heads, KV heads, head dim): the MHA and GQA attention shapes of the issue
SHAPES = {"32q/32kv d128": (32, 32, 128), "32q/8kv d128": (32, 8, 128)}
RANK_RATIO = 0.5
DEV = "cpu" if SMOKE else "cuda"
DT = torch.float32 if SMOKE else torch.float16
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


def latent_case(Hq, Hkv, D, gs, B, S, rope, tables=None, mask=False):
    """Positional op args at rank ratio 0.5 (rope: reconstruct mode, else absorbed)."""
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
        return (q, hk, hv, lk, None, cos, sin, None, m, D ** -0.5, 0.0, False, 1, 1e-6)
    q = torch.randn(B, Hq, 1, r, device=DEV, dtype=DT)
    return (q, hk, hv, None, None, None, None, None, m, r ** -0.5, 0.0, False, 0, 1e-6)


def latent_bytes(Hkv, D, gs, B, S):
    return B * S * (Hkv // gs) * 2 * int(RANK_RATIO * gs * D) * 2


def recon_flops(Hkv, D, gs, B, S, rope):
    return 2 * B * S * Hkv * D * int(RANK_RATIO * gs * D) if rope else 0


# ------------------------------------------------------------------ runners
def run_ours(args, cfg=None):
    return latent_attention_triton(*args, config=cfg)


def sdpa_time(Hq, Hkv, D, B, S):
    """Best of SDPA's flash backend on the full fp16 cache over the variants below: native
    GQA or query heads folded into the query length (exact for one decode token), cache in
    [B, H, S, D] or [B, S, H, D] memory. Returns (ms, name of the fastest)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kv_bytes = 2 * B * Hkv * S * D * 2
    backends = [SDPBackend.FLASH_ATTENTION] if DEV == "cuda" else [SDPBackend.MATH]

    def native(q, k, v):
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)

    def folded(q, k, v):
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q.view(B, Hkv, Hq // Hkv, D), k, v)

    best, name = float("inf"), "-"
    for layout in ("BHSD", "BSHD"):
        def kv():
            t = torch.randn(B, Hkv, S, D, device=DEV, dtype=DT) if layout == "BHSD" else \
                torch.randn(B, S, Hkv, D, device=DEV, dtype=DT).transpose(1, 2)
            return t
        sets = [(torch.randn(B, Hq, 1, D, device=DEV, dtype=DT), kv(), kv()) for _ in range(n_sets(kv_bytes))]
        for fn in ([native, folded] if Hq != Hkv else [native]):
            try:
                t = gpu_time(fn, sets)
                if t < best:
                    best, name = t, f"{fn.__name__}/{layout}"
            except RuntimeError as e:  # e.g. a backend without GQA on this torch
                print(f"  sdpa variant {fn.__name__}/{layout} failed: {str(e).splitlines()[0]}")
        del sets
    return best, name


def naive_fits(Hq, Hkv, D, gs, B, S):
    # fp32 keys (several temporaries), repeated keys and values per query head
    est = 4 * B * S * (6 * Hkv * D + Hq * D + 2 * Hq * int(RANK_RATIO * gs * D))
    return est < 40e9 and B * S <= 8 * 32768


def check_case(name, args, tol):
    out = latent_attention_triton(*args)
    up = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    ref = latent_attention_ref(*up)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    ok = bool(torch.isfinite(out).all()) and err < tol
    print(f"  check {name:<42} rel-RMS {err:.2e} {'ok' if ok else 'FAIL'}")
    return ok


def correctness(shapes):
    """GPU kernels vs the float64 reference on ragged lengths, masks and the odd paths."""
    print("correctness (fp16 unless noted):")
    ok = True
    S = 67 if SMOKE else 4099
    for sname, (Hq, Hkv, D) in shapes.items():
        for gs in (1, 2, 4):
            for rope in (True, False):
                args = latent_case(Hq, Hkv, D, gs, 2, S, rope, mask=True)
                ok &= check_case(f"{sname} gs{gs} {'rope' if rope else 'absorbed'} masked", args, 5e-3)
    Hq, Hkv, D = next(iter(shapes.values()))
    args = list(latent_case(Hq, Hkv, D, 2, 2, S, True))
    args[4] = torch.randn(Hkv * D, device=DEV, dtype=DT)           # key bias
    args[7] = torch.rand(D, device=DEV, dtype=DT) + 0.5            # k-norm
    args[5], args[6] = rope_tables(S, D // 2, interleaved=True)    # partial rotary
    args[12] = 2                                                    # interleaved
    ok &= check_case("partial interleaved rope + bias + k-norm", args, 5e-3)
    q = torch.randn(2, Hq, 33, D, device=DEV, dtype=DT)
    args = list(latent_case(Hq, Hkv, D, 2, 2, S, True))
    args[0], args[10] = q, 30.0
    ok &= check_case("33 queries, softcap (fused, query tiles)", args, 5e-3)
    args = list(latent_case(Hq, Hkv, D, 4, 1, 1030, True))
    args[0] = torch.randn(1, Hq, 1030, D, device=DEV, dtype=DT)
    args[11] = True
    ok &= check_case("prefill 1030 tokens causal gs4 (rebuild + SDPA)", args, 5e-3)
    args = [a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a
            for a in latent_case(Hq, Hkv, D, 2, 2, S, True)]
    ok &= check_case("bf16 gs2 rope", args, 2.5e-2)
    return ok


# ------------------------------------------------------------------ tuning sweep
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


# ------------------------------------------------------------------ table
def table(shapes, batches, contexts, ceilings, best, deadline):
    bw, mm = ceilings
    rows = []
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
                    return rows
                t_sdpa, sdpa_name = sdpa_time(Hq, Hkv, D, B, S)
                print(f"  SDPA {sname} B={B} S={S}: {t_sdpa:.3f} ms ({sdpa_name})", flush=True)
                tables = rope_tables(S, D)
                for gs in (1, 2, 4):
                    for rope in (True, False):
                        lb = latent_bytes(Hkv, D, gs, B, S)
                        cfg = best.get((sname, gs, rope))
                        sets = [(latent_case(Hq, Hkv, D, gs, B, S, rope, tables), cfg) for _ in range(n_sets(lb))]
                        try:
                            t_ours = gpu_time(run_ours, sets)
                        except Exception as e:  # noqa: BLE001 - report the row, keep going
                            print(f"  {sname} B={B} S={S} gs{gs} rope={rope}: {type(e).__name__} {str(e)[:300]}")
                            t_ours = float("nan")
                        t_naive = float("nan")
                        if naive_fits(Hq, Hkv, D, gs, B, S):
                            try:
                                t_naive = eager_time(latent_attention_ref, sets[0][0])
                            except torch.OutOfMemoryError:
                                pass
                        del sets
                        f_bytes = lb / bw * 1e3
                        f_flops = recon_flops(Hkv, D, gs, B, S, rope) / mm * 1e3
                        rows.append([sname, B, f"{S // 1024}k", gs, "RoPE" if rope else "absorbed",
                                     t_ours, t_sdpa, t_naive, t_sdpa / t_ours, f_bytes, f_flops,
                                     max(f_bytes, f_flops) / t_ours])
                        print("  " + " ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in rows[-1]),
                              flush=True)
                if DEV == "cuda":
                    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ prefill
def prefill_table(shapes, S_list, deadline):
    """Causal prefill (B=1): rebuild keys + SDPA vs SDPA on full keys/values."""
    from palu_fx.kernels.latent_attention import wrapper as W

    rows = []
    for sname, (Hq, Hkv, D) in shapes.items():
        for S in S_list:
            if time.time() > deadline:
                return rows
            q = torch.randn(1, Hq, S, D, device=DEV, dtype=DT)
            k = torch.randn(1, Hkv, S, D, device=DEV, dtype=DT)
            v = torch.randn(1, Hkv, S, D, device=DEV, dtype=DT)
            t_full = gpu_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                     enable_gqa=Hq != Hkv), [()])
            tables = rope_tables(S, D)
            for gs in (1, 2, 4):
                args = list(latent_case(Hq, Hkv, D, gs, 1, S, True, tables))
                args[0], args[11] = q, True
                t_ours = gpu_time(lambda: latent_attention_triton(*args), [()])
                hk, lk, cos, sin = args[1], args[3], args[5], args[6]
                p = W._parts(q, lk, None, cos, sin, None, 1, 1, S, DEV == "cpu", DT)
                rv = hk.shape[-1] // lk.shape[0]
                t_keys = gpu_time(lambda: W.rebuild_keys(hk, lk, None, cos, sin, None, 1e-6, p, max(D, rv), DT,
                                                         DEV == "cpu"), [()])
                rows.append([sname, f"{S // 1024}k", gs, rv, t_ours, t_keys, t_full, t_ours / t_full - 1])
                print("  " + " ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes (code-path check)")
    ap.add_argument("--no-sweep", action="store_true", help="use the built-in config heuristic only")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop adding rows after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    t0 = time.time()
    deadline = t0 + a.budget_s
    if SMOKE:
        shapes = {"4q/4kv d32": (4, 4, 32), "8q/4kv d32": (8, 4, 32)}
        batches, contexts, sw_b, sw_s, pre_s = (1, 2), (1024, 2048), 2, 1024, (1024,)
    else:
        shapes, batches, contexts, sw_b, sw_s, pre_s = SHAPES, (1, 8, 32), (4096, 32768, 131072), 8, 32768, (4096, 16384)
    dev_name = torch.cuda.get_device_name(0) if DEV == "cuda" else "CPU (Triton interpreter)"

    header = (f"{dev_name}, torch {torch.__version__}, triton {triton.__version__}, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(header, flush=True)
    ok = correctness(shapes)
    bw, mm, bws = measure_ceilings()
    probes = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in bws.items())
    print(f"ceilings: copy {bw / 1e12:.2f} TB/s ({probes}), fp16 matmul {mm / 1e12:.0f} TFLOP/s  "
          f"[{time.time() - t0:.0f}s]", flush=True)
    best = {}
    if not a.no_sweep:
        best = sweep(shapes, sw_b, sw_s, t0 + 0.45 * a.budget_s)
        print(f"sweep done [{time.time() - t0:.0f}s]", flush=True)
    rows = table(shapes, batches, contexts, (bw, mm), best, deadline)
    print(f"table done [{time.time() - t0:.0f}s]", flush=True)
    prows = prefill_table(shapes, pre_s, deadline + 60)
    heads = ["shape", "B", "ctx", "gs", "mode", "ours ms", "SDPA ms", "naive ms", "x SDPA", "bytes floor ms",
             "FLOPs floor ms", "efficiency"]
    text = [header, f"copy {bw / 1e12:.2f} TB/s ({probes}), fp16 matmul {mm / 1e12:.0f} TFLOP/s, "
                    f"rank ratio {RANK_RATIO}",
            tabulate(rows, heads, floatfmt=".3f", tablefmt="github"), "",
            "prefill (B=1, causal, RoPE): ours = rebuild keys + SDPA; keys = the rebuild kernel alone",
            tabulate(prows, ["shape", "ctx", "gs", "rank v", "ours ms", "keys ms", "SDPA full ms", "overhead"],
                     floatfmt=".3f", tablefmt="github")]
    if best:
        text += ["", "tuned configs: " + "; ".join(f"{k}: {v}" for k, v in best.items())]
    text.append(f"correctness: {'all ok' if ok else 'FAILURES (see log)'}")
    report = "\n".join(text)
    print(report)
    if a.out and os.path.isdir(a.out):
        with open(os.path.join(a.out, "attention_table.md"), "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
