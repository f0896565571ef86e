"""Small recognizers for the links between a key projection and the cache.

Each recognizer finds a candidate structurally, then *verifies it numerically* on a probe
tensor: e.g. the sub-graph that produces ``rotate(x)`` in ``x*cos + rotate(x)*sin`` is
evaluated on random data and compared with rotate-half and interleaved rotation. Spellings
we never saw (stack/flatten, even/odd slicing, a different cat order) are recognized as
long as they compute the same function.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from palu_fx.kernels.latent_attention.naive import ROPE_HALF, ROPE_INTERLEAVED, rotate
from palu_fx.passes.fx_utils import CAST_OPS, aten, concrete_shape, depends_on, evaluate, is_call, val

# Ops allowed inside ``rotate(x)``: sign flips and re-arrangements only.
_ROTATION_OPS = {
    aten.neg.default, aten.slice.Tensor, aten.cat.default, aten.stack.default,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.flatten.using_ints, aten.select.int, aten.squeeze.dim, aten.clone.default,
    aten.contiguous.default, aten.mul.Tensor, aten.mul.Scalar, aten.permute.default,
    aten.transpose.int, aten.expand.default,
} | {op for op in CAST_OPS if op != aten._assert_tensor_metadata.default}


def strip_casts(node):
    while is_call(node, CAST_OPS) and node.target != aten._assert_tensor_metadata.default:
        node = node.args[0]
    return node


@dataclass
class RopeLink:
    """``output = x*cos + rotate(x)*sin`` on the first ``rot_dim`` dims of ``input``."""

    output: fx.Node
    input: fx.Node
    cos: fx.Node
    sin: fx.Node
    style: int
    rot_dim: int


@dataclass
class NormLink:
    """``output = x * rsqrt(mean(x^2, -1) + eps) * weight`` (RMSNorm over the last dim)."""

    output: fx.Node
    input: fx.Node
    weight: Optional[fx.Node]
    eps: float


def _region_only(out: fx.Node, src: fx.Node, allowed: set) -> bool:
    """Every node between ``src`` and ``out`` is an allowed op fed only from ``src``."""
    stack, seen = [out], set()
    while stack:
        n = stack.pop()
        if n is src or n in seen:
            continue
        seen.add(n)
        if not is_call(n, allowed):
            return False
        if is_call(n, {aten.mul.Tensor}) and sum(isinstance(a, fx.Node) for a in n.args) != 1:
            return False  # a sign flip by a scalar, not a product of tensors
        if not n.all_input_nodes:
            return False
        stack.extend(n.all_input_nodes)
    return len(seen) > 0


def _rotation_style(rx: fx.Node, x: fx.Node) -> Optional[int]:
    if not _region_only(rx, x, _ROTATION_OPS):
        return None
    # small integers: exact in every float dtype a cast inside the region might use
    probe = torch.randint(-100, 100, concrete_shape(x)).to(val(x).dtype if val(x).is_floating_point() else torch.float32)
    try:
        (got,) = evaluate([rx], {x: probe}, leaf=lambda n: (_ for _ in ()).throw(ValueError(n.name)))
    except Exception:
        return None
    for style in (ROPE_HALF, ROPE_INTERLEAVED):
        if got.shape == probe.shape and torch.equal(got.to(probe.dtype), rotate(probe, style)):
            return style
    return None


def _full_rope(node: fx.Node) -> Optional[RopeLink]:
    if not is_call(node, aten.add.Tensor) or len(node.args) != 2:
        return None
    m1, m2 = node.args
    if not all(is_call(m, aten.mul.Tensor) and all(isinstance(a, fx.Node) for a in m.args) for m in (m1, m2)):
        return None
    for m_data, m_rot in ((m1, m2), (m2, m1)):
        for x, c in itertools.permutations(m_data.args):
            for rx, s in itertools.permutations(m_rot.args):
                if rx is x or depends_on(c, x) or depends_on(s, x):
                    continue
                style = _rotation_style(rx, x)
                if style is None and strip_casts(x) is not x:
                    style = _rotation_style(rx, strip_casts(x))
                if style is not None:
                    return RopeLink(node, x, c, s, style, concrete_shape(x)[-1])
    return None


def _last_dim_range(node: fx.Node) -> Optional[tuple[fx.Node, int, int]]:
    """(source, start, end) when ``node`` is ``source[..., start:end]`` (an alias is [0:D])."""
    if is_call(node, {aten.alias.default, aten.clone.default, aten.contiguous.default}):
        src = node.args[0]
        return src, 0, concrete_shape(src)[-1]
    if not is_call(node, aten.slice.Tensor):
        return None
    src = node.args[0]
    ndim = len(val(src).shape)
    dim = node.args[1] if len(node.args) > 1 else 0
    lo = node.args[2] if len(node.args) > 2 else 0
    hi = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    full = concrete_shape(src)[-1]
    if dim % ndim != ndim - 1 or step != 1 or not isinstance(lo, int) or not (hi is None or isinstance(hi, int)):
        return None
    hi = full if hi is None or hi >= full else hi
    return src, lo, hi


def match_rope(node: fx.Node) -> Optional[RopeLink]:
    """Rotate-half or interleaved RoPE, full or partial (``cat(rope(x[..., :r]), x[..., r:])``)."""
    if is_call(node, aten.cat.default) and len(node.args[0]) == 2:
        ndim = len(val(node).shape)
        dim = node.args[1] if len(node.args) > 1 else 0
        rope_part, pass_part = node.args[0]
        inner = _full_rope(strip_casts(rope_part)) if dim % ndim == ndim - 1 else None
        rng, pas = (_last_dim_range(inner.input), _last_dim_range(pass_part)) if inner is not None else (None, None)
        if rng is not None and pas is not None and rng[0] is pas[0]:
            x, rot = rng[0], inner.rot_dim
            full = concrete_shape(x)[-1]
            if rng[1:] == (0, rot) and pas[1:] == (rot, full):
                return RopeLink(node, x, inner.cos, inner.sin, inner.style, rot)
        return None
    return _full_rope(node)


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
