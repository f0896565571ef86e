"""Hadamard-type rotations: orthonormality, exact folding into factors and plans, and why."""
import pytest
import torch

from palu_fx import PaluConfig
from palu_fx.compress.hadamard import (
    hadamard_matrix,
    paley_hadamard,
    rotate_factors,
    rotate_plan,
    rotation_matrix,
    rotation_name,
    sylvester_hadamard,
)
from palu_fx.plan import CompressionPlan, MatrixFactors, SitePlan
from palu_fx.quant import dequantize, quantize

RANKS = [16, 32, 48, 64, 96, 128, 192]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("r", RANKS, ids=[f"r{r}" for r in RANKS])
def test_rotation_is_orthonormal_hadamard_for_kernel_ranks(r):
    h = rotation_matrix(r)
    eye = torch.eye(r, dtype=torch.float64)
    torch.testing.assert_close(h @ h.T, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(h.T @ h, eye, rtol=0, atol=1e-12)
    # a true Hadamard matrix: every entry ±1/sqrt(r) (maximal spreading), no random fallback
    torch.testing.assert_close(h.abs(), torch.full_like(h, r**-0.5), rtol=0, atol=1e-12)
    assert "random" not in rotation_name(r)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 60, 80, 104, 112, 144, 240, 336])
def test_hadamard_matrix_property(n):
    h = hadamard_matrix(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_constructions_and_their_limits():
    assert paley_hadamard(12) is not None and paley_hadamard(28) is not None  # Paley I (q=11), II (q=13)
    assert paley_hadamard(16) is None and paley_hadamard(10) is None
    assert sylvester_hadamard(8).shape == (8, 8)
    with pytest.raises(ValueError, match="power of two"):
        sylvester_hadamard(12)
    assert rotation_name(64) == "sylvester(64)" and rotation_name(48) == "sylvester(4)⊗paley(12)"


@pytest.mark.parametrize("r", [3, 10, 100])
def test_fallback_is_orthonormal_and_seeded(r):
    h = rotation_matrix(r, seed=3)
    assert hadamard_matrix(r) is None and "random_orthogonal" in rotation_name(r)
    torch.testing.assert_close(h @ h.T, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(h, rotation_matrix(r, seed=3)) and not torch.equal(h, rotation_matrix(r, seed=4))


def test_rotation_matrix_returns_a_copy():
    h = rotation_matrix(16)
    h.zero_()
    assert rotation_matrix(16).abs().min() > 0
    assert rotation_matrix(16, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="positive integer"):
        rotation_matrix(0)


def test_rotate_factors_moves_the_latent_and_keeps_the_product():
    L = torch.randn(3, 128, 48, generator=gen(0), dtype=torch.float64)
    R = torch.randn(3, 48, 96, generator=gen(1), dtype=torch.float64)
    L2, R2 = rotate_factors(L, R)
    torch.testing.assert_close(L2 @ R2, L @ R, rtol=1e-12, atol=1e-12)
    x = torch.randn(5, 96, generator=gen(2), dtype=torch.float64)
    h = x @ R[1].T
    torch.testing.assert_close(x @ R2[1].T, h @ rotation_matrix(48), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="rank"):
        rotate_factors(L, R[:, :32])


def random_plan(**cfg) -> CompressionPlan:
    """Two sites with Sylvester (32, 64), Sylvester⊗Paley (48) and Paley-only (20) ranks."""
    def mf(G, gsD, r, d, seed, bias=False):
        g = gen(seed)
        b = torch.randn(G * gsD, generator=g) if bias else None
        return MatrixFactors(torch.randn(G, gsD, r, generator=g), torch.randn(G, r, d, generator=g) / d**0.5, b)

    sites = [SitePlan(2, mf(2, 128, 64, 96, 0, bias=True), mf(2, 128, 48, 96, 1), (8, 4, 64, 64, 96)),
             SitePlan(1, mf(3, 64, 20, 96, 2), mf(3, 64, 32, 96, 3, bias=True), (6, 3, 64, 64, 96))]
    return CompressionPlan(PaluConfig(**cfg), sites, {"calibration_tokens": 10})


def test_rotate_plan_is_exact_and_leaves_the_input_alone(tmp_path):
    plan = random_plan(rank_ratio=0.5, bits=3)
    before = [(s.key.L.clone(), s.key.R.clone(), s.value.L.clone(), s.value.R.clone()) for s in plan.sites]
    rotated = rotate_plan(plan)
    assert rotated.config.hadamard and not plan.config.hadamard and rotated.config.bits == 3
    assert rotated.meta["calibration_tokens"] == 10 and "hadamard" not in plan.meta
    for s, s2, saved in zip(plan.sites, rotated.sites, before):
        assert all(torch.equal(a, b) for a, b in zip((s.key.L, s.key.R, s.value.L, s.value.R), saved))
        for m, m2 in ((s.key, s2.key), (s.value, s2.value)):
            p, p2 = m.L.double() @ m.R.double(), m2.L.double() @ m2.R.double()
            assert float((p2 - p).norm() / p.norm()) < 1e-6
            assert m2.L.dtype == m.L.dtype and m2.L.shape == m.L.shape and m2.R.shape == m.R.shape
            assert m2.bias is m.bias
            assert not torch.allclose(m2.R, m.R)  # the latent really moved
    # idempotent: the pass may rotate whenever config.hadamard is set, even a loaded plan
    path = tmp_path / "plan.pt"
    rotated.save(str(path))
    loaded = CompressionPlan.load(str(path))
    again = rotate_plan(loaded)
    assert torch.equal(again.sites[0].key.R, rotated.sites[0].key.R)
    assert again.meta["hadamard"]["rotations"] == {"20": "sylvester(1)⊗paley(20)", "32": "sylvester(32)",
                                                   "48": "sylvester(4)⊗paley(12)", "64": "sylvester(64)"}


def svd_like_latents(n: int, r: int, seed: int) -> torch.Tensor:
    """Latents ``[n, r]`` shaped like plain-SVD latents: energy decaying over the channels and
    a large common component in the first one (the mean direction of the activations)."""
    g = gen(seed)
    std = 8.0 * torch.exp(-torch.arange(r) / 8.0)
    h = torch.randn(n, r, generator=g) * std
    h[:, 0] += 20.0
    return h


def quant_error(h: torch.Tensor, bits: int, rotate: bool) -> float:
    H = rotation_matrix(h.shape[-1], dtype=h.dtype)
    x = h @ H if rotate else h
    xhat = dequantize(quantize(x, bits))
    xhat = xhat @ H.T if rotate else xhat
    return float((xhat - h).norm() / h.norm())


@pytest.mark.parametrize("r", [48, 64, 96])
def test_rotation_cuts_quantization_error_of_svd_latents(r):
    h = svd_like_latents(2048, r, seed=r)
    for bits in (4, 3, 2):
        plain, rotated = quant_error(h, bits, False), quant_error(h, bits, True)
        # measured ratios 0.19-0.29: the spike's range is spread over all channels
        assert rotated < 0.35 * plain, (bits, plain, rotated)


def test_rotation_does_not_help_flat_latents():
    # counter-example: whitened latents (equal-energy, uncorrelated channels) have nothing to spread
    h = torch.randn(2048, 64, generator=gen(7))
    for bits in (4, 3, 2):
        plain, rotated = quant_error(h, bits, False), quant_error(h, bits, True)
        assert 0.9 < rotated / plain < 1.1
