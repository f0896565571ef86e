"""The prefill table of ``attention.py`` (``--prefill-only``, or after the decode table)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from attention import DEV, DT, gpu_time, latent_case, rope_tables
from palu_fx.kernels.latent_attention.prefill import rebuild_values
from palu_fx.kernels.latent_attention.wrapper import latent_attention_triton


def prefill_table(shapes, S_list, deadline):
    """Causal prefill (B=1): the op as the pass calls it (keys rebuilt, values latent or, where
    the value rank passes the head dim, rebuilt with ``lv``; then SDPA) against SDPA on full
    keys/values, the faster of its flash and cuDNN backends. The block columns add the key and
    value projections from the hidden states: to the latents for ours, to full K/V for SDPA.

    Both sides see what a model passes and does: a query of [B, S, H, D] memory (``q_proj``'s
    output viewed per head and transposed), and the output's heads flattened for ``o_proj``
    (``transpose(1, 2).reshape``: a view of [B, S, H, D] memory, else a copy). "before" is the
    op as it was until 2026-11-29, a contiguous result: its ``.contiguous()`` and the copy of
    the flattening, as ``flat(out.contiguous())`` times them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from palu_fx.kernels.latent_attention import wrapper as W

    def full_sdpa(q, k, v, gqa):
        best = float("inf")
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            def call(backend=backend):
                with sdpa_kernel([backend]):
                    return flat(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa))
            try:
                best = min(best, gpu_time(call, [()]))
            except RuntimeError as e:  # a backend without this call on this torch
                print(f"  sdpa {backend.name}: {str(e).splitlines()[0]}")
        return best

    def flat(out):  # the heads side by side for o_proj, as a model's attention does
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    rows = []
    for sname, (Hq, Hkv, D) in shapes.items():
        for S in S_list:
            if time.time() > deadline:
                return rows
            q = torch.randn(1, S, Hq, D, device=DEV, dtype=DT).transpose(1, 2)
            k = torch.randn(1, Hkv, S, D, device=DEV, dtype=DT)
            v = torch.randn(1, Hkv, S, D, device=DEV, dtype=DT)
            t_full = full_sdpa(q, k, v, Hq != Hkv) if DEV == "cuda" else \
                gpu_time(lambda: flat(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hq != Hkv)),
                         [()])
            del k, v
            # the block: keys and values projected from the hidden states, then attention (the
            # full model's RoPE on the keys is left out, in its favour)
            x = torch.randn(1, S, Hq * D, device=DEV, dtype=DT)
            wk, wv = (torch.randn(Hkv * D, Hq * D, device=DEV, dtype=DT) / (Hq * D) ** 0.5 for _ in range(2))

            def full_block():
                kk = F.linear(x, wk).view(1, S, Hkv, D).transpose(1, 2)
                vv = F.linear(x, wv).view(1, S, Hkv, D).transpose(1, 2)
                return flat(F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=Hq != Hkv))
            t_full_block = gpu_time(full_block, [()])
            tables = rope_tables(S, D)
            for gs in (1, 2, 4):
                args = list(latent_case(Hq, Hkv, D, gs, 1, S, True, tables, with_lv=True))
                args[0], args[11] = q, True
                t_ours = gpu_time(lambda: flat(latent_attention_triton(*args)), [()])
                t_before = gpu_time(lambda: flat(latent_attention_triton(*args).contiguous()), [()])
                hk, hv, lk, cos, sin = args[1], args[2], args[3], args[5], args[6]
                lv = args[14] if len(args) > 14 else None
                p = W._parts(q, lk, None, cos, sin, None, 1, 1, S, DEV == "cpu", DT)
                rv = hk.shape[-1] // lk.shape[0]
                width = W.prefill_key_width(q, D if lv is not None else rv, None, True, Hq != Hkv, DT)
                t_keys = gpu_time(lambda: W.rebuild_keys(hk, lk, None, cos, sin, None, 1e-6, p, width, DT), [()])
                t_vals = float("nan")
                if lv is not None:
                    t_vals = gpu_time(lambda: rebuild_values(hv, lv, lk.shape[0]), [()])
                rk_w, rv_w = (torch.randn(hk.shape[-1], Hq * D, device=DEV, dtype=DT) / (Hq * D) ** 0.5
                              for _ in range(2))

                def palu_block():
                    a = list(args)
                    a[1], a[2] = F.linear(x, rk_w), F.linear(x, rv_w)
                    return flat(latent_attention_triton(*a))
                t_block = gpu_time(palu_block, [()])
                rows.append([sname, f"{S // 1024}k", gs, rv, "rebuilt" if lv is not None else "latent", t_ours,
                             t_keys, t_vals, t_full, t_ours / t_full - 1, t_before / t_full - 1, t_block,
                             t_full_block, t_block / t_full_block - 1])
                print("  " + " ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in rows[-1]), flush=True)
    return rows


PREFILL_HEADS = ["shape", "ctx", "gs", "rank v", "values", "ours ms", "keys ms", "values ms", "SDPA full ms",
                 "overhead", "before", "block ours ms", "block full ms", "block overhead"]
