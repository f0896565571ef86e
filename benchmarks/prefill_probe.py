"""Where the prefill overhead goes, and which SDPA backends take a value head dim below the
query's (B=1, causal, Llama-2-7B shape, rank ratio 0.5, gs1: value rank 64 < head dim 128).

    PYTHONPATH=. python benchmarks/prefill_probe.py [--ctx 4096 16384]

Times: SDPA on full K/V (the baseline), palu's prefill path (key rebuild + SDPA on latent
values zero-padded to the head dim), its parts, and SDPA per backend with 64-wide values
(no padding) or with an overlapping 128-wide view of the latents (each head's 64 channels
followed by the next head's; the extra output columns are dropped).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from attention import gpu_time, latent_case  # noqa: E402

from palu_fx.kernels.latent_attention import wrapper as W  # noqa: E402
from palu_fx.kernels.latent_attention.prefill import sdpa_latent  # noqa: E402


def gs2_breakdown(S: int) -> None:
    """Where the gs2 prefill time goes with 32 KV heads (value rank 128 = head dim: SDPA on the
    rebuilt keys and the group's latent values copied per KV head), per SDPA backend."""
    dev, dt, H, D = "cuda", torch.float16, 32, 128
    q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=dt) for _ in range(3))
    args = list(latent_case(H, H, D, 2, 1, S, True))
    args[0], args[11] = q, True
    hk, hv, lk, cos, sin = args[1], args[2], args[3], args[5], args[6]
    p = W._parts(q, lk, None, cos, sin, None, 1, 1, S, False, dt)
    keys = W.rebuild_keys(hk, lk, None, cos, sin, None, 1e-6, p, D, dt)
    vals = hv.view(1, S, H // 2, D).transpose(1, 2).repeat_interleave(2, dim=1)
    parts = {
        "ours (op)": gpu_time(lambda: W.latent_attention_triton(*args), [()]),
        "keys": gpu_time(lambda: W.rebuild_keys(hk, lk, None, cos, sin, None, 1e-6, p, D, dt), [()]),
        "values per KV head (repeat_interleave)": gpu_time(
            lambda: hv.view(1, S, H // 2, D).transpose(1, 2).repeat_interleave(2, dim=1), [()]),
    }
    for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        with sdpa_kernel([be]):
            parts[f"SDPA full, {be.name}"] = gpu_time(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [()])
            parts[f"SDPA on rebuilt keys, {be.name}"] = gpu_time(
                lambda: F.scaled_dot_product_attention(q, keys, vals, is_causal=True), [()])
    print(f"gs2, 32 KV heads, S={S}: " + "; ".join(f"{n} {t:.3f} ms" for n, t in parts.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--gs2", action="store_true", help="only the gs2 breakdown (32 KV heads)")
    a = ap.parse_args()
    if a.gs2:
        for S in a.ctx:
            gs2_breakdown(S)
        return
    dev, dt, H, D, r = "cuda", torch.float16, 32, 128, 64
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for S in a.ctx:
        q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=dt) for _ in range(3))
        base = gpu_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [()])
        args = list(latent_case(H, H, D, 1, 1, S, True))
        args[0], args[11] = q, True
        ours = gpu_time(lambda: W.latent_attention_triton(*args), [()])
        hk, hv, lk, cos, sin = args[1], args[2], args[3], args[5], args[6]
        p = W._parts(q, lk, None, cos, sin, None, 1, 1, S, False, dt)
        keys = W.rebuild_keys(hk, lk, None, cos, sin, None, 1e-6, p, D, dt)
        t_keys = gpu_time(lambda: W.rebuild_keys(hk, lk, None, cos, sin, None, 1e-6, p, D, dt), [()])
        t_sdpa_lat = gpu_time(lambda: sdpa_latent(q, keys, hv, H, None, None, True), [()])
        vals64 = hv.view(1, S, H, r).transpose(1, 2)
        t_pad = gpu_time(lambda: F.pad(vals64, (0, D - r)), [()])
        ref = sdpa_latent(q, keys, hv, H, None, None, True)
        print(f"S={S}: SDPA full {base:.3f} ms | palu prefill {ours:.3f} (+{ours / base - 1:.0%}) = keys "
              f"{t_keys:.3f} + sdpa_latent {t_sdpa_lat:.3f} (value pad alone {t_pad:.3f})", flush=True)
        # an overlapping 128-wide view of the latents: room for the last head's extra columns
        slack = torch.empty(1, S, H * r + r, device=dev, dtype=dt)
        slack[..., :H * r] = hv
        over = slack.as_strided((1, H, S, D), (S * (H * r + r), r, H * r + r, 1))
        for name, vv in (("64-wide values", vals64), ("overlapping 128-wide view", over)):
            for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                try:
                    with sdpa_kernel([be]):
                        out = F.scaled_dot_product_attention(q, keys, vv, is_causal=True)[..., :r]
                        t = gpu_time(lambda: F.scaled_dot_product_attention(q, keys, vv, is_causal=True), [()])
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    print(f"  {name:<26} {be.name:<20} {t:.3f} ms  rel err {err:.1e}", flush=True)
                except RuntimeError as e:
                    print(f"  {name:<26} {be.name:<20} refused: {str(e).splitlines()[0][:90]}", flush=True)
        del q, k, v, args, keys, slack, over
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
