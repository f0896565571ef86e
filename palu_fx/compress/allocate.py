"""Rank allocation: how many latent channels each K/V projection keeps under one budget.

Every K and V projection of every layer competes for one budget: ``rank_ratio`` of the
total full rank (sum over matrices of ``num_groups * full_rank_per_group``), i.e. of the
cache. All groups of one matrix keep the same rank (the latent cache and the kernels use
one layout per matrix), ranks are multiples of ``rank_multiple`` (the kernels' tile),
at least ``rank_multiple`` and at most the full rank. ``rank_ratio >= 1`` keeps everything.

Allocators (policy only; the factorization is :mod:`palu_fx.compress.factorize`):
- ``uniform``: every matrix keeps ``rank_ratio`` of its rank (rounded to the nearest
  multiple, so the budget holds up to rounding).
- ``fisher``: Palu's allocation. Ranks proportional to each matrix's Fisher score (Palu's
  score: the mean over the weight's entries of the root-mean-square gradient, see
  :func:`fisher_scores`), capped at full rank, the remainder handed out one unit at a time,
  then rounded. Palu allocates per group in some modes; we use its per-matrix variant
  (split evenly over groups), the only one that keeps one rank per matrix.
- ``energy`` (default): greedy water-filling on singular-value energy. Keeping rank ``r``
  of a whitened factorization loses exactly ``sum_{i>=r} σ_i²`` of output energy on the
  calibration data (for the ``kfac`` factorization: of estimated loss); we repeatedly grant
  ``rank_multiple`` more channels (to every group of a matrix) to the matrix whose next
  blocks recover the most weighted energy per unit of cache, until the budget is spent.
  With decreasing gains the greedy choice is optimal for this objective (up to the last,
  indivisible block). How matrices are weighted depends on what the spectra measure
  (``MatrixStats.spectrum``), see :func:`energy_weighting`.

Measured on SmolLM2-135M (issue 6 setting: calibration 64 x 512 tokens of Emma, perplexity
on 16 x 1024 tokens of Pride and Prejudice, baseline 23.35), rank ratio 0.5, J-LRD / M-LRD:
whitened uniform 30.2 / 38.8; Palu's Fisher allocator 29.1 / 41.9; energy on
whitened spectra (sensitivity^0.5) 28.0 / 37.0; ``kfac`` factorization + energy 25.6 / 29.9.

Example::

    stats = [MatrixStats("layer0.k", 1, 192, s_k), MatrixStats("layer0.v", 1, 192, s_v), ...]
    ranks = allocate(stats, PaluConfig(rank_ratio=0.5, allocator="energy", group_size="all"))
    # {"layer0.k": 64, "layer0.v": 112, ...}: rank per group
"""
from __future__ import annotations

import heapq
import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from palu_fx.config import PaluConfig

__all__ = [
    "MatrixStats",
    "allocate",
    "allocate_uniform",
    "allocate_fisher",
    "allocate_energy",
    "energy_weighting",
    "fisher_scores",
    "round_rank",
    "total_rank",
    "kept_rank",
]


SPECTRA = ("plain", "whitened", "loss")


@dataclass(frozen=True)
class MatrixStats:
    """What an allocator knows about one K or V projection.

    Fields:
        name: unique key of the matrix in the returned allocation.
        num_groups: groups ``G`` the matrix is factored in (all get the same rank).
        full_rank_per_group: rows per group ``gsD`` (heads per group x head dim).
        singular_values: ``[G, gsD]`` per-group singular values, whitened when calibration
            activations exist (see :func:`palu_fx.compress.factorize.singular_values`);
            needed by ``energy``.
        fisher: Palu's Fisher score (mean root-mean-square gradient of the weight, see
            :func:`fisher_scores`); needed by ``fisher``.
        fisher_trace: sum over the weight's entries of the mean squared gradient (trace of
            the diagonal empirical Fisher); used by ``energy`` to weight matrices.
        input_energy: ``trace(XᵀX)`` of the activations entering the projection (same
            tokens as the Fisher); with ``fisher_trace`` it gives the loss sensitivity per
            unit of output error.
        spectrum: what ``singular_values`` measure: ``"plain"`` (of the weight),
            ``"whitened"`` (output error on calibration data) or ``"loss"`` (estimated loss,
            from the ``kfac`` factorization). Decides how ``energy`` weighs matrices.
    """

    name: str
    num_groups: int
    full_rank_per_group: int
    singular_values: torch.Tensor | None = None
    fisher: float | None = None
    fisher_trace: float | None = None
    input_energy: float | None = None
    spectrum: str = "whitened"

    def __post_init__(self) -> None:
        if self.spectrum not in SPECTRA:
            raise ValueError(f"MatrixStats {self.name!r}: spectrum={self.spectrum!r}, expected one of {SPECTRA}")
        if self.num_groups < 1 or self.full_rank_per_group < 1:
            raise ValueError(
                f"MatrixStats {self.name!r}: num_groups={self.num_groups} and "
                f"full_rank_per_group={self.full_rank_per_group} must be positive"
            )
        sv = self.singular_values
        if sv is not None and tuple(sv.shape) != (self.num_groups, self.full_rank_per_group):
            raise ValueError(
                f"MatrixStats {self.name!r}: singular_values has shape {tuple(sv.shape)}, expected "
                f"[num_groups, full_rank_per_group] = [{self.num_groups}, {self.full_rank_per_group}]"
            )
        for field in ("fisher", "fisher_trace", "input_energy"):
            v = getattr(self, field)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"MatrixStats {self.name!r}: {field}={v} must be finite and >= 0")

    @property
    def full_rank(self) -> int:
        """Cache channels of the whole matrix at full rank (``G * gsD``)."""
        return self.num_groups * self.full_rank_per_group


def fisher_scores(grad_sq_mean: torch.Tensor) -> tuple[float, float]:
    """``(palu_score, trace)`` of a weight's mean squared gradient ``E_batch[(dL/dW)²]``.

    Palu's score averages the per-entry RMS gradient (square root *before* the mean): a
    mild statistic, far less skewed between K and V than the trace (sum of squares), which
    is 10-100x larger for V than for K on SmolLM2 and starves K when used as a share.
    """
    g = grad_sq_mean.detach().to(torch.float64)
    if (g < 0).any():
        raise ValueError("grad_sq_mean must be non-negative (a mean of squared gradients)")
    return float(g.sqrt().mean()), float(g.sum())


def round_rank(rank: float, multiple: int, full: int) -> int:
    """Nearest multiple of ``multiple``, at least ``multiple``, at most ``full``."""
    r = max(multiple, int(round(rank / multiple)) * multiple)
    return min(r, full)


def total_rank(stats: Sequence[MatrixStats]) -> int:
    """Cache channels of all matrices at full rank."""
    return sum(s.full_rank for s in stats)


def kept_rank(stats: Sequence[MatrixStats], ranks: dict[str, int]) -> int:
    """Cache channels kept by an allocation (``sum G * rank``)."""
    return sum(s.num_groups * ranks[s.name] for s in stats)


def _check(stats: Sequence[MatrixStats], rank_ratio: float, rank_multiple: int) -> None:
    if not stats:
        raise ValueError("rank allocation needs at least one matrix")
    names = [s.name for s in stats]
    if len(set(names)) != len(names):
        raise ValueError(f"matrix names must be unique, got duplicates in {names}")
    if not 0 < rank_ratio <= 1:
        raise ValueError(f"rank_ratio={rank_ratio} must be in (0, 1]")
    if rank_multiple < 1:
        raise ValueError(f"rank_multiple={rank_multiple} must be positive")


def _full(stats: Sequence[MatrixStats]) -> dict[str, int]:
    return {s.name: s.full_rank_per_group for s in stats}


def allocate_uniform(stats: Sequence[MatrixStats], rank_ratio: float, rank_multiple: int) -> dict[str, int]:
    """``round(rank_ratio * gsD)`` per matrix, rounded to the nearest multiple."""
    _check(stats, rank_ratio, rank_multiple)
    if rank_ratio >= 1:
        return _full(stats)
    return {s.name: round_rank(rank_ratio * s.full_rank_per_group, rank_multiple, s.full_rank_per_group) for s in stats}


def allocate_fisher(stats: Sequence[MatrixStats], rank_ratio: float, rank_multiple: int) -> dict[str, int]:
    """Palu's Fisher-proportional allocation (per matrix, split evenly over its groups).

    1. target = ``rank_ratio`` x total full rank; each matrix's share is
       ``target * score / sum(scores)``, floored and capped at the matrix's full rank;
    2. the shortfall is handed out one channel at a time, cycling over the matrices that
       are not full in Palu's order (ascending ``share - floored``, which visits capped
       matrices first but skips them);
    3. each matrix's total is divided evenly among its groups and the per-group rank is
       rounded to the nearest multiple (at least one multiple; at most full), as in Palu.
    Step 3 makes the kept total differ from the target by up to half a multiple per group.
    """
    _check(stats, rank_ratio, rank_multiple)
    missing = [s.name for s in stats if s.fisher is None]
    if missing:
        raise ValueError(f"allocator 'fisher' needs MatrixStats.fisher for every matrix; missing for {missing}")
    if rank_ratio >= 1:
        return _full(stats)
    target = rank_ratio * total_rank(stats)
    score_sum = sum(float(s.fisher) for s in stats)  # type: ignore[arg-type]
    if score_sum <= 0:
        raise ValueError("allocator 'fisher': all Fisher scores are zero (no gradient reached K/V?)")
    share = {s.name: target * float(s.fisher) / score_sum for s in stats}  # type: ignore[arg-type]
    alloc = {s.name: min(s.full_rank, math.floor(share[s.name])) for s in stats}
    order = sorted(stats, key=lambda s: share[s.name] - alloc[s.name])
    shortfall = int(round(target - sum(alloc.values())))
    while shortfall > 0 and any(alloc[s.name] < s.full_rank for s in stats):
        for s in order:
            if alloc[s.name] >= s.full_rank:
                continue
            alloc[s.name] += 1
            shortfall -= 1
            if shortfall == 0:
                break
    return {
        s.name: round_rank(alloc[s.name] // s.num_groups, rank_multiple, s.full_rank_per_group) for s in stats
    }


def _energy_weights(
    stats: Sequence[MatrixStats],
    normalize: bool,
    sensitivity_power: float,
    extra: Mapping[str, float] | None,
) -> dict[str, float]:
    """Per-matrix multiplier of singular-value energy (see :func:`allocate_energy`)."""
    weights = {}
    for s in stats:
        energy = float(s.singular_values.to(torch.float64).pow(2).sum())  # type: ignore[union-attr]
        w = 1.0 / energy if normalize and energy > 0 else 1.0
        if sensitivity_power:
            if s.fisher_trace is None or s.input_energy is None:
                raise ValueError(
                    f"sensitivity weighting needs MatrixStats.fisher_trace and input_energy; missing for {s.name!r}"
                )
            # Kronecker (K-FAC) view of the Fisher: trace(F) = trace(E[g gᵀ]) trace(E[x xᵀ]),
            # so the loss cost of one unit of output error is about
            # fisher_trace / (input_energy * rows): the sensitivity per output channel.
            sens = s.fisher_trace / max(s.input_energy * s.full_rank, 1e-300)
            w *= sens**sensitivity_power
        if extra is not None:
            if s.name not in extra or not (math.isfinite(extra[s.name]) and extra[s.name] >= 0):
                raise ValueError(f"weights must give a finite, non-negative weight for {s.name!r}")
            w *= extra[s.name]
        weights[s.name] = w
    return weights


def allocate_energy(
    stats: Sequence[MatrixStats],
    rank_ratio: float,
    rank_multiple: int,
    *,
    normalize: bool = True,
    sensitivity_power: float = 0.0,
    weights: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Greedy water-filling of whitened singular-value energy under the cache budget.

    Minimizes ``sum_m w_m * sum_g sum_{i >= r_m} σ_{m,g,i}²`` subject to
    ``sum_m G_m r_m <= rank_ratio * total`` (exactly, no rounding overshoot), with
    ``r_m`` a multiple of ``rank_multiple`` (or the full rank) and at least one multiple.
    When that floor alone exceeds the budget, the floor is returned with a warning.

    Weights ``w_m``:
    - ``normalize=True``: divide by the matrix's total energy, so matrices of different
      output scale compete on *relative* error (K and V outputs differ in scale by orders
      of magnitude, and absolute energy alone would give everything to the loudest);
    - ``sensitivity_power=p > 0``: multiply by (loss sensitivity per unit output error)^p,
      estimated from ``fisher_trace / (input_energy * rows)``; ``p = 1`` with
      ``normalize=False`` is the second-order loss estimate under a Kronecker Fisher;
    - ``weights``: any further per-matrix multiplier, by name (e.g. a measured sensitivity).
    """
    _check(stats, rank_ratio, rank_multiple)
    missing = [s.name for s in stats if s.singular_values is None]
    if missing:
        raise ValueError(f"allocator 'energy' needs MatrixStats.singular_values; missing for {missing}")
    if rank_ratio >= 1:
        return _full(stats)
    weights = _energy_weights(stats, normalize, sensitivity_power, weights)
    budget = rank_ratio * total_rank(stats)
    ranks = {s.name: min(rank_multiple, s.full_rank_per_group) for s in stats}
    spent = sum(s.num_groups * ranks[s.name] for s in stats)
    if spent > budget + 1e-9:
        # Same outcome as uniform rounding at this ratio: the floor wins over the budget.
        warnings.warn(
            f"rank_ratio={rank_ratio} is below the floor of one rank_multiple ({rank_multiple}) per matrix "
            f"({spent} of {total_rank(stats)} channels); keeping the floor. Lower rank_multiple to go lower",
            stacklevel=2,
        )
        return ranks
    # energy per rank index, summed over groups (all groups move together): [gsD]
    col_energy = {s.name: s.singular_values.to(torch.float64).pow(2).sum(0) for s in stats}  # type: ignore[union-attr]

    def next_step(s: MatrixStats, room: float) -> tuple[float, int, int] | None:
        # Best gain per channel over any number of further blocks: with a decreasing
        # spectrum that is always the next block; with a weighted (non-monotone) one this
        # greedy on the concave envelope avoids stalling in front of a dip.
        r, full = ranks[s.name], s.full_rank_per_group
        if r >= full:
            return None
        energy = col_energy[s.name]
        best: tuple[float, int, int] | None = None
        gain, new = 0.0, r
        while new < full:
            nxt = min(new + rank_multiple, full)
            gain += weights[s.name] * float(energy[new:nxt].sum())
            new = nxt
            cost = s.num_groups * (new - r)
            if cost > room + 1e-9:
                break  # steps only get more expensive
            if best is None or gain / cost > best[0]:
                best = (gain / cost, new, cost)
        return best

    by_name = {s.name: s for s in stats}
    heap: list[tuple[float, int, str]] = []
    for i, s in enumerate(stats):
        step = next_step(s, budget - spent)
        if step is not None:
            heap.append((-step[0], i, s.name))
    heapq.heapify(heap)
    while heap:
        neg_ratio, i, name = heapq.heappop(heap)
        s = by_name[name]
        # Re-evaluate against the budget left now: a long step may no longer fit, and a
        # shorter one has a lower ratio, so it goes back in the queue at its true place.
        step = next_step(s, budget - spent)
        if step is None:
            continue  # nothing of this matrix fits any more
        ratio, new, cost = step
        if ratio < -neg_ratio * (1 - 1e-12):
            heapq.heappush(heap, (-ratio, i, name))
            continue
        ranks[name] = new
        spent += cost
        step = next_step(s, budget - spent)
        if step is not None:
            heapq.heappush(heap, (-step[0], i, name))
    return ranks


def energy_weighting(stats: Sequence[MatrixStats]) -> dict:
    """The ``energy`` allocator's weighting for these spectra: ``allocate_energy`` keywords.

    - ``"loss"`` spectra (``kfac``) are already in loss units: compared as they are.
    - ``"whitened"`` spectra with Fisher traces: absolute energy times the square root of
      the K-FAC sensitivity. Square root, not the full second-order weight: the Kronecker
      estimate is crude (isotropic output gradients), and tempering it was the most robust
      on SmolLM2 (beat whitened-uniform at 0.5 and 0.7, J-LRD and M-LRD; power 1 lost to
      uniform at M-LRD 0.5, relative energy lost badly there).
    - otherwise (no Fisher, or plain spectra): relative energy, each matrix normalized by
      its total, so scale differences between matrices cannot decide.
    """
    kinds = {s.spectrum for s in stats}
    if len(kinds) > 1:
        raise ValueError(f"energy allocation needs one kind of spectrum for all matrices, got {sorted(kinds)}")
    kind = kinds.pop()
    if kind == "loss":
        return {"normalize": False, "sensitivity_power": 0.0}
    has_fisher = all(s.fisher_trace is not None and s.input_energy is not None for s in stats)
    if kind == "whitened" and has_fisher:
        return {"normalize": False, "sensitivity_power": 0.5}
    return {"normalize": True, "sensitivity_power": 0.0}


def allocate(stats: Sequence[MatrixStats], cfg: PaluConfig) -> dict[str, int]:
    """Rank per group for every matrix, by ``cfg.allocator`` with ``cfg.rank_ratio`` and
    ``cfg.rank_multiple`` (``energy`` weighted by :func:`energy_weighting`)."""
    if cfg.allocator == "uniform":
        return allocate_uniform(stats, cfg.rank_ratio, cfg.rank_multiple)
    if cfg.allocator == "fisher":
        return allocate_fisher(stats, cfg.rank_ratio, cfg.rank_multiple)
    if cfg.allocator == "energy":
        return allocate_energy(stats, cfg.rank_ratio, cfg.rank_multiple, **energy_weighting(stats))
    raise ValueError(f"unknown allocator {cfg.allocator!r}")
