"""Compression plans: the *policy* (ranks and factors per site), separate from graph surgery.

A plan is computed once (plain SVD, or whitened SVD with calibration statistics and a rank
allocator), can be saved and loaded, and is applied by either entry point. Sites are
identified by their order in the graph (attention ops in execution order) and checked
against the shapes recorded in the plan, so a plan never lands on the wrong model silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from palu_fx.config import PaluConfig
from palu_fx.passes.find import AttentionSite, Chain

__all__ = ["MatrixFactors", "SitePlan", "CompressionPlan", "effective_weight", "make_plan"]


@dataclass
class MatrixFactors:
    """``W ≈ L·R`` per group: ``W[g*gsD:(g+1)*gsD] ≈ L[g] @ R[g]``."""

    L: torch.Tensor  # [G, gs*D, r]
    R: torch.Tensor  # [G, r, d_in]
    bias: Optional[torch.Tensor]  # [H*D], head-major, or None

    @property
    def rank(self) -> int:
        return int(self.L.shape[-1])

    @property
    def groups(self) -> int:
        return int(self.L.shape[0])


@dataclass
class SitePlan:
    group_size: int
    key: MatrixFactors
    value: MatrixFactors
    shape: tuple  # (num_q_heads, num_kv_heads, head_dim, v_head_dim, d_in) for checking


@dataclass
class CompressionPlan:
    config: PaluConfig
    sites: list[SitePlan]
    meta: dict = field(default_factory=dict)

    def save(self, path: str) -> None:
        torch.save({"format": "palu_fx.plan/1", "config": self.config.to_dict(), "meta": self.meta,
                    "sites": [_site_dict(s) for s in self.sites]}, path)

    @classmethod
    def load(cls, path: str) -> "CompressionPlan":
        d = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or d.get("format") != "palu_fx.plan/1":
            raise ValueError(f"{path} is not a palu-fx compression plan")
        sites = [SitePlan(s["group_size"], MatrixFactors(**s["key"]), MatrixFactors(**s["value"]), tuple(s["shape"]))
                 for s in d["sites"]]
        return cls(PaluConfig.from_dict(d["config"]), sites, d.get("meta", {}))

    def check(self, sites: Sequence[AttentionSite]) -> None:
        if len(sites) != len(self.sites):
            raise ValueError(f"the plan has {len(self.sites)} attention sites but the program has {len(sites)}")
        for site, sp in zip(sites, self.sites):
            if tuple(sp.shape) != site_shape(site):
                raise ValueError(f"plan site {site.index} was made for shape {sp.shape}, "
                                 f"but the program's {site.name} has {site_shape(site)}")


def _site_dict(s: SitePlan) -> dict:
    mf = lambda m: {"L": m.L.contiguous(), "R": m.R.contiguous(), "bias": m.bias}
    return {"group_size": s.group_size, "key": mf(s.key), "value": mf(s.value), "shape": list(s.shape)}


def site_shape(site: AttentionSite) -> tuple:
    d_in = int(site.key.proj.input.meta["val"].shape[-1])
    return (site.num_q_heads, site.num_kv_heads, site.head_dim, site.v_head_dim, d_in)


def effective_weight(chain: Chain, leaf: Callable) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The ``[H*D, d_in]`` weight (and bias) of one role, rows ordered head-major."""
    w = leaf(chain.proj.weight).detach()
    if chain.proj.transposed:
        w = w.t()
    rows = chain.rows.reshape(-1)
    b = leaf(chain.proj.bias).detach().reshape(-1)[rows] if chain.proj.bias is not None else None
    return w[rows], b


def make_plan(
    sites: Sequence[AttentionSite],
    leaf: Callable,
    cfg: PaluConfig,
    grams: Optional[dict] = None,
    ranks: Optional[list[tuple[int, int]]] = None,
    grad_grams: Optional[dict] = None,
) -> CompressionPlan:
    """Factor every site's K and V weights.

    ``grams`` maps a projection input node name to ``XᵀX`` (whitened SVD); ``ranks`` gives
    ``(rank_k, rank_v)`` per site (from an allocator), else ranks are uniform.
    """
    from palu_fx.compress.factorize import factorize

    if cfg.method in ("whitened", "kfac") and grams is None:
        raise ValueError(f"PaluConfig.method={cfg.method!r} needs calibration data; use method='svd' or "
                         "palu_fx.calibrate.calibrated_plan(program, cfg, batches)")
    if cfg.method == "kfac" and grad_grams is None:
        raise ValueError("PaluConfig.method='kfac' needs output-gradient Grams (calibrated_plan collects them)")
    plans = []
    for i, site in enumerate(sites):
        gs = cfg.group_size_for(site.num_kv_heads)
        G = site.num_kv_heads // gs
        mats = []
        for j, (role, chain, D) in enumerate((("key", site.key, site.head_dim), ("value", site.value, site.v_head_dim))):
            w, b = effective_weight(chain, leaf)
            rank = ranks[i][j] if ranks is not None else cfg.rank_for(gs * D)
            gram = grams.get(chain.proj.input.name) if grams is not None else None
            gg = grad_grams.get((site.index, role)) if grad_grams is not None else None
            L, R = factorize(w, G, rank, gram=gram, grad_gram=gg)
            mats.append(MatrixFactors(L.to(w.dtype), R.to(w.dtype), b))
        plans.append(SitePlan(gs, mats[0], mats[1], site_shape(site)))
    plan = CompressionPlan(cfg, plans)
    if cfg.hadamard:  # rotate the latents (exact): spreads the outliers SVD puts in the first channels
        from palu_fx.compress.hadamard import rotate_plan

        plan = rotate_plan(plan)
    return plan
