"""Rotary coefficients for every cached slot, derived from the graph's own RoPE sub-graph.

The decode graph holds cos/sin only for the tokens of the current step, but rebuilt keys
must be rotated at the position of every cached slot. We never parse ``inv_freq`` or assume
a formula: the model's own sub-graph from integer positions through its RoPE region is
evaluated once, at rewrite time, on positions ``0..S_max-1`` to give tables ``[S_max, rot]``
(the model's values, whatever its scaling: linear, NTK, YaRN, ...). At run time
the positions of the new tokens are written into a small slot-indexed position cache, and
the table is gathered at those positions. Left padding and position offsets are exact.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable, Optional

import torch
import torch.fx as fx

from palu_fx.passes.find import AttentionSite, SiteError
from palu_fx.passes.fx_utils import NodeBuilder, aten, concrete_shape, evaluate, is_call, upper_bound, val
from palu_fx.kernels.latent_attention.naive import ROPE_HALF
from palu_fx.passes.rope import sign_pattern
from palu_fx.passes.value_key import ValueKeys

_INT = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def position_source(link) -> fx.Node:
    """The integer position ids the RoPE coefficients are computed from."""
    found = {_nearest_int(c) for c in link.coefficients}
    if len(found) != 1 or None in found:
        raise SiteError("RoPE coefficients are not computed from one tensor of integer positions")
    return found.pop()


def _nearest_int(node: fx.Node) -> Optional[fx.Node]:
    seen, queue = {node}, deque([node])
    while queue:
        n = queue.popleft()
        v = val(n)
        if isinstance(v, torch.Tensor) and v.dtype in _INT and v.dim() > 0:
            return n
        for i in n.all_input_nodes:
            if i not in seen:
                seen.add(i)
                queue.append(i)
    return None


_REVIEWS = {aten.unsqueeze.default, aten.expand.default, aten.view.default, aten.reshape.default,
            aten.to.dtype, aten._to_copy.default, aten.alias.default, aten.clone.default}


def _root(node: fx.Node) -> fx.Node:
    """The tensor a coefficient input merely re-views or re-types."""
    while is_call(node, _REVIEWS):
        node = node.args[0]
    return node


def rope_axes(site: AttentionSite) -> tuple[int, int, int]:
    """(batch, seq, head) axes of the tensor RoPE is applied to."""
    probe = site.key.rope_probe
    nd = len(probe.shape)

    def varying(t):
        for a in range(nd - 1):
            if t.shape[a] > 1 and not torch.equal(t, t.narrow(a, 0, 1).expand_as(t)):
                return a
        return None

    b, s, h = varying(probe.bidx), varying(probe.sidx), varying(probe.feat)
    rest = [a for a in range(nd - 1) if a not in (b, s, h)]
    b = b if b is not None else rest.pop(0)
    s = s if s is not None else rest.pop(0)
    h = h if h is not None else rest.pop(0)
    return b, s, h


def _seq_layout(pos: fx.Node, seq_len: int) -> int:
    """Rows of a position tensor holding ``seq_len`` positions per row."""
    shp = concrete_shape(pos)
    axes = [a for a, n in enumerate(shp) if n == seq_len]
    if not axes or any(n != 1 for n in shp[axes[-1] + 1:]):
        raise SiteError(f"cannot tell the sequence axis of position ids shaped {list(shp)}")
    rows = 1
    for n in shp[: axes[-1]]:
        rows *= n
    return rows


# elements of the probe batch one vectorized evaluation may hold (per region input)
_PROBE_ELEMENTS = 1 << 24


def _map_probes(fn: Callable[[torch.Tensor], torch.Tensor], probes: torch.Tensor, elements: int) -> torch.Tensor:
    """``torch.stack([fn(p) for p in probes])``, vectorized with ``vmap`` where it gives the
    same values.

    A decode graph computes RoPE for one position at a time, so a table of S_max rows is
    S_max evaluations of the region: minutes of Python for 16k slots. ``vmap`` evaluates a
    chunk of positions at once. The first probe is checked against a plain evaluation (bit
    for bit) and any failure (an op without a batching rule, a higher-order op) falls back
    to the loop.
    """
    first = fn(probes[0])
    chunk = max(1, _PROBE_ELEMENTS // max(1, elements))
    try:
        batched = torch.func.vmap(fn)
        out = torch.cat([batched(probes[i:i + chunk]) for i in range(0, len(probes), chunk)])
        if torch.equal(out[0], first):
            return out
    except Exception:  # noqa: BLE001 - any vmap limitation: use the exact loop below
        pass
    return torch.stack([first] + [fn(p) for p in probes[1:]])


def rotary_table(site: AttentionSite, n_positions: int, leaf: Callable[[fx.Node], torch.Tensor]):
    """``(cos, sin)`` tables ``[n_positions, rot]`` read off the model's own RoPE region.

    With ``x = m`` (1 where a dim's cos multiplies x itself) the region returns cos there and
    sin on the partner dims; with ``x = 1 - m`` the other way round (sin negated). Products
    with 0/1 and sums with 0 are exact, so the table holds the model's values bit for bit.
    """
    link = site.key.rope
    pos = position_source(link)
    xshape = concrete_shape(link.input)
    b_ax, s_ax, h_ax = rope_axes(site)
    seq_len, D, rot = xshape[s_ax], xshape[-1], link.rot_dim
    rows = _seq_layout(pos, seq_len)
    dev = val(link.input).device
    m = sign_pattern(link.style, rot, D) > 0
    dt = val(link.input).dtype
    xm = m.to(dev, dt).expand(xshape).contiguous()
    xn = (~m).to(dev, dt).expand(xshape).contiguous()
    perm = [0] + [1 + a for a in (b_ax, s_ax, h_ax, len(xshape) - 1)]
    # one probe per ``seq_len`` positions: [steps, *positions' shape]
    probes = torch.arange(0, -(-n_positions // seq_len) * seq_len, dtype=val(pos).dtype,
                          device=val(pos).device).view(-1, 1, seq_len).expand(-1, rows, -1)
    probes = probes.reshape(-1, *concrete_shape(pos))
    om, on = (_map_probes(lambda p, x=x: evaluate([link.output], {pos: p, link.input: x}, leaf)[0], probes,
                          x.numel()).permute(perm) for x in (xm, xn))
    if not (torch.equal(om, om[:, :1, :, :1].expand_as(om)) and torch.equal(on, on[:, :1, :, :1].expand_as(on))):
        raise SiteError("RoPE coefficients differ between heads")
    om, on = om[:, 0, :, 0, :rot].reshape(-1, rot).float(), on[:, 0, :, 0, :rot].reshape(-1, rot).float()
    mm = m[:rot].to(dev)
    cos, sin = torch.where(mm, om, on), torch.where(mm, -on, om)
    cos, sin = cos[:n_positions].contiguous(), sin[:n_positions].contiguous()
    # The kernels read one angle per rotated pair; every real RoPE shares it between partners.
    for t in (cos, sin):
        a, b = (t[:, : rot // 2], t[:, rot // 2:]) if link.style == ROPE_HALF else (t[:, 0::2], t[:, 1::2])
        if not torch.equal(a, b):
            raise SiteError("RoPE rotates the two members of a pair by different angles")
    # The values were computed in the model's dtype, so storing them in it loses nothing,
    # while a float32 table would double what the decode kernels stream per cached slot
    # (every (batch, group) program reads the slot's rotary pairs: as many bytes as the
    # latents of a group-size-1 head of dim 128).
    return cos.to(dt), sin.to(dt)


class RotaryCaches:
    """Tables (one per RoPE sub-graph) and position caches (one per positions/write index)."""

    def __init__(self, editor):
        self.editor = editor
        self.tables: dict = {}
        self.positions: dict = {}
        self.gathered: dict = {}
        self._keys: ValueKeys | None = None

    def value_key(self, node: fx.Node):
        if self._keys is None:  # built on the graph as it is before the first rewrite
            self._keys = ValueKeys(node.graph)
        return self._keys(node)

    def coefficients(self, b: NodeBuilder, site: AttentionSite) -> tuple[fx.Node, fx.Node, int, int]:
        """(cos, sin) ``[B or 1, S_kv, rot]`` for every key the attention reads, the bytes of
        the position cache, the bytes of new tables."""
        rope, cache = site.key.rope, site.key_cache
        pos = position_source(rope)
        if cache is not None:
            n = cache.full_shape[cache.dim]
            pos_node, cache_bytes = self._position_cache(b, site, pos, cache, n)
            if cache.read_end is not None:
                pos_node = b.call(aten.slice.Tensor, pos_node, 1, 0, cache.read_end)
        else:
            n = upper_bound(val(rope.input).shape[rope_axes(site)[1]])
            seq_len = concrete_shape(rope.input)[rope_axes(site)[1]]
            pos_node, cache_bytes = b.call(aten.reshape.default, pos, [_seq_layout(pos, seq_len), -1]), 0
        # layers apply the same cos/sin (re-viewed per layer): one table serves them all
        key = (tuple(sorted(_root(c).name for c in rope.coefficients)), rope.style, rope.rot_dim, n)
        table_bytes = 0
        if key not in self.tables:
            cos, sin = rotary_table(site, n, self.editor.tensor)
            k = len(self.tables)
            self.tables[key] = (self.editor.add_param(f"palu_rope_cos_{k}", cos),
                                self.editor.add_param(f"palu_rope_sin_{k}", sin))
            table_bytes = 2 * cos.numel() * cos.element_size()
        gkey = (key, pos_node)
        if gkey not in self.gathered:
            self.gathered[gkey] = tuple(b.call(aten.embedding.default, t, pos_node) for t in self.tables[key])
        cos, sin = self.gathered[gkey]
        return cos, sin, cache_bytes, table_bytes

    def _position_cache(self, b, site, pos, cache, smax) -> tuple[fx.Node, int]:
        # A LatentCache's slot positions are one buffer shared by all its layers, which
        # advance together: the first layer's write serves every layer (and so does the
        # gather of the rotary tables at those positions, keyed by the written node).
        # In a program, every layer's static cache has its own write index node; when they
        # provably hold the same value (``ValueKeys``) the layers share one position cache.
        key = ("shared", cache.positions, pos, smax) if cache.positions is not None else \
            (self.value_key(pos), self.value_key(cache.index), smax)
        if key in self.positions:
            return self.positions[key], 0
        seq_len = concrete_shape(site.key.rope.input)[rope_axes(site)[1]]
        rows = _seq_layout(pos, seq_len)
        if cache.positions is not None:  # a LatentCache brings its own position buffer
            buf = cache.positions
            nbytes = math.prod(concrete_shape(buf)) * val(buf).element_size()
            if concrete_shape(buf)[0] != rows and rows != 1:
                raise SiteError("the LatentCache position buffer does not match the positions' batch")
        else:
            buf = self.editor.add_buffer(f"palu_positions_{len(self.positions)}",
                                         torch.zeros(rows, smax, dtype=torch.int64, device=val(pos).device))
            nbytes = rows * smax * 8
        flat = b.call(aten.reshape.default, pos, [rows, -1])
        if val(flat).dtype != torch.int64:
            flat = b.call(aten._to_copy.default, flat, dtype=torch.int64)
        if rows == 1 and concrete_shape(buf)[0] > 1:
            flat = b.call(aten.expand.default, flat, [concrete_shape(buf)[0], -1])
        written = b.call(aten.index_copy_.default, buf, 1, cache.index, flat)
        self.positions[key] = written
        return written, nbytes
