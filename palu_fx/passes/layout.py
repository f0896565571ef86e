"""Index replay: which projection feature and which token land at each cache position.

Between a K/V projection and the cache there is a chain of pure layout ops (view,
transpose, split/chunk/slice of a fused QKV, GQA expansion...). Instead of pattern-matching
each spelling, we replay the chain on *index tensors*: ``feat`` holds the projection
feature number of every element, ``bidx``/``sidx`` its batch and sequence position. At the
end we read off, per (head, dim), the projection row that feeds it, and check that tokens
were not shuffled. This covers fused-QKV slicing, per-head interleaved QKV (view, then
chunk), a transposed-weight ``addmm`` split and any spelling we never saw, as long
as it is built from layout ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from palu_fx.passes.fx_utils import CAST_OPS, LAYOUT_OPS, aten, concrete, getitem_parent, is_call

_VIEWS = {aten.view.default, aten._unsafe_view.default}


class LayoutError(ValueError):
    """A layout chain that does not map (head, dim) to projection rows cleanly."""


@dataclass
class Probe:
    feat: torch.Tensor
    bidx: torch.Tensor
    sidx: torch.Tensor

    def map(self, fn) -> "Probe":
        return Probe(fn(self.feat), fn(self.bidx), fn(self.sidx))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.feat.shape)


def start_probe(out_shape: tuple[int, ...]) -> Probe:
    """Index tensors shaped like a projection output ``[B, S, F]``."""
    if len(out_shape) != 3:
        raise LayoutError(f"projection output has shape {list(out_shape)}; expected [batch, seq, features]")
    B, S, F = out_shape
    feat = torch.arange(F).expand(B, S, F).clone()
    bidx = torch.arange(B).view(B, 1, 1).expand(B, S, F).clone()
    sidx = torch.arange(S).view(1, S, 1).expand(B, S, F).clone()
    return Probe(feat, bidx, sidx)


def is_layout_step(node: fx.Node) -> bool:
    if is_call(node, LAYOUT_OPS):
        return True
    parent = getitem_parent(node)
    from palu_fx.passes.fx_utils import MULTI_OUTPUT_LAYOUT_OPS

    return parent is not None and is_call(parent[0], MULTI_OUTPUT_LAYOUT_OPS)


def step_input(node: fx.Node) -> fx.Node:
    """The tensor a layout/cast step reads."""
    parent = getitem_parent(node)
    src = parent[0] if parent is not None else node
    return src.args[0]


def replay(node: fx.Node, probe: Probe) -> Probe:
    """Apply one layout (or cast) step to the probe."""
    if is_call(node, CAST_OPS):
        return probe
    parent = getitem_parent(node)
    if parent is not None:
        op, i = parent
        args, kwargs = concrete(tuple(op.args[1:])), {k: concrete(v) for k, v in op.kwargs.items()}
        return probe.map(lambda t: op.target(t, *args, **kwargs)[i])
    args, kwargs = concrete(tuple(node.args[1:])), {k: concrete(v) for k, v in node.kwargs.items()}
    kwargs.pop("memory_format", None)
    # probes carry element identities, not memory: a view is a reshape of them (the traced
    # tensor's strides, which made the view legal, are not the probe's)
    target = aten.reshape.default if node.target in _VIEWS else node.target
    return probe.map(lambda t: target(t, *args, **kwargs))


def head_rows(probe: Probe, batch_axis: int, head_axis: int, seq_axis: int, dim_axis: int) -> torch.Tensor:
    """Projection rows ``[H, D]`` feeding each (head, dim) of a 4-D per-head tensor.

    Raises LayoutError if features vary with the token or tokens were permuted.
    """
    if len(probe.shape) != 4 or sorted((batch_axis, head_axis, seq_axis, dim_axis)) != [0, 1, 2, 3]:
        raise LayoutError(f"expected a 4-D per-head tensor, got shape {list(probe.shape)}")
    perm = (batch_axis, seq_axis, head_axis, dim_axis)
    feat, b, s = (t.permute(perm) for t in (probe.feat, probe.bidx, probe.sidx))
    rows = feat[0, 0]
    if not torch.equal(feat, rows.expand_as(feat)):
        raise LayoutError("projection features change from token to token (not a per-head layout)")
    B, S = feat.shape[:2]
    if not torch.equal(b, torch.arange(B).view(B, 1, 1, 1).expand_as(b)) or not torch.equal(
        s, torch.arange(S).view(1, S, 1, 1).expand_as(s)
    ):
        raise LayoutError("tokens are re-ordered between the projection and the cache")
    if rows.unique().numel() != rows.numel():
        raise LayoutError("a projection feature feeds several (head, dim) positions")
    return rows


def last_dim_rows(probe: Probe) -> set[tuple[int, ...]]:
    """Distinct feature rows along the last dim (what a per-head op such as RoPE sees)."""
    flat = probe.feat.reshape(-1, probe.shape[-1])
    return {tuple(r) for r in flat.unique(dim=0).tolist()}
