"""Orthonormal rotations of the latent space, folded offline into the low-rank factors.

Why rotate: a per-token quantizer shares one scale (and zero) across a group of latent
channels, so the largest channel of the group sets the step for all of them. SVD latents
concentrate energy in their first channels (and real activations add per-token outlier
channels), which crushes the weak channels to one or two codes. An orthonormal ``H``
applied to the latent (``h' = h @ H``) changes nothing at full precision, because it is
folded into both factors (``W = L·R = (L·H)(Hᵀ·R)``), but a Hadamard ``H`` mixes every
channel into every other with weights ``±1/sqrt(r)``: a spike in one channel becomes a flat
``±spike/sqrt(r)`` pattern, the per-token range shrinks, and so does the quantization step.
No run-time cost: the cache stores ``x @ (HᵀR)ᵀ`` directly and keys are rebuilt with
``L·H``, so no kernel ever applies ``H``.

Which matrix for a latent size ``r`` (:func:`rotation_matrix`):

1. ``r = 2^a``: Walsh-Hadamard by Sylvester's doubling ``H_2n = [[H, H], [H, -H]]``.
2. ``r = 2^a · m`` with a Hadamard matrix of order ``n = m · 2^b`` (``b <= a``) known from
   Paley's constructions over a prime field ``GF(q)``: ``n = q + 1`` for ``q ≡ 3 (mod 4)``
   (Paley I, e.g. 12 = 11+1, 20 = 19+1) or ``n = 2(q + 1)`` for ``q ≡ 1 (mod 4)`` (Paley II,
   e.g. 28 = 2·14, 36 = 2·18): ``H_r = Sylvester(2^(a-b)) ⊗ Paley(n)``. The Kronecker product
   of Hadamard matrices is Hadamard, so every entry is still ``±1/sqrt(r)``. This covers
   the ranks the kernels like (multiples of 16): 48 = 4·12, 80 = 4·20, 96 = 8·12,
   112 = 4·28, 144 = 4·36, 160 = 8·20, 176 = 4·44, 192 = 16·12, 208 = 2·104, 240 = 4·60 ...
   Only prime fields are used, so no finite-field arithmetic beyond ``mod q`` is needed.
3. Otherwise (no Hadamard matrix exists when ``r`` is not 1, 2 or a multiple of 4, or none
   of the constructions above applies): ``Sylvester(2^a) ⊗ Q_m`` with ``Q_m`` a seeded random
   orthogonal matrix (QR of a Gaussian, signs fixed so it is Haar-distributed). Its entries
   are ``O(sqrt(log m / m))`` rather than exactly ``1/sqrt(m)``: the spreading is a little
   weaker but still removes channel outliers with high probability, and it is exactly
   orthonormal, which is all the folding needs. The seed makes plans reproducible.

Everything is built in float64 and returned normalized (``H Hᵀ = I``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

__all__ = [
    "rotation_matrix",
    "rotation_name",
    "hadamard_matrix",
    "sylvester_hadamard",
    "paley_hadamard",
    "rotate_factors",
    "rotate_plan",
]

# Plans remember that they were rotated: rotating twice would be exact but would change the
# basis again (and a symmetric Sylvester matrix is its own inverse: rotating twice undoes it).
PLAN_META_KEY = "hadamard"


def sylvester_hadamard(n: int) -> torch.Tensor:
    """``±1`` Walsh-Hadamard matrix ``[n, n]`` (float64) for ``n`` a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j - i)`` with ``χ`` the quadratic character of the prime field ``GF(q)``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def paley_hadamard(n: int) -> Optional[torch.Tensor]:
    """``±1`` Hadamard matrix of order ``n`` from Paley I/II over a prime field, or ``None``.

    Paley I (``n = q + 1``, ``q`` prime, ``q ≡ 3 mod 4``): with the skew conference matrix
    ``C = [[0, 1ᵀ], [-1, Q]]``, ``H = I + C``. Paley II (``n = 2(q + 1)``, ``q ≡ 1 mod 4``):
    with the symmetric conference matrix ``C = [[0, 1ᵀ], [1, Q]]``,
    ``H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]``.
    """
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        conf = _conference(q, skew=True)
        return torch.eye(n, dtype=torch.float64) + conf
    if n % 2 == 0:
        q = n // 2 - 1
        if _is_prime(q) and q % 4 == 1:
            conf = _conference(q, skew=False)
            a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            return torch.kron(conf, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def _conference(q: int, skew: bool) -> torch.Tensor:
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = -1.0 if skew else 1.0
    c[1:, 1:] = _jacobsthal(q)
    return c


def _power_of_two_part(r: int) -> tuple[int, int]:
    """``(a, m)`` with ``r = 2^a · m`` and ``m`` odd."""
    if r < 1:
        raise ValueError(f"order must be positive, got {r}")
    a = 0
    while r % 2 == 0:
        r //= 2
        a += 1
    return a, r


@functools.lru_cache(maxsize=None)
def _hadamard_plan(r: int) -> Optional[tuple[int, int]]:
    """``(sylvester_order, paley_order)`` whose Kronecker product is Hadamard of order ``r``."""
    a, m = _power_of_two_part(r)
    if m == 1:
        return r, 1
    for b in range(a + 1):  # smallest Paley factor first: cheapest to build
        n = m * 2**b
        if paley_hadamard(n) is not None:
            return 2 ** (a - b), n
    return None


def hadamard_matrix(r: int) -> Optional[torch.Tensor]:
    """``±1`` Hadamard matrix ``[r, r]`` (float64) by Sylvester ⊗ Paley, or ``None`` if the
    constructions of this module do not reach order ``r``."""
    if r < 1:
        raise ValueError(f"order must be positive, got {r}")
    plan = _hadamard_plan(r)
    if plan is None:
        return None
    syl, pal = plan
    h = sylvester_hadamard(syl)
    return h if pal == 1 else torch.kron(h, paley_hadamard(pal))


def _random_orthogonal(m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, rr = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    # QR's sign convention biases the distribution; fixing the signs of diag(R) makes Q Haar
    signs = torch.sign(torch.diagonal(rr))
    signs[signs == 0] = 1.0
    return (q * signs[None, :]).contiguous()


def rotation_name(r: int) -> str:
    """How :func:`rotation_matrix` builds order ``r`` (for reports): e.g. ``'sylvester(4)⊗paley(12)'``."""
    plan = _hadamard_plan(r)
    if plan is None:
        a, m = _power_of_two_part(r)
        return f"sylvester({2**a})⊗random_orthogonal({m})"
    syl, pal = plan
    return f"sylvester({syl})" if pal == 1 else f"sylvester({syl})⊗paley({pal})"


@functools.lru_cache(maxsize=64)
def _rotation_cached(r: int, seed: int) -> torch.Tensor:
    h = hadamard_matrix(r)
    if h is None:
        a, m = _power_of_two_part(r)
        return torch.kron(sylvester_hadamard(2**a) / 2 ** (a / 2), _random_orthogonal(m, seed))
    return h / r**0.5


def rotation_matrix(
    r: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None, seed: int = 0
) -> torch.Tensor:
    """Orthonormal ``[r, r]`` rotation for a latent of ``r`` channels (``H Hᵀ = I``).

    A normalized Hadamard matrix when the module's constructions reach ``r`` (see the module
    docstring), else ``Sylvester ⊗`` a random orthogonal factor drawn from ``seed``.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"rotation order must be a positive integer, got {r!r}")
    # a copy: callers own the result and may modify it; the cache must stay intact
    return _rotation_cached(r, seed).to(dtype=dtype, device=device, copy=True)


def rotate_factors(
    L: torch.Tensor, R: torch.Tensor, H: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L @ H, Hᵀ @ R)`` for every group: the latent becomes ``h @ H``, products are unchanged.

    Shapes: ``L [G, gs*D, r]`` (or ``[gs*D, r]``), ``R [G, r, d_in]`` (or ``[r, d_in]``),
    ``H [r, r]`` orthonormal (default :func:`rotation_matrix` of ``r``). Computed in float64
    and returned in the factors' dtypes: exact up to one rounding to that dtype.
    """
    r = L.shape[-1]
    if R.shape[-2] != r:
        raise ValueError(f"L has rank {r} but R has {R.shape[-2]} rows: shapes {tuple(L.shape)}, {tuple(R.shape)}")
    h = rotation_matrix(r, device=L.device) if H is None else H.to(device=L.device, dtype=torch.float64)
    if h.shape != (r, r):
        raise ValueError(f"rotation must be [{r}, {r}], got {tuple(h.shape)}")
    left = (L.to(torch.float64) @ h).to(L.dtype)
    right = (h.T @ R.to(torch.float64)).to(R.dtype)
    return left.contiguous(), right.contiguous()


def rotate_plan(plan, seed: int = 0):
    """A new ``CompressionPlan`` whose K and V factors are rotated (input plan untouched).

    Every site's key and value factors get ``rotation_matrix(rank, seed=seed)``; biases are
    shared unchanged (a rotation of the latent does not move the projection's output). The
    result's config has ``hadamard=True`` and ``meta['hadamard']`` records the construction
    per rank. Idempotent: a plan that is already rotated comes back as a new plan sharing
    its (unchanged) factors, so the pass may call this whenever ``config.hadamard`` is set,
    for fresh or loaded plans.
    """
    from palu_fx.plan import CompressionPlan, MatrixFactors, SitePlan

    meta = dict(plan.meta)
    config = dataclasses.replace(plan.config, hadamard=True)
    if meta.get(PLAN_META_KEY):
        sites = [dataclasses.replace(s) for s in plan.sites]
        return CompressionPlan(config, sites, meta)

    def rot(m: MatrixFactors) -> MatrixFactors:
        h = rotation_matrix(m.rank, device=m.L.device, seed=seed)
        return MatrixFactors(*rotate_factors(m.L, m.R, h), m.bias)

    sites = [SitePlan(s.group_size, rot(s.key), rot(s.value), tuple(s.shape)) for s in plan.sites]
    ranks = sorted({m.rank for s in plan.sites for m in (s.key, s.value)})
    meta[PLAN_META_KEY] = {"seed": seed, "rotations": {str(r): rotation_name(r) for r in ranks}}
    return CompressionPlan(config, sites, meta)
