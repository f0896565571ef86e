"""The prefill path's choice between unpadded latent values (cuDNN) and padded ones.

``prefill.sdpa_latent`` asks SDPA's cuDNN backend for values whose width is the latent rank
(not the head dim); where it refuses a kind of call, it pads and remembers the refusal. The
choice is pure PyTorch, so it is tested on the CPU with SDPA stubbed to refuse or accept.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import palu_fx.kernels.latent_attention.prefill as pf


def _case(rv=16, D=32, B=2, G=4, S=24):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, G, S, D, generator=g, dtype=torch.float64)
    keys = torch.randn(B, G, S, D, generator=g, dtype=torch.float64)
    hv = torch.randn(B, S, G * rv, generator=g, dtype=torch.float64)
    ref = torch.softmax(q @ keys.transpose(-1, -2) * D ** -0.5 + torch.full((S, S), float("-inf")).triu(1), -1)
    return q, keys, hv, ref @ hv.view(B, S, G, rv).transpose(1, 2)


@pytest.fixture
def sdpa_log(monkeypatch):
    """Pretend the query is on a device with cuDNN; record the value widths SDPA gets."""
    log = {"widths": [], "refuse": True}
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, **kw):
        log["widths"].append(v.shape[-1])
        if v.shape[-1] != q.shape[-1] and log["refuse"]:
            raise RuntimeError("No available kernel. Aborting execution.")
        with sdpa_kernel([SDPBackend.MATH]):  # the CPU's kernel, inside the caller's cuDNN-only scope
            if v.shape[-1] != q.shape[-1]:  # what cuDNN computes: the same math at the value's width
                return real(q, k, F.pad(v, (0, q.shape[-1] - v.shape[-1])), **kw)[..., :v.shape[-1]]
            return real(q, k, v, **kw)

    monkeypatch.setattr(pf.F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(pf, "_has_cudnn_sdpa", lambda q: True)
    monkeypatch.setattr(pf, "_UNPADDED", {})
    return log


def test_refused_unpadded_values_are_padded_and_remembered(sdpa_log):
    q, keys, hv, ref = _case()
    out = pf.sdpa_latent(q, keys, hv, 4, None, None, True)
    torch.testing.assert_close(out, ref)
    assert sdpa_log["widths"] == [16, 32]  # tried unpadded, then padded to the head dim
    assert list(pf._UNPADDED.values()) == [False]
    assert not pf.unpadded_values(q, 16, None, True, False)  # the wrapper then rebuilds padded keys
    out = pf.sdpa_latent(q, keys, hv, 4, None, None, True)
    torch.testing.assert_close(out, ref)
    assert sdpa_log["widths"] == [16, 32, 32]  # no second attempt for the same kind of call
    assert pf.unpadded_values(q, 16, None, False, False)  # another kind (not causal) is tried


def test_accepted_unpadded_values_skip_the_pad(sdpa_log):
    sdpa_log["refuse"] = False
    q, keys, hv, ref = _case()
    torch.testing.assert_close(pf.sdpa_latent(q, keys, hv, 4, None, None, True), ref)
    assert sdpa_log["widths"] == [16] and list(pf._UNPADDED.values()) == [True]


def test_values_as_wide_as_the_head_dim_never_try(sdpa_log):
    q, keys, hv, ref = _case(rv=32)
    torch.testing.assert_close(pf.sdpa_latent(q, keys, hv, 4, None, None, True), ref)
    assert sdpa_log["widths"] == [32] and not pf._UNPADDED


@pytest.mark.parametrize("gs,rank", [(2, 128), (4, 128)])
def test_key_kernel_copying_values_compiles_for_sm90_without_spills(gs, rank):
    # the value tile is held over the key products: at 64-token tiles it fits the registers
    # (128-token tiles copy in a second launch: gs4 at rank 256 spilled 216 bytes)
    pytest.importorskip("triton.backends.nvidia")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from kernel_resources import compile_sm90, resources

    from palu_fx.kernels.latent_attention import wrapper as W

    H, D, S = 32, 128, 256  # the Llama-2-7B shape's specialization
    G = H // gs
    hk, hv = (torch.randn(1, S, G * rank, dtype=torch.float16) for _ in range(2))
    lk = torch.randn(G, gs * D, rank, dtype=torch.float16)
    ang = torch.arange(S)[:, None] * 0.01 * torch.arange(D // 2)[None]
    cos, sin = (torch.cat([f(ang), f(ang)], -1)[None].half() for f in (torch.cos, torch.sin))
    q = torch.randn(1, H, S, D, dtype=torch.float16)
    p = W._parts(q, lk, None, cos, sin, None, 1, 1, S, False, torch.float16)
    kern, _, args, consts = pf.rebuild_keys(hk, lk, None, p["cos"], p["sin"], None, 1e-6, p, D, torch.float16,
                                            probe=True, values=hv)
    assert consts["COPY_V"] and consts["BLOCK_S"] == 64
    res = resources(compile_sm90(kern, args, consts))
    assert res["stack"] == 0 and res["regs"] <= 255, res
