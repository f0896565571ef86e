"""RoPE, recognized by what it computes rather than how it is spelled.

A RoPE link is a region of element-wise linear ops (mul, add, sub, neg) and re-arrangements
(slice, cat, stack, chunk, view...) that maps the per-head key ``x`` to
``x*cos + rotate(x)*sin`` on its first ``rot`` dims (the rest passed through), where cos/sin
are computed from positions only. We find the region structurally (``x`` is the nearest
node every data path from the projection to the output goes through), then verify it
numerically with random inputs in float64: rotate-half, interleaved pairs,
complex-style ``(x1*cos - x2*sin, x2*cos + x1*sin)``, partial rotary with a pass-through
tail, casts around it: all are the same function, so all are recognized.

The coefficients per position are later read off the region itself (rotary.py): with
``x = 1`` and ``x = s`` (a sign pattern with ``rotate(s) = 1``) the region returns
``cos - s*sin`` and ``s*cos + sin``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx

from palu_fx.kernels.latent_attention.naive import ROPE_HALF, ROPE_INTERLEAVED, rotate
from palu_fx.passes.fx_utils import (
    CAST_OPS, MULTI_OUTPUT_LAYOUT_OPS, aten, concrete_shape, evaluate, is_call, val,
)

_REGION_OPS = {
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.mul.Scalar,
    aten.slice.Tensor, aten.cat.default, aten.stack.default, aten.view.default, aten.reshape.default,
    aten._unsafe_view.default, aten.unsqueeze.default, aten.flatten.using_ints, aten.squeeze.dim,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.expand.default,
    operator.getitem,
} | MULTI_OUTPUT_LAYOUT_OPS | {op for op in CAST_OPS if op != aten._assert_tensor_metadata.default}


@dataclass
class RopeLink:
    """``output = x*cos + rotate(x)*sin`` on the first ``rot_dim`` dims of ``input``."""

    output: fx.Node
    input: fx.Node
    coefficients: list  # region inputs computed from positions (cos/sin in some form)
    style: int
    rot_dim: int


def sign_pattern(style: int, rot: int, dim: int) -> torch.Tensor:
    """``s`` with ``rotate(s[:rot]) == 1`` (and 1 on the pass-through dims)."""
    s = torch.ones(dim, dtype=torch.float64)
    if style == ROPE_HALF:
        s[rot // 2: rot] = -1
    else:
        s[1:rot:2] = -1
    return s


def _region(out: fx.Node, is_data: Callable[[fx.Node], bool]) -> tuple[list[fx.Node], list[fx.Node]]:
    """(data nodes, coefficient leaves) reachable backwards from ``out`` through region ops."""
    data, coeffs, seen, stack = [], [], set(), [out]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if not is_data(n):
            coeffs.append(n)
            continue
        data.append(n)
        if n is out or is_call(n, _REGION_OPS):
            stack.extend(n.all_input_nodes)
    return data, coeffs


def _dominates(out: fx.Node, x: fx.Node, is_data) -> bool:
    """Every data path into ``out`` passes through ``x``."""
    seen, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n is x or n in seen or not is_data(n):
            continue
        seen.add(n)
        if n is not out and not is_call(n, _REGION_OPS):
            return False  # reached a data source around x
        stack.extend(n.all_input_nodes)
    return True


def match_rope(out: fx.Node, is_data: Callable[[fx.Node], bool]) -> Optional[RopeLink]:
    if not is_call(out, _REGION_OPS) or not isinstance(val(out), torch.Tensor) or val(out).dim() < 2:
        return None
    data, _ = _region(out, is_data)
    if len(data) < 3:
        return None
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    for x in sorted((n for n in data if n is not out), key=lambda n: -order[n])[:40]:
        if is_call(x, MULTI_OUTPUT_LAYOUT_OPS) or not isinstance(val(x), torch.Tensor):
            continue
        if concrete_shape(x) != concrete_shape(out) or not _dominates(out, x, is_data):
            continue
        link = _verify(out, x, is_data)
        if link is not None:
            return link
    return None


def _verify(out: fx.Node, x: fx.Node, is_data) -> Optional[RopeLink]:
    """Check numerically that the region is a RoPE of ``x``; find its style and width."""
    coeffs = _coefficient_leaves(out, x, is_data)
    if not coeffs:
        return None
    gen = torch.Generator().manual_seed(0)
    cvals = {c: torch.randn(concrete_shape(c), generator=gen, dtype=torch.float64) for c in coeffs}
    shape = concrete_shape(x)
    D = shape[-1]

    def run(xv: torch.Tensor) -> Optional[torch.Tensor]:
        try:
            (o,) = evaluate([out], {x: xv, **cvals}, leaf=_no_leaf, dtype=torch.float64)
        except Exception:
            return None
        return o if isinstance(o, torch.Tensor) and tuple(o.shape) == shape else None

    x1 = torch.randn(shape, generator=gen, dtype=torch.float64)
    o1, o0 = run(x1), run(torch.zeros(shape, dtype=torch.float64))
    if o1 is None or o0 is None or o0.abs().max() > 0:
        return None  # not linear in x
    same = (o1 == x1).flatten(0, -2).all(0)
    rot = D
    while rot > 0 and bool(same[rot - 1]):
        rot -= 1
    if rot < 2 or rot % 2:
        return None
    ones = torch.ones(shape, dtype=torch.float64)
    o_one = run(ones)
    for style in (ROPE_HALF, ROPE_INTERLEAVED):
        s = sign_pattern(style, rot, D)
        o_s = run(ones * s)
        if o_one is None or o_s is None:
            return None
        cos, sin = (o_one + s * o_s) / 2, (o_s - s * o_one) / 2
        expect = x1 * cos
        expect[..., :rot] = expect[..., :rot] + rotate(x1[..., :rot], style) * sin[..., :rot]
        if torch.allclose(o1, expect, rtol=1e-9, atol=1e-9):
            return RopeLink(out, x, coeffs, style, rot)
    return None


def _coefficient_leaves(out: fx.Node, x: fx.Node, is_data) -> list[fx.Node]:
    coeffs, seen, stack = [], set(), [out]
    while stack:
        n = stack.pop()
        if n is x or n in seen:
            continue
        seen.add(n)
        if not is_data(n):
            if isinstance(val(n), torch.Tensor):
                coeffs.append(n)
            continue
        stack.extend(n.all_input_nodes)
    return coeffs


def _no_leaf(n: fx.Node):
    raise ValueError(f"RoPE region reads {n.name} directly")


__all__ = ["RopeLink", "match_rope", "sign_pattern"]
