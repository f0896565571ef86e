"""Candidates for the 4k prefill parts that keep 32-KV-head rows over the 15% target (B=1,
causal, Llama-2-7B shape, rank ratio 0.5): the gs2 copy of each group's latent values per KV
head, the gs4 value rebuild (``lv``), the key rebuild, and SDPA on [B, S, H, D] memory.

    PYTHONPATH=. python benchmarks/prefill_parts_probe.py [--ctx 4096 16384]
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/prefill_parts_probe.py --smoke --ctx 200

Each candidate is checked against the current path's output before it is timed.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from attention import DEV, DT, gpu_time, latent_case, rope_tables  # noqa: E402

from palu_fx.kernels.latent_attention import prefill as P  # noqa: E402
from palu_fx.kernels.latent_attention import wrapper as W  # noqa: E402

H, D = 32, 128
CPU = DEV == "cpu"  # the interpreter runs the kernels


def _same(name, got, want):
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    if err > 2e-3:
        raise SystemExit(f"{name}: rel err {err:.2e} against the current path")


def copy_candidates(S: int) -> dict:
    """gs2: hv [1, S, 16 x 128] -> one copy per KV head."""
    G, rv, rep = H // 2, D, 2
    hv = torch.randn(1, S, G * rv, device=DEV, dtype=DT)
    want = P.replicate_values(hv, G, H)
    out = {"copy: current kernel (BHSD, 32 tokens, 4 warps)": gpu_time(lambda: P.replicate_values(hv, G, H), [()])}
    for bs, nw in ((64, 4), (128, 4), (128, 8), (256, 8)):
        for layout, v in (("BHSD", torch.empty(1, H, S, rv, device=DEV, dtype=DT)),
                          ("BSHD", torch.empty(1, S, H, rv, device=DEV, dtype=DT).transpose(1, 2))):
            def call(bs=bs, nw=nw, v=v):
                P.replicate_values_kernel[(triton.cdiv(S, bs), G)](
                    hv, v, hv.stride(0), hv.stride(1), v.stride(0), v.stride(1), v.stride(2), G, S, rv,
                    REP=rep, R_P=rv, BLOCK_S=bs, num_warps=nw)
                return v
            _same(f"copy {layout} {bs}/{nw}", call(), want)
            out[f"copy: kernel {layout}, {bs} tokens, {nw} warps"] = gpu_time(call, [()])
    dst = torch.empty(1, S, G, rep, rv, device=DEV, dtype=DT)

    def expand_copy():
        dst.copy_(hv.view(1, S, G, 1, rv).expand(1, S, G, rep, rv))
        return dst.view(1, S, H, rv).transpose(1, 2)
    _same("expand copy", expand_copy(), want)
    out["copy: torch expand -> BSHD"] = gpu_time(expand_copy, [()])
    out["copy: bytes at 3.5 TB/s"] = 3 * hv.numel() * 2 / 3.5e9
    return out


def value_candidates(S: int) -> dict:
    """gs4 with lv: hv [1, S, 8 x 256] -> values [1, 32, S, 128] by ``rebuild_values`` (cuBLAS
    into [B, S, H, D] memory). Its first run (session 57, 2026-11-29) also timed the key-rebuild
    kernel on the values, then their path: 0.047 / 0.161 ms at 4k / 16k, against 0.027 / 0.076."""
    gs = 4
    args = latent_case(H, H, D, gs, 1, S, True, with_lv=True)
    hv, lk, lv = args[2], args[3], args[14]
    G, rv = lk.shape[0], lk.shape[-1]
    want = torch.einsum("bsgr,gjdr->bgjsd", hv.view(1, S, G, rv).float(), lv.view(G, gs, D, rv).float())
    want = want.reshape(1, H, S, D)
    _same("rebuild_values", P.rebuild_values(hv, lv, G), want)
    out = {"values: rebuild_values (cuBLAS -> BSHD)": gpu_time(lambda: P.rebuild_values(hv, lv, G), [()]),
           "values: bytes at 3.5 TB/s": (hv.numel() + H * S * D) * 2 / 3.5e9}
    q, hk, cos, sin = args[0], args[1], args[5], args[6]
    p = W._parts(q, lk, None, cos, sin, None, 1, 1, S, CPU, DT)

    def keys_fn():
        return W.rebuild_keys(hk, lk, None, cos, sin, None, 1e-6, p, D, DT)
    keys, vals = beside(keys_fn, hv, lv, G)
    _same("values beside the keys", vals, want)
    _same("keys beside the values", keys, keys_fn())
    out["keys, then values (one stream)"] = gpu_time(lambda: (keys_fn(), P.rebuild_values(hv, lv, G)), [()])
    out["keys and values (values on a side stream)"] = gpu_time(
        lambda: beside(keys_fn, hv, lv, G), [()])
    return out


_SIDE = {}


def beside(keys_fn, hv, lv, groups):
    """``keys_fn()`` with ``rebuild_values`` on a side stream (forked after the operands are
    allocated, joined before returning). Session 60 (2026-11-29): 0.064 ms against 0.070 in
    sequence at 4k, 0.228 against 0.232 at 16k; the op keeps them in sequence."""
    if CPU:
        return keys_fn(), P.rebuild_values(hv, lv, groups)
    main = torch.cuda.current_stream()
    side = _SIDE.setdefault("s", torch.cuda.Stream())
    B, S, _ = hv.shape
    Hkv, Dv, rv = lv.shape
    out = torch.empty(B, S, Hkv, Dv, dtype=hv.dtype, device=hv.device)
    lat = hv.reshape(B * S, groups, rv).transpose(0, 1)
    wts = lv.reshape(groups, Hkv // groups * Dv, rv).transpose(1, 2)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        torch.bmm(lat, wts, out=out.view(B * S, groups, -1).transpose(0, 1))
    keys = keys_fn()
    main.wait_stream(side)
    return keys, out.transpose(1, 2)


def key_candidates(S: int) -> dict:
    """Keys (RoPE): the current kernel, and a cuBLAS bmm before RoPE (its lower bound)."""
    out = {}
    tables = rope_tables(S, D)
    for gs in (1, 2, 4):
        args = latent_case(H, H, D, gs, 1, S, True, tables)
        q, hk, lk, cos, sin = args[0], args[1], args[3], args[5], args[6]
        G, rk = lk.shape[0], lk.shape[-1]
        p = W._parts(q, lk, None, cos, sin, None, 1, 1, S, CPU, DT)
        out[f"keys gs{gs}: current kernel"] = gpu_time(
            lambda: W.rebuild_keys(hk, lk, None, cos, sin, None, 1e-6, p, D, DT), [()])
        dst = torch.empty(1, S, H, D, device=DEV, dtype=DT)
        a, b, c = hk.view(S, G, rk).transpose(0, 1), lk.transpose(1, 2), dst.view(S, G, gs * D).transpose(0, 1)
        out[f"keys gs{gs}: cuBLAS bmm alone (no RoPE)"] = gpu_time(lambda: torch.bmm(a, b, out=c), [()])
        if gs == 2:  # the latent values copied per KV head: in the key kernel's launch, or after it
            hv, rk_args = args[2], (hk, lk, None, cos, sin, None, 1e-6, p, D, DT)
            _same("keys+values", W.rebuild_keys(*rk_args, values=hv)[1], P.replicate_values(hv, G, H))
            out["keys+values gs2: one launch"] = gpu_time(lambda: W.rebuild_keys(*rk_args, values=hv), [()])
            out["keys+values gs2: keys, then replicate_values"] = gpu_time(
                lambda: (W.rebuild_keys(*rk_args), P.replicate_values(hv, G, H)), [()])
    return out


def sdpa_layouts(S: int) -> dict:
    """SDPA (causal) with keys/values in [B, H, S, D] memory or [B, S, H, D] (a transposed view)."""
    if CPU:  # no flash or cuDNN backend to pick
        return {}
    q = torch.randn(1, H, S, D, device=DEV, dtype=DT)
    bhsd = [torch.randn(1, H, S, D, device=DEV, dtype=DT) for _ in range(2)]
    bshd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in bhsd]
    q_s = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = {}
    for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        for name, qq, (k, v) in (("q,k,v BHSD", q, bhsd), ("q BHSD, k,v BSHD", q, bshd), ("q,k,v BSHD", q_s, bshd)):
            with sdpa_kernel([be]):
                out[f"SDPA {be.name}: {name}"] = gpu_time(
                    lambda: F.scaled_dot_product_attention(qq, k, v, is_causal=True), [()])
    return out


def rebuild_sweep(S: int) -> dict:
    """The key-rebuild kernel's tile, warps and stages at gs 1/2/4 (RoPE). Its first run
    (session 58, 2026-11-29) also swept a program per head looping over tiles (then the gs4
    default, 0.059 / 0.236 ms at 4k / 16k) and the values of gs4."""
    out = {}
    tables = rope_tables(S, D)
    for gs in (1, 2, 4):
        args = latent_case(H, H, D, gs, 1, S, True, tables)
        q, hk, lk, cos, sin = args[0], args[1], args[3], args[5], args[6]
        p = W._parts(q, lk, None, cos, sin, None, 1, 1, S, CPU, DT)
        rk_args = (hk, lk, None, cos, sin, None, 1e-6, p, D, DT)
        want = W.rebuild_keys(*rk_args)
        kern, grid, kargs, consts = W.rebuild_keys(*rk_args, probe=True)
        out[f"keys gs{gs}: default ({consts['BLOCK_S']} tokens, {consts['num_warps']} warps)"] = gpu_time(
            lambda: W.rebuild_keys(*rk_args), [()])
        for bs in (32, 64, 128):
            for nw in (4, 8):
                for st in (1, 2, 3):
                    c = dict(consts, BLOCK_S=bs, num_warps=nw, num_stages=st)
                    keys = torch.empty_like(want)

                    def call(g=(triton.cdiv(S, bs), grid[1]), c=c, keys=keys):
                        kern[g](*kargs[:6], keys, *kargs[7:], **c)
                        return keys
                    try:
                        _same(f"keys gs{gs} {bs} {nw} {st}", call(), want)
                    except Exception as e:  # out of resources
                        print(f"  keys gs{gs} {bs}/{nw}/{st}: {str(e).splitlines()[0][:80]}", flush=True)
                        continue
                    out[f"keys gs{gs}: {bs} tok, {nw} w, {st} st"] = gpu_time(call, [()])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--smoke", action="store_true", help="on the CPU (interpreter), float32")
    ap.add_argument("--sweep", action="store_true", help="only the rebuild kernel's configurations")
    a = ap.parse_args()
    print(torch.cuda.get_device_name() if DEV == "cuda" else DEV, torch.__version__, triton.__version__, flush=True)
    for S in a.ctx:
        parts = (rebuild_sweep,) if a.sweep else (copy_candidates, value_candidates, key_candidates, sdpa_layouts)
        for part in parts:
            for name, t in part(S).items():
                print(f"S={S:>6} {name:<52} {t:.4f} ms", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
