"""Quantized-cache reference attention: dequantize-then-reference, and what quantization costs."""
import pytest
import torch

from palu_fx.kernels.latent_attention.naive import ROPE_HALF, ROPE_NONE, latent_attention_ref
from palu_fx.kernels.latent_attention.quant_naive import quant_latent_attention_ref
from palu_fx.quant import dequantize_packed, quantize_packed


def make_case(absorbed: bool, B=2, Hq=6, Hkv=3, gs=3, D=16, rk=32, rv=48, Sq=3, Skv=37, seed=0):
    """Positional args of ``latent_attention_ref`` (float32) for one random case."""
    g = torch.Generator().manual_seed(seed)
    G = Hkv // gs
    rnd = lambda *s: torch.randn(*s, generator=g)
    q = rnd(B, Hq, Sq, rk if absorbed else D)
    hk, hv = rnd(B, Skv, G * rk), rnd(B, Skv, G * rv)
    lk = None if absorbed else rnd(G, gs * D, rk) * rk**-0.5
    cos = sin = None
    if not absorbed:
        ang = torch.rand(1, Skv, D // 2, generator=g) * 6.3
        ang = torch.cat([ang, ang], -1)
        cos, sin = ang.cos(), ang.sin()
    mask = torch.rand(B, 1, Sq, Skv, generator=g) > 0.2
    scale = (rk if absorbed else D) ** -0.5
    return [q, hk, hv, lk, None, cos, sin, None, mask, scale], rk, rv


CASES = [pytest.param(False, id="rope"), pytest.param(True, id="absorbed")]


def quantized_args(args, rk, rv, k_bits, v_bits, k_group, v_group):
    q, hk, hv, *rest = args
    k = quantize_packed(hk, k_bits, k_group)
    v = quantize_packed(hv, v_bits, v_group)
    return [q, *k, *v, *rest[:7]], (k_bits, k_group, v_bits, v_group)


@pytest.mark.parametrize("absorbed", CASES)
@pytest.mark.parametrize("k_bits,v_bits,k_group,v_group", [(4, 4, 32, 48), (3, 2, 16, 16), (2, 3, 32, 24)])
def test_equals_reference_on_dequantized_latents(absorbed, k_bits, v_bits, k_group, v_group):
    args, rk, rv = make_case(absorbed)
    qargs, bits = quantized_args(args, rk, rv, k_bits, v_bits, k_group, v_group)
    rope = ROPE_NONE if absorbed else ROPE_HALF
    out = quant_latent_attention_ref(*qargs, *bits, rope_style=rope)
    hk = dequantize_packed(*qargs[1:4], k_bits, k_group)
    hv = dequantize_packed(*qargs[4:7], v_bits, v_group)
    ref = latent_attention_ref(args[0], hk, hv, *args[3:], rope_style=rope)
    assert out.shape == ref.shape == (2, 6, 3, rv) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("absorbed", CASES)
def test_error_against_full_precision_shrinks_with_bits(absorbed):
    args, rk, rv = make_case(absorbed, Skv=64, seed=1)
    rope = ROPE_NONE if absorbed else ROPE_HALF
    full = latent_attention_ref(*args, rope_style=rope)
    errs = []
    for bits in (2, 3, 4):
        qargs, b = quantized_args(args, rk, rv, bits, bits, None, None)
        out = quant_latent_attention_ref(*qargs, bits, rk, bits, rv, rope_style=rope)
        errs.append(float((out - full).norm() / full.norm()))
    # each bit roughly halves the step (and the error); 4 bits on Gaussian latents ~10%
    assert errs[0] > 1.8 * errs[1] > 1.8**2 * errs[2]
    assert errs[2] < 0.15


def test_float64_queries_dequantize_in_float64():
    args, rk, rv = make_case(True, seed=2)
    args = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    qargs, bits = quantized_args(args, rk, rv, 4, 4, None, None)
    out = quant_latent_attention_ref(*qargs, 4, rk, 4, rv)
    assert out.dtype == torch.float64
