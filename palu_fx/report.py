"""What a pass did, as data and as a readable table.

``report(obj)`` accepts a compressed ExportedProgram (or a compiled model's report) and
returns a ``CompressionReport``; ``str()`` of it is a tabulate table per site plus the
attention ops left alone and why.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from tabulate import tabulate

__all__ = ["CompressionReport", "SkipRecord", "report"]


@dataclass
class SkipRecord:
    node: str
    reason: str


@dataclass
class CompressionReport:
    config: Any
    sites: list  # SiteResult
    skipped: list[SkipRecord] = field(default_factory=list)
    cache_found: bool = True

    @property
    def cache_bytes_before(self) -> int:
        return sum(s.bytes_before for s in self.sites)

    @property
    def cache_bytes_after(self) -> int:
        return sum(s.bytes_after for s in self.sites)

    @property
    def ranks(self) -> list[tuple[int, int]]:
        return [(s.rank_k, s.rank_v) for s in self.sites]

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict() if hasattr(self.config, "to_dict") else self.config,
            "sites": [asdict(s) for s in self.sites],
            "skipped": [asdict(s) for s in self.skipped],
            "cache_found": self.cache_found,
            "cache_bytes_before": self.cache_bytes_before,
            "cache_bytes_after": self.cache_bytes_after,
        }

    def __str__(self) -> str:
        rows = [
            [s.layer, s.rope, f"{s.q_heads}/{s.kv_heads}", s.group_size, s.rank_k, s.rank_v,
             "absorbed" if s.absorbed else "rebuilt", "folded" if s.folded else "rebuilt",
             _mib(s.bytes_before) if s.cached else "-", _mib(s.bytes_after) if s.cached else "-"]
            for s in self.sites
        ]
        out = [f"palu-fx: {len(self.sites)} attention site(s) compressed, {len(self.skipped)} left alone"]
        if rows:
            out.append(tabulate(rows, headers=["layer", "RoPE", "q/kv heads", "group", "rank K", "rank V",
                                               "keys", "values", "cache before", "cache after"]))
        if any(s.rank_v > s.head_dim and not s.folded for s in self.sites):
            out.append("values rebuilt inside the attention op where rank V exceeds the head dim: folding them "
                       "into o_proj would widen it by rank V / head dim")
        grouped = [s for s in self.sites if not s.absorbed and s.group_size > 1]
        if grouped:
            gs, rk = max(s.group_size for s in grouped), max(s.rank_k for s in grouped)
            out.append(f"keys rebuilt per decode step from latents shared by up to {gs} KV heads "
                       f"(rank K up to {rk}): each cached key costs {gs}x the work of group size 1 at "
                       f"the same rank ratio; group_size=1 decodes fastest")
        if not self.cache_found and self.sites:
            out.append("no KV cache was found: projections are factored, nothing is cached")
        elif self.sites:
            b, a = self.cache_bytes_before, self.cache_bytes_after
            out.append(f"KV cache: {_mib(b)} -> {_mib(a)} ({a / b:.1%} of the original)" if b else "")
        if self.skipped:
            out.append(tabulate([[s.node, s.reason] for s in self.skipped], headers=["attention op left alone", "reason"]))
        return "\n".join(x for x in out if x)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def report(obj: Any) -> CompressionReport:
    """The compression report of a compressed program or a ``CompressionReport``."""
    if isinstance(obj, CompressionReport):
        return obj
    gm = getattr(obj, "graph_module", None)
    if gm is not None:
        rep: Optional[CompressionReport] = gm.meta.get("palu_report")
        if rep is not None:
            return rep
        raise ValueError("this program carries no palu-fx report (it was not compressed in this process, "
                         "or was saved and loaded: reports are not serialized)")
    rep = getattr(obj, "palu_report", None)
    if rep is not None:
        return rep
    raise TypeError(f"report() expects a compressed ExportedProgram or a CompressionReport, got {type(obj).__name__}")
