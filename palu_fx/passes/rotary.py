"""Rotary coefficients for every cached slot, derived from the graph's own RoPE sub-graph.

The decode graph holds cos/sin only for the tokens of the current step, but rebuilt keys
must be rotated at the position of every cached slot. We never parse ``inv_freq`` or assume
a formula: the sub-graph that turns the integer positions into cos (or sin) is evaluated
once, at rewrite time, on positions ``0..S_max-1`` to give a table ``[S_max, rot]`` (the
model's own values, bit for bit, whatever its scaling: linear, NTK, YaRN, ...). At run time
the positions of the new tokens are written into a small slot-indexed position cache, and
the table is gathered at those positions. Left padding and position offsets are exact.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Optional

import torch
import torch.fx as fx

from palu_fx.passes.find import AttentionSite, SiteError
from palu_fx.passes.fx_utils import CAST_OPS, NodeBuilder, aten, concrete_shape, evaluate, is_call, val

_REVIEW_OPS = {aten.unsqueeze.default, aten.expand.default, aten.view.default} | CAST_OPS
_INT = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def position_source(coeff: fx.Node) -> fx.Node:
    """The integer tensor nearest to ``coeff`` among its ancestors: the position ids."""
    seen, queue = {coeff}, deque([coeff])
    while queue:
        n = queue.popleft()
        v = val(n)
        if isinstance(v, torch.Tensor) and v.dtype in _INT and v.numel() > 0:
            return n
        for i in n.all_input_nodes:
            if i not in seen:
                seen.add(i)
                queue.append(i)
    raise SiteError("RoPE coefficients do not depend on integer positions")


def _seq_layout(pos: fx.Node, seq_len: int) -> tuple[int, int]:
    """(batch rows, seq axis) of a position tensor with ``seq_len`` positions per row."""
    shp = concrete_shape(pos)
    axes = [a for a, n in enumerate(shp) if n == seq_len]
    if not axes or any(n != 1 for n in shp[axes[-1] + 1:]):
        raise SiteError(f"cannot tell the sequence axis of position ids shaped {list(shp)}")
    rows = 1
    for n in shp[: axes[-1]]:
        rows *= n
    return rows, axes[-1]


def coefficient_axes(site: AttentionSite, cshape: tuple) -> tuple[list[int], int, int]:
    """(permutation to [batch, seq, ..., rot], batch size, seq size) of a cos/sin shape
    right-aligned to the rope input's rank."""
    probe = site.key.rope_probe
    nd = len(probe.shape)
    cshape = (1,) * (nd - len(cshape)) + tuple(cshape)

    def varying(t):
        for a in range(nd - 1):
            if t.shape[a] > 1 and not torch.equal(t, t.narrow(a, 0, 1).expand_as(t)):
                return a
        return None

    b_axis, s_axis = varying(probe.bidx), varying(probe.sidx)
    for a in range(nd - 1):
        if cshape[a] > 1 and a not in (b_axis, s_axis):
            raise SiteError("RoPE coefficients vary along an axis other than batch and sequence")
    rest = [a for a in range(nd - 1) if a not in (b_axis, s_axis)]
    b_axis = b_axis if b_axis is not None else rest.pop(0)
    s_axis = s_axis if s_axis is not None else rest.pop(0)
    if cshape[s_axis] == 1 and probe.shape[s_axis] > 1:
        raise SiteError("RoPE coefficients do not vary with the position")
    return [b_axis, s_axis] + rest + [nd - 1], cshape[b_axis], cshape[s_axis]


def rotary_table(site: AttentionSite, coeff: fx.Node, pos: fx.Node, n_positions: int,
                 leaf: Callable[[fx.Node], torch.Tensor]) -> torch.Tensor:
    """``[n_positions, rot]``: the coefficient the graph computes for each position."""
    perm, _, seq_len = coefficient_axes(site, concrete_shape(coeff))
    rows, _ = _seq_layout(pos, seq_len)
    shp = concrete_shape(pos)
    chunks = []
    for start in range(0, n_positions, seq_len):
        p = torch.arange(start, start + seq_len, dtype=val(pos).dtype).repeat(rows).view(shp)
        (c,) = evaluate([coeff], {pos: p}, leaf)
        nd = len(perm)
        c = c.reshape((1,) * (nd - c.dim()) + tuple(c.shape)).permute(perm)
        chunks.append(c.reshape(c.shape[0], c.shape[1], -1)[0])
    return torch.cat(chunks)[:n_positions].contiguous()


def coefficient_root(node: fx.Node) -> fx.Node:
    """The tensor a cos/sin input re-views (layers sharing a table share one root)."""
    while is_call(node, _REVIEW_OPS) and node.target != aten._assert_tensor_metadata.default:
        node = node.args[0]
    return node


def slot_coefficients(b: NodeBuilder, site: AttentionSite, coeff: fx.Node) -> fx.Node:
    """cos/sin of the current tokens as ``[B or 1, S, rot]`` (the no-cache case)."""
    perm, bsz, _ = coefficient_axes(site, concrete_shape(coeff))
    c = coeff
    for _ in range(len(perm) - len(val(c).shape)):
        c = b.call(aten.unsqueeze.default, c, 0)
    if perm != list(range(len(perm))):
        c = b.call(aten.permute.default, c, perm)
    return b.call(aten.reshape.default, c, [bsz, -1, concrete_shape(coeff)[-1]])


class RotaryCaches:
    """Tables (one per cos/sin sub-graph) and position caches (one per positions/write index)."""

    def __init__(self, editor):
        self.editor = editor
        self.tables: dict = {}
        self.positions: dict = {}
        self.gathered: dict = {}

    def coefficients(self, b: NodeBuilder, site: AttentionSite) -> tuple[fx.Node, fx.Node, int, int]:
        """(cos, sin) for every cached slot ``[B or 1, S_max, rot]``, cache bytes, table bytes."""
        rope, cache = site.key.rope, site.key_cache
        pos = position_source(rope.cos)
        if position_source(rope.sin) is not pos:
            raise SiteError("cos and sin are computed from different positions")
        if cache is None:
            raise SiteError("internal: rotary tables are only needed with a cache")
        smax = concrete_shape(cache.buffer)[cache.dim]
        pos_node, cache_bytes = self._position_cache(b, site, pos, cache, smax)
        out, table_bytes = [], 0
        for coeff in (rope.cos, rope.sin):
            root = coefficient_root(coeff)
            if (root, smax) not in self.tables:
                table = rotary_table(site, coeff, pos, smax, self.editor.tensor)
                self.tables[(root, smax)] = self.editor.add_param(f"palu_rotary_table_{len(self.tables)}", table)
                table_bytes += table.numel() * table.element_size()
            key = (root, pos_node)
            if key not in self.gathered:
                self.gathered[key] = b.call(aten.embedding.default, self.tables[(root, smax)], pos_node)
            out.append(self.gathered[key])
        return out[0], out[1], cache_bytes, table_bytes

    def _position_cache(self, b, site, pos, cache, smax) -> tuple[fx.Node, int]:
        key = (pos, cache.index, smax)
        if key in self.positions:
            return self.positions[key], 0
        _, _, seq_len = coefficient_axes(site, concrete_shape(site.key.rope.cos))
        rows, _ = _seq_layout(pos, seq_len)
        buf = self.editor.add_buffer(f"palu_positions_{len(self.positions)}",
                                     torch.zeros(rows, smax, dtype=torch.int64, device=val(pos).device))
        flat = b.call(aten.reshape.default, pos, [rows, -1])
        if val(flat).dtype != torch.int64:
            flat = b.call(aten._to_copy.default, flat, dtype=torch.int64)
        written = b.call(aten.index_copy_.default, buf, 1, cache.index, flat)
        self.positions[key] = written
        return written, rows * smax * 8
