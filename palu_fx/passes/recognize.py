"""Small recognizers for the links between a key projection and the cache: casts and
RMSNorm (k-norm). RoPE has its own module (rope.py): it is recognized numerically.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch.fx as fx

from palu_fx.passes.fx_utils import CAST_OPS, aten, depends_on, is_call, val


def strip_casts(node):
    while is_call(node, CAST_OPS) and node.target != aten._assert_tensor_metadata.default:
        node = node.args[0]
    return node


@dataclass
class NormLink:
    """``output = x * rsqrt(mean(x^2, -1) + eps) * weight`` (RMSNorm over the last dim)."""

    output: fx.Node
    input: fx.Node
    weight: Optional[fx.Node]
    eps: float


def _rsqrt_of_mean_square(r: fx.Node, x: fx.Node) -> Optional[float]:
    """eps if ``r == rsqrt(mean(x*x, -1, keepdim) + eps)``."""
    if is_call(r, aten.rsqrt.default):
        inner = r.args[0]
    else:
        return None
    if not is_call(inner, {aten.add.Tensor, aten.add.Scalar}) or not isinstance(inner.args[1], (int, float)):
        return None
    eps, mean = float(inner.args[1]), inner.args[0]
    if not is_call(mean, aten.mean.dim):
        return None
    dims = mean.args[1]
    ndim = len(val(mean.args[0]).shape)
    keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if list(d % ndim for d in dims) != [ndim - 1] or not keep:
        return None
    sq = mean.args[0]
    if is_call(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2 and strip_casts(sq.args[0]) is x:
        return eps
    if is_call(sq, aten.mul.Tensor) and strip_casts(sq.args[0]) is x and strip_casts(sq.args[1]) is x:
        return eps
    return None


def match_rms_norm(node: fx.Node) -> Optional[NormLink]:
    """RMSNorm over the last dim, with an optional weight (any weight expression)."""
    out = node
    if is_call(node, aten.rms_norm.default):
        dims = node.args[1]
        if len(dims) != 1:
            return None
        w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
        if eps is None:
            return None
        return NormLink(out, node.args[0], w, float(eps))
    node = strip_casts(node)
    candidates = []
    if is_call(node, aten.mul.Tensor) and all(isinstance(a, fx.Node) for a in node.args):
        a, b = node.args
        candidates = [(strip_casts(a), b), (strip_casts(b), a), (node, None)]
    for normed, weight in candidates:
        if not is_call(normed, aten.mul.Tensor) or not all(isinstance(a, fx.Node) for a in normed.args):
            continue
        for xs, r in itertools.permutations(normed.args):
            x = strip_casts(xs)
            eps = _rsqrt_of_mean_square(r, x)
            if eps is not None and (weight is None or not depends_on(weight, x)):
                return NormLink(out, x, weight, eps)
    return None
