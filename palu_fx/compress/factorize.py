"""Per-group low-rank factorization of a K or V projection weight: plain or whitened SVD.

A projection ``y = x @ Wᵀ`` with ``W [G*gsD, d_in]`` (rows ordered group-major: group g owns
rows ``g*gsD : (g+1)*gsD``) is replaced per group by ``W_g ≈ L_g @ R_g``, ``L_g [gsD, r]``,
``R_g [r, d_in]``. The cache stores the latent ``h = x @ R_gᵀ [.., r]`` and ``L_g`` rebuilds
keys/values (or is folded into the query / output projection).

Three methods:
- plain truncated SVD (``gram=None``): best approximation of ``W`` itself; data-free.
- whitened ("truncation-aware") SVD (``gram = XᵀX`` of the activations entering the
  projection): best approximation of the *outputs* ``X Wᵀ`` on those activations. With
  ``S`` the Cholesky factor (``gram = S Sᵀ``), ``||X(W - W_r)ᵀ||_F = ||(W - W_r) S||_F``, so
  the truncated SVD of ``W S`` is optimal; ``S`` is then removed from the right factor. The
  singular values of ``W S`` measure output energy, which is what rank allocation needs.
- Fisher-whitened ("kfac"; also ``grad_gram = Σ_t g_t g_tᵀ``, the loss gradient at the
  projection outputs): output errors are not all equally harmful (an error in a key
  direction the queries never probe costs nothing). Under a Kronecker-factored Fisher the
  loss increase is ``½ ||Tᵀ (W - W_r) S||²`` with ``T Tᵀ = grad_gram``, so the SVD of
  ``Tᵀ W S`` is optimal for it and its singular values are in loss units, directly
  comparable across layers and between K and V. On SmolLM2-135M at half the cache this
  took perplexity from 30.2 (whitened, J-LRD) to 25.6 (baseline 23.35), see
  ``benchmarks/accuracy_probe.py``.

Where the singular values go: entirely into ``L`` (``R = Vᵀ`` or ``Vᵀ S⁻¹``). Why:
- the latent is what gets cached and quantized. For the whitened method the latent
  channels ``x Vᵀ S⁻¹`` are then uncorrelated with equal energy on the calibration data, the
  best case for a per-token quantizer with one scale shared across channels (a channel
  scaled by ``σ_i`` would set the range and crush the weak ones; Palu's ``sqrt(σ)`` split
  leaves a ``sqrt(σ_1/σ_r)`` spread). For plain SVD ``R`` has orthonormal rows, so latents
  keep the magnitude of ``x`` and never overflow fp16 however large ``σ_1`` is.
- ``L`` is folded into other matmuls (query, output projection) or used once per key
  rebuild, where scale is harmless. ``split="sqrt"`` gives Palu's symmetric split if wanted.

Everything is computed in float64 (Cholesky and triangular solves of activation Grams are
badly conditioned in float32) and returned in the weight's dtype (float32 for low-precision
weights, so the caller chooses when to round).
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "Decomposition",
    "decompose",
    "factorize",
    "singular_values",
    "whitening_factor",
    "reconstruction_error",
    "DEFAULT_GRAD_DAMP",
]

Split = Literal["left", "sqrt"]

# Ridge added to each gradient Gram block, relative to its mean diagonal. Directions the
# calibration gradients never excited still cost something on other text; 0.003-0.03
# gave the same perplexity on SmolLM2 (1.0 was worse at M-LRD, 0.001 marginally worse).
DEFAULT_GRAD_DAMP = 0.01


def _out_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def whitening_factor(gram: torch.Tensor, max_tries: int = 12) -> tuple[torch.Tensor, float]:
    """Lower-triangular ``S`` with ``S Sᵀ = gram + shift·I`` (float64), and the shift used.

    ``XᵀX`` is only positive semi-definite: inputs that never fire, fewer calibration tokens
    than features, or float32 accumulation make Cholesky fail. The shift starts at 0 and,
    on failure, at 1e-10 of the mean diagonal, growing x10 per try; it only enlarges the
    energy of directions the data did not show, and ``L @ R`` stays exact at full rank
    whatever the shift (``S`` is removed exactly).
    """
    g = gram.detach().to(torch.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gram must be square [d_in, d_in], got {tuple(gram.shape)}")
    if not torch.isfinite(g).all():
        raise ValueError("gram contains inf/nan (overflow while accumulating XᵀX? accumulate in float64)")
    g = 0.5 * (g + g.T)  # accumulation order leaves tiny asymmetries; Cholesky reads one triangle
    scale = float(g.diagonal().abs().mean())
    if scale == 0.0:
        scale = 1.0  # all-zero activations: whitening degenerates to the identity (plain SVD)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    shift = 0.0
    for attempt in range(max_tries):
        shift = 0.0 if attempt == 0 else scale * 1e-10 * 10.0 ** (attempt - 1)
        s, info = torch.linalg.cholesky_ex(g + shift * eye)
        if int(info) == 0 and bool(torch.isfinite(s).all()):
            return s, shift
    raise ValueError(f"gram is not positive definite even with a diagonal shift of {shift:.3g}")


@dataclass(frozen=True)
class Decomposition:
    """Full per-group SVD of one projection, truncated on demand (one SVD, any rank).

    Shapes: ``u [G, gsD, k]``, ``s [G, k]`` (descending), ``vh [G, k, d_in]`` with
    ``k = min(gsD, d_in)``, all float64, such that ``W_g = u_g diag(s_g) vh_g`` (``vh``
    already has the whitening removed).
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    whitened: bool
    shift: float
    out_dtype: torch.dtype

    @property
    def num_groups(self) -> int:
        return self.u.shape[0]

    @property
    def group_rows(self) -> int:
        return self.u.shape[1]

    def truncate(self, rank: int, split: Split = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """``L [G, gsD, rank]``, ``R [G, rank, d_in]`` keeping the top ``rank`` directions.

        ``rank`` may exceed ``k`` only up to ``gsD`` (the group's nominal full rank); the extra
        components are zero, so ``rank == gsD`` always reproduces ``W``.
        """
        gsd, k = self.group_rows, self.s.shape[1]
        if not 1 <= rank <= gsd:
            raise ValueError(f"rank={rank} must be in [1, {gsd}] (rows per group)")
        kept = min(rank, k)
        u, s, vh = self.u[:, :, :kept], self.s[:, :kept], self.vh[:, :kept, :]
        if split == "left":
            left, right = u * s[:, None, :], vh
        elif split == "sqrt":
            root = s.sqrt()
            left, right = u * root[:, None, :], vh * root[:, :, None]
        else:
            raise ValueError(f"split={split!r}: expected 'left' or 'sqrt'")
        if kept < rank:  # gsD > d_in: pad with null directions so shapes match the request
            pad = rank - kept
            left = torch.nn.functional.pad(left, (0, pad))
            right = torch.nn.functional.pad(right, (0, 0, 0, pad))
        return left.to(self.out_dtype).contiguous(), right.to(self.out_dtype).contiguous()


    def output_sensitivity(self, grad_gram: torch.Tensor) -> torch.Tensor:
        """``[G, k]``: ``u_iᵀ G_g u_i``, the loss-gradient energy along each output direction.

        ``grad_gram = Σ_t g_t g_tᵀ [G*gsD, G*gsD]`` is the second moment of the loss gradient
        with respect to the projection's outputs. Under the usual Fisher (Gauss-Newton)
        approximation, dropping direction ``i`` costs about ``s_i² * u_iᵀ G u_i`` of loss
        (divided by the token count), so ``s * sqrt(output_sensitivity)`` is a spectrum in
        loss units that an allocator can compare across matrices.
        """
        rows = self.num_groups * self.group_rows
        if grad_gram.shape != (rows, rows):
            raise ValueError(f"grad_gram must be [{rows}, {rows}], got {tuple(grad_gram.shape)}")
        gg = grad_gram.detach().to(torch.float64)
        blocks = torch.stack(
            [gg[g * self.group_rows : (g + 1) * self.group_rows, g * self.group_rows : (g + 1) * self.group_rows]
             for g in range(self.num_groups)]
        )
        return torch.einsum("gri,grc,gci->gi", self.u, blocks, self.u).clamp_min(0)


def _svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of each matrix of ``w [G, m, n]``.

    K/V factor matrices are wide (``m`` = group rows, a few hundred; ``n`` = model width,
    thousands). For those we take a Householder QR of ``wᵀ = Q·T`` first and the SVD of the
    small square ``Tᵀ = U·S·Zᵀ``, so ``w = U·S·(Q·Z)ᵀ``: the same factors to rounding (QR is
    backward stable, unlike an eigendecomposition of ``w·wᵀ``), about 10x cheaper than a wide
    SVD on the CPU, and one batched call per step instead of ``G`` small ones on a GPU, where
    a 32-layer model with 32 KV heads per layer otherwise makes 2048 cuSOLVER calls.
    """
    g, m, n = w.shape
    if n >= 2 * m:
        q, t = torch.linalg.qr(w.transpose(-1, -2))
        u, s, zh = _svd_square(t.transpose(-1, -2))
        return u, s, zh @ q.transpose(-1, -2)
    if m >= 2 * n:
        q, t = torch.linalg.qr(w)
        u, s, vh = _svd_square(t)
        return q @ u, s, vh
    return _svd_square(w)


def _svd_square(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of each matrix of ``w [G, m, n]``: batched on a GPU, one 2-D call per group on
    the CPU (LAPACK's batched path is the same loop, with more dispatch overhead)."""
    if w.device.type != "cpu":
        return torch.linalg.svd(w, full_matrices=False)
    parts = [torch.linalg.svd(m, full_matrices=False) for m in w]
    return tuple(torch.stack([p[i] for p in parts]) for i in range(3))


@contextlib.contextmanager
def _lapack_threads(device: torch.device):
    """The factor matrices are small (a few hundred rows): on the CPU, threaded LAPACK
    collapses when another process holds the cores (an SVD of 192x576 in float64 took 3.2 s
    instead of 9 ms on 2 busy cores), so run them on one thread."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def decompose(weight: torch.Tensor, num_groups: int, gram: torch.Tensor | None = None,
              grad_gram: torch.Tensor | None = None, grad_damp: float = DEFAULT_GRAD_DAMP) -> "Decomposition":
    """Per-group SVD of ``weight [G*gsD, d_in]``; whitened by ``gram = XᵀX [d_in, d_in]`` if given.

    ``grad_gram`` (``Σ g gᵀ`` of the loss gradient at the outputs, ``[G*gsD, G*gsD]``) also
    whitens the output side (a Kronecker-factored Fisher metric): the SVD then minimizes the
    estimated loss increase rather than the output error, and its singular values are in
    loss units. ``grad_damp`` (relative to the mean diagonal) keeps directions the
    calibration gradients never excited from being treated as free.
    """
    with _lapack_threads(weight.device):
        return _decompose(weight, num_groups, gram, grad_gram, grad_damp)


def _decompose(
    weight: torch.Tensor,
    num_groups: int,
    gram: torch.Tensor | None = None,
    grad_gram: torch.Tensor | None = None,
    grad_damp: float = DEFAULT_GRAD_DAMP,
) -> Decomposition:
    """``decompose`` on the current thread settings."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [G*gsD, d_in], got shape {tuple(weight.shape)}")
    if num_groups < 1 or weight.shape[0] % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {weight.shape[0]} rows of weight")
    if grad_gram is not None and gram is None:
        raise ValueError("grad_gram needs gram too (output whitening is only defined with input whitening)")
    rows, d_in = weight.shape
    gsd = rows // num_groups
    w = weight.detach().to(torch.float64).reshape(num_groups, gsd, d_in)
    shift = 0.0
    if gram is None:
        u, s, vh = _svd(w)
    else:
        if gram.shape != (d_in, d_in):
            raise ValueError(f"gram must be [{d_in}, {d_in}] to match weight's inputs, got {tuple(gram.shape)}")
        chol, shift = whitening_factor(gram.to(weight.device))
        left_t = None
        if grad_gram is not None:
            left_t = _output_factors(grad_gram, num_groups, gsd, grad_damp)
            w = left_t.transpose(-1, -2) @ w
        u, s, vh_white = _svd(w @ chol)
        # Undo the whitening on the right: vh = vh_white S⁻¹, i.e. Sᵀ vhᵀ = vh_whiteᵀ. A
        # triangular solve is both cheaper and more accurate than forming S⁻¹.
        vh = torch.linalg.solve_triangular(chol.T, vh_white.transpose(-1, -2), upper=True).transpose(-1, -2)
        if left_t is not None:  # and on the left: u = T⁻ᵀ u_white
            u = torch.linalg.solve_triangular(left_t.transpose(-1, -2), u, upper=True)
    return Decomposition(u, s, vh, gram is not None, shift, _out_dtype(weight))


def _output_factors(grad_gram: torch.Tensor, num_groups: int, gsd: int, damp: float) -> torch.Tensor:
    """Per-group lower Cholesky factors ``T_g [G, gsD, gsD]`` of the damped gradient Gram blocks."""
    rows = num_groups * gsd
    if grad_gram.shape != (rows, rows):
        raise ValueError(f"grad_gram must be [{rows}, {rows}], got {tuple(grad_gram.shape)}")
    gg = grad_gram.detach().to(torch.float64)
    out = []
    for g in range(num_groups):
        block = gg[g * gsd : (g + 1) * gsd, g * gsd : (g + 1) * gsd]
        block = block + damp * float(block.diagonal().mean()) * torch.eye(gsd, dtype=block.dtype, device=block.device)
        out.append(whitening_factor(block)[0])
    return torch.stack(out)


def factorize(
    weight: torch.Tensor,
    num_groups: int,
    rank: int,
    gram: torch.Tensor | None = None,
    *,
    grad_gram: torch.Tensor | None = None,
    grad_damp: float = DEFAULT_GRAD_DAMP,
    split: Split = "left",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of every group of ``weight [G*gsD, d_in]``.

    Returns ``L [G, gsD, rank]`` and ``R [G, rank, d_in]`` with
    ``weight[g*gsD:(g+1)*gsD] ≈ L[g] @ R[g]`` (exact at ``rank == gsD``). With ``gram``
    (``XᵀX`` of the projection's input activations) the error is minimized on those
    activations rather than on the weight itself; adding ``grad_gram`` (``Σ g gᵀ`` of the
    loss gradient at the outputs, rows in the same order as ``weight``) minimizes the
    estimated loss increase instead (see :func:`decompose`).
    """
    return decompose(weight, num_groups, gram, grad_gram, grad_damp).truncate(rank, split)


def singular_values(
    weight: torch.Tensor,
    num_groups: int,
    gram: torch.Tensor | None = None,
    *,
    grad_gram: torch.Tensor | None = None,
    grad_damp: float = DEFAULT_GRAD_DAMP,
) -> torch.Tensor:
    """Singular values ``[G, gsD]`` (float64, descending, zero-padded past ``d_in``) per group.

    Whitened when ``gram`` is given: then ``sum(s[g, r:]**2)`` is exactly the squared output
    error ``||X (W_g - L_g R_g)ᵀ||²`` of keeping rank ``r``, the quantity allocators trade.
    With ``grad_gram`` too it is proportional to the estimated loss increase (``MatrixStats``
    spectrum ``"loss"``), comparable across matrices calibrated on the same tokens.
    """
    dec = decompose(weight, num_groups, gram, grad_gram, grad_damp)
    pad = dec.group_rows - dec.s.shape[1]
    return torch.nn.functional.pad(dec.s, (0, pad)) if pad > 0 else dec.s


def reconstruction_error(
    weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, gram: torch.Tensor | None = None
) -> float:
    """Relative error of ``L @ R`` against ``weight``: ``||E S|| / ||W S||`` (Frobenius).

    With ``gram`` this is the relative output error on the calibration activations
    (``tr(E gram Eᵀ)`` is ``||X Eᵀ||²``); without, the plain relative weight error.
    """
    w = weight.detach().to(torch.float64)
    approx = (left.to(torch.float64) @ right.to(torch.float64)).reshape(w.shape)
    err = w - approx
    if gram is None:
        return float(err.norm() / w.norm())
    g = gram.to(torch.float64)
    num = torch.einsum("ij,jk,ik->", err, g, err)
    den = torch.einsum("ij,jk,ik->", w, g, w)
    return float((num.clamp_min(0) / den).sqrt())
