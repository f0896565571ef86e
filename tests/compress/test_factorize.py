"""Per-group plain / whitened SVD: exactness at full rank, optimality, numerics, errors."""
import pytest
import torch

from palu_fx.compress.factorize import (
    decompose,
    factorize,
    reconstruction_error,
    singular_values,
    whitening_factor,
)


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Activations with a steep, rotated spectrum (like real hidden states): ``[n, d]``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -3, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ (q * scales) .T


def product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return torch.bmm(left.double(), right.double()).reshape(-1, right.shape[-1])


GROUPINGS = [
    pytest.param(3, 64, id="M-LRD-G3-D64"),
    pytest.param(1, 192, id="J-LRD-G1-D192"),
    pytest.param(2, 32, id="G-LRD-G2-D32"),
]


@pytest.mark.parametrize("whitened", [False, True], ids=["svd", "whitened"])
@pytest.mark.parametrize("groups,gsd", GROUPINGS)
def test_full_rank_reproduces_weight(groups, gsd, whitened):
    d_in = 96
    w = torch.randn(groups * gsd, d_in, generator=torch.Generator().manual_seed(1))
    gram = None
    if whitened:
        x = correlated_inputs(512, d_in)
        gram = x.T @ x
    rank = gsd  # nominal full rank; exceeds d_in for J-LRD (192 > 96): padded with zeros
    left, right = factorize(w, groups, rank, gram=gram)
    assert left.shape == (groups, gsd, rank) and right.shape == (groups, rank, d_in)
    assert left.dtype == torch.float32 and right.dtype == torch.float32
    err = (product(left, right) - w.double()).abs().max().item()
    assert err < 1e-5 * w.abs().max().item()


def test_whitened_beats_plain_on_activation_error_and_loses_on_weight_error():
    d_in, rows = 128, 64
    w = torch.randn(rows, d_in, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = correlated_inputs(2048, d_in, seed=3)
    gram = x.T @ x
    plain = factorize(w, 1, 16)
    white = factorize(w, 1, 16, gram=gram)
    act_plain = reconstruction_error(w, *plain, gram)
    act_white = reconstruction_error(w, *white, gram)
    assert act_white < 0.5 * act_plain  # correlated inputs: whitening matters a lot
    # Counter-example: on the weight itself plain SVD is optimal (Eckart-Young).
    assert reconstruction_error(w, *plain) < reconstruction_error(w, *white)


def test_whitened_error_matches_discarded_singular_values():
    d_in = 80
    w = torch.randn(2 * 48, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = correlated_inputs(1024, d_in, seed=5)
    gram = x.T @ x
    s = singular_values(w, 2, gram)
    assert s.shape == (2, 48)
    for rank in (1, 12, 30):
        left, right = factorize(w, 2, rank, gram=gram)
        predicted = (s[:, rank:].pow(2).sum() / s.pow(2).sum()).sqrt().item()
        assert reconstruction_error(w, left, right, gram) == pytest.approx(predicted, rel=1e-6)


def test_isotropic_gram_gives_plain_svd():
    w = torch.randn(64, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    gram = 7.0 * torch.eye(40, dtype=torch.float64)
    plain = product(*factorize(w, 2, 10))
    white = product(*factorize(w, 2, 10, gram=gram))
    assert torch.allclose(plain, white, atol=1e-10)


def test_whitened_latents_are_isotropic_on_calibration_data():
    # Singular values live in L: the cached latent x @ Rᵀ has identity covariance (times
    # the token count), the best case for per-token quantization.
    d_in = 64
    w = torch.randn(3 * 32, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x = correlated_inputs(1000, d_in, seed=8)
    gram = x.T @ x
    _, right = factorize(w.float(), 3, 20, gram=gram)
    cov = right.double() @ gram @ right.double().transpose(1, 2)
    assert torch.allclose(cov, torch.eye(20, dtype=torch.float64).expand(3, 20, 20), atol=1e-4)


def test_sqrt_split_has_same_product():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(9))
    dec = decompose(w, 2)
    a = product(*dec.truncate(12, "left"))
    b = product(*dec.truncate(12, "sqrt"))
    assert torch.allclose(a, b, atol=1e-5)


def test_singular_gram_gets_a_shift_and_stays_exact():
    d_in = 64
    x = correlated_inputs(16, d_in)  # 16 tokens < 64 features: XᵀX is rank 16
    x[:, 5] = 0.0  # and a dead feature
    gram = x.T @ x
    chol, shift = whitening_factor(gram)
    assert shift > 0
    assert torch.isfinite(chol).all()
    w = torch.randn(32, d_in, generator=torch.Generator().manual_seed(10))
    left, right = factorize(w, 1, 32, gram=gram)
    assert (product(left, right) - w.double()).abs().max().item() < 1e-4
    # A well-conditioned gram needs no shift.
    x = correlated_inputs(512, d_in)
    assert whitening_factor(x.T @ x)[1] == 0.0


def test_low_precision_weights_come_back_float32():
    w = torch.randn(32, 16).to(torch.bfloat16)
    left, right = factorize(w, 2, 16)
    assert left.dtype == right.dtype == torch.float32
    assert (product(left, right) - w.double()).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        pytest.param(dict(num_groups=5, rank=4), "divide", id="groups-not-dividing"),
        pytest.param(dict(num_groups=2, rank=0), "rank", id="rank-zero"),
        pytest.param(dict(num_groups=2, rank=17), "rank", id="rank-above-group-rows"),
        pytest.param(dict(num_groups=2, rank=4, gram=torch.eye(8)), "gram", id="gram-shape"),
        pytest.param(dict(num_groups=2, rank=4, gram=torch.full((12, 12), float("nan"))), "nan", id="gram-nan"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        factorize(torch.randn(32, 12), **kwargs)


def kfac_problem(rows: int = 48, d_in: int = 64, seed: int = 11):
    """Weight, input Gram and an anisotropic output-gradient Gram (few sensitive outputs)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, d_in, generator=gen, dtype=torch.float64)
    x = correlated_inputs(2048, d_in, seed=seed + 1)
    q, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=torch.float64))
    g = torch.randn(2048, rows, generator=gen, dtype=torch.float64) @ (q * torch.logspace(0, -2, rows, dtype=torch.float64)).T
    return w, x.T @ x, g.T @ g


def fisher_error(w, left, right, gram, grad_gram) -> float:
    """Kronecker-Fisher loss proxy tr(G E A Eᵀ) of the approximation error E."""
    err = w - product(left, right)
    return float(torch.einsum("ab,bc,dc,ad->", err, gram, err, grad_gram))


@pytest.mark.parametrize("groups", [1, 3], ids=["J-LRD", "M-LRD"])
def test_kfac_full_rank_is_exact_and_latents_isotropic(groups):
    w, gram, grad_gram = kfac_problem()
    gsd = w.shape[0] // groups
    left, right = factorize(w, groups, gsd, gram, grad_gram=grad_gram)
    assert (product(left, right) - w).abs().max().item() < 1e-6 * w.abs().max().item()
    # R is Vᵀ S⁻¹ as for the whitened method: same latent geometry for the cache.
    _, right = factorize(w, groups, 8, gram, grad_gram=grad_gram)
    cov = right.double() @ gram @ right.double().transpose(1, 2)
    assert torch.allclose(cov, torch.eye(8, dtype=torch.float64).expand(groups, 8, 8), atol=1e-4)


def test_kfac_beats_whitened_on_fisher_error_and_loses_on_output_error():
    w, gram, grad_gram = kfac_problem()
    white = factorize(w, 1, 12, gram)
    kfac = factorize(w, 1, 12, gram, grad_gram=grad_gram, grad_damp=0.0)
    assert fisher_error(w, *kfac, gram, grad_gram) < 0.5 * fisher_error(w, *white, gram, grad_gram)
    # Counter-example: on unweighted output error the whitened SVD is optimal.
    assert reconstruction_error(w, *white, gram) < reconstruction_error(w, *kfac, gram)


def test_kfac_singular_values_measure_fisher_error():
    w, gram, grad_gram = kfac_problem()
    s = singular_values(w, 1, gram, grad_gram=grad_gram, grad_damp=0.0)
    left, right = factorize(w, 1, 20, gram, grad_gram=grad_gram, grad_damp=0.0)
    assert fisher_error(w, left, right, gram, grad_gram) == pytest.approx(float(s[:, 20:].pow(2).sum()), rel=1e-6)


def test_isotropic_gradients_reduce_kfac_to_whitened():
    w, gram, _ = kfac_problem()
    iso = 3.0 * torch.eye(w.shape[0], dtype=torch.float64)
    white = product(*factorize(w, 2, 10, gram))
    kfac = product(*factorize(w, 2, 10, gram, grad_gram=iso))
    assert torch.allclose(white, kfac, atol=1e-8)
    # A zero gradient Gram (no signal at all) degrades to the whitened factors too.
    zero = product(*factorize(w, 2, 10, gram, grad_gram=torch.zeros_like(iso)))
    assert torch.allclose(white, zero, atol=1e-6)


def test_output_sensitivity_is_gradient_energy_per_direction():
    w, gram, grad_gram = kfac_problem()
    dec = decompose(w, 2, gram)
    sens = dec.output_sensitivity(grad_gram)
    assert sens.shape == (2, 24)
    u0 = dec.u[0, :, 0]
    assert float(sens[0, 0]) == pytest.approx(float(u0 @ grad_gram[:24, :24] @ u0))


def test_kfac_argument_errors():
    w, gram, grad_gram = kfac_problem()
    with pytest.raises(ValueError, match="needs gram"):
        factorize(w, 1, 8, grad_gram=grad_gram)
    with pytest.raises(ValueError, match="grad_gram"):
        factorize(w, 1, 8, gram, grad_gram=grad_gram[:10, :10])
