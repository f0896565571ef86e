"""Structural value keys: two graph nodes with the same key hold the same value whenever
the graph runs, so one computation (or one cache of it) can serve both.

Used for the write index of each layer's KV cache: every layer of a transformers static
cache keeps its own counter buffer, and its write index is spelled, per layer,
``arange(n) + copy_(counter_i, cache_position[0])`` (the counter is then advanced in
place, after the index is formed). ``copy_`` returns its source whatever the counter held
before, so every layer's index gets one key and the layers can share one slot-position
cache.

Sound by construction: a key is the op, its non-tensor arguments and the keys of its tensor
arguments, bottoming out at graph inputs by identity. Mutable state is where structure
stops telling the value, so a node gets a key of its own (it equals nothing else) when:

* it is random, or writes in place (``copy_`` excepted: its value is its source);
* it reads a tensor whose storage (alias group) the graph writes *before* it, unless the
  only such write is the ``copy_`` that defines what it reads. Writes after it do not change
  what it read: the graph runs in order.
"""
from __future__ import annotations

from typing import Any, Hashable

import torch
import torch.fx as fx

__all__ = ["ValueKeys"]

aten = torch.ops.aten
_COPY = aten.copy_.default
_CASTS = {aten.to.dtype_layout, aten.to.dtype, aten._to_copy.default, aten.to.device}


def _alias_args(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(arguments ``node`` writes, arguments its result may alias), from the op schema."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return [], []
    ret = schema.returns[0].alias_info if schema.returns else None
    writes, aliases = [], []
    for i, a in enumerate(schema.arguments):
        info = a.alias_info
        arg = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
        if info is None or not isinstance(arg, fx.Node):
            continue
        if info.is_write:
            writes.append(arg)
        if ret is not None and set(info.before_set) & set(ret.before_set):
            aliases.append(arg)
    return writes, aliases


class ValueKeys:
    """Memoized structural keys of the nodes of one graph (taken as the graph is now)."""

    def __init__(self, graph: fx.Graph, max_depth: int = 64):
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.parent: dict[fx.Node, fx.Node] = {}  # alias groups (union-find)
        self.alias_of: dict[fx.Node, fx.Node] = {}  # node -> the argument its result aliases
        writers: list[tuple[fx.Node, fx.Node]] = []
        for n in graph.nodes:
            writes, aliases = _alias_args(n)
            for a in aliases:
                self._union(n, a)
                self.alias_of.setdefault(n, a)
            writers += [(n, w) for w in writes]
        self.writers: dict[fx.Node, list[fx.Node]] = {}
        for n, w in writers:
            self.writers.setdefault(self._find(w), []).append(n)
        self.max_depth = max_depth
        self.memo: dict[fx.Node, Hashable] = {}

    def _find(self, n: fx.Node) -> fx.Node:
        while n in self.parent:
            n = self.parent[n]
        return n

    def _union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra is not rb:
            self.parent[ra] = rb

    def __call__(self, node: Any, depth: int = 0) -> Hashable:
        if not isinstance(node, fx.Node):
            return self._plain(node, depth)
        if node not in self.memo:
            self.memo[node] = self._key(node, depth)
        return self.memo[node]

    def _plain(self, x: Any, depth: int) -> Hashable:
        if isinstance(x, (list, tuple)):
            return tuple(self(a, depth) for a in x)
        if isinstance(x, dict):
            return tuple(sorted((k, self(v, depth)) for k, v in x.items()))
        try:
            hash(x)
            return ("const", type(x).__name__, x)
        except TypeError:
            return ("unhashable", id(x))

    def _stable_read(self, reader: fx.Node, a: fx.Node) -> bool:
        """Whether ``a`` holds, when ``reader`` runs, the value its key describes."""
        before = [w for w in self.writers.get(self._find(a), ()) if self.order[w] < self.order[reader]]
        if not before:
            return True
        if len(before) != 1 or before[0].target is not _COPY:
            return False
        x = a  # a must be that copy_ or a view of it
        while x is not before[0] and x in self.alias_of:
            x = self.alias_of[x]
        return x is before[0]

    def _key(self, node: fx.Node, depth: int) -> Hashable:
        unique = ("node", node)
        if node.op in ("placeholder", "get_attr"):
            return ("input", node)  # reads of it are checked by their readers
        if node.op != "call_function" or depth > self.max_depth:
            return unique
        if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
            return unique
        if node.target is _COPY:  # copy_(dst, src) holds src in dst's dtype and shape
            dst, src = node.args[0].meta.get("val"), node.args[1]
            if dst is None or not isinstance(src, fx.Node) or not self._stable_read(node, src):
                return unique
            return ("copy", dst.dtype, tuple(dst.shape), self(src, depth + 1))
        if _alias_args(node)[0]:  # any other in-place op: its value depends on what it overwrote
            return unique
        if not all(self._stable_read(node, a) for a in node.all_input_nodes):
            return unique
        if node.target in _CASTS:  # a cast to what the value already is
            src, out = node.args[0], node.meta.get("val")
            inp = src.meta.get("val") if isinstance(src, fx.Node) else None
            if inp is not None and out is not None and (inp.dtype, inp.device, inp.shape) == (
                    out.dtype, out.device, out.shape):
                return self(src, depth + 1)
        return (node.target, self(node.args, depth + 1), self(node.kwargs, depth + 1))
