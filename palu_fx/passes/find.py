"""The site finder: from each attention op back to its K and V projections.

A use-def walk anchored at every attention op (attention.py) follows the key and value
inputs back through GQA expansion, the KV-cache write, RoPE, k-norm and layout ops to a
projection of the hidden state. Each link is a small recognizer (recognize.py, layout.py);
nothing here knows a model or module name. The result is a typed ``AttentionSite`` per
explained attention op and an ``Unsupported`` with a reason for every other one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from palu_fx.passes.attention import AttentionCall, Unsupported, find_attention_calls
from palu_fx import ops as _ops  # noqa: F401  (palu::cache_update must exist)
from palu_fx.passes.fx_utils import CAST_OPS, aten, concrete, concrete_shape, getitem_parent, is_call, val
from palu_fx.passes.layout import (
    LayoutError, Probe, head_rows, is_layout_step, last_dim_rows, replay, start_probe, step_input,
)
from palu_fx.passes.recognize import NormLink, match_rms_norm, strip_casts
from palu_fx.passes.rope import RopeLink, match_rope

WRITE_OPS = {aten.index_copy_.default, aten.index_copy.default, aten.index_put_.default, aten.index_put.default}
CACHE_UPDATE_OPS = {torch.ops.palu.cache_update.default}


class SiteError(ValueError):
    """Why an attention op cannot be compressed (becomes an ``Unsupported`` reason)."""


@dataclass
class Projection:
    """``output = input @ W^T + bias`` with ``output`` shaped ``[B, S, F]``."""

    output: fx.Node
    input: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]
    transposed: bool  # weight stored [in, out] (Conv1D / addmm with the raw parameter)


@dataclass
class Chain:
    """A projection and what happens to it until the cache (or the attention op)."""

    proj: Projection
    rows: torch.Tensor  # [H, D] projection row feeding (head, dim)
    rope: Optional[RopeLink] = None
    rope_probe: Optional[Probe] = None  # index probe at the rope input (for cos/sin axes)
    norm: Optional[NormLink] = None


@dataclass
class CacheWrite:
    write: fx.Node  # the in-place write node (its output is the updated cache)
    buffer: fx.Node  # the cache placeholder (or the latent buffer of a LatentCache)
    dim: int  # sequence dim of the full-shaped cache
    index: fx.Node
    value: fx.Node
    full: Optional[fx.Node] = None  # LatentCache: the full-shaped keys/values the op returns
    positions: Optional[fx.Node] = None  # LatentCache: its slot-position buffer
    read_end: object = None  # the attention reads slots [0, read_end) (None: all of them)

    @property
    def latent(self) -> bool:
        return self.full is not None

    @property
    def full_shape(self) -> tuple:
        return concrete_shape(self.full if self.full is not None else self.buffer)


@dataclass
class AttentionSite:
    index: int
    call: AttentionCall
    key: Chain
    value: Chain
    key_cache: Optional[CacheWrite]
    value_cache: Optional[CacheWrite]
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    notes: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"attn{self.index}"

    @property
    def rope_kind(self) -> str:
        r = self.key.rope
        if r is None:
            return "none"
        kind = {1: "rotate-half", 2: "interleaved"}[r.style]
        return kind if r.rot_dim == self.head_dim else f"{kind} (partial {r.rot_dim}/{self.head_dim})"


# --------------------------------------------------------------------------- projections
def _param(node) -> Optional[fx.Node]:
    node = strip_casts(node) if isinstance(node, fx.Node) else node
    if isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr"):
        return node
    return None


def match_projection(node: fx.Node, is_weight: Callable[[fx.Node], bool]) -> Optional[Projection]:
    if is_call(node, aten.linear.default):
        w = _param(node.args[1])
        b = node.args[2] if len(node.args) > 2 else None
        if w is not None and is_weight(w) and (b is None or _param(b) is not None):
            return Projection(node, node.args[0], w, _param(b) if b is not None else None, False)
    # addmm on flattened tokens, viewed back: Conv1D (weight [in, out]) or a decomposed linear.
    if is_call(node, {aten.view.default, aten.reshape.default, aten._unsafe_view.default}):
        mm = node.args[0]
        if is_call(mm, {aten.addmm.default, aten.mm.default}) and len(val(node).shape) == 3:
            bias, x2, w = (mm.args if mm.target == aten.addmm.default else (None, *mm.args))
            if is_call(x2, {aten.view.default, aten.reshape.default, aten._unsafe_view.default}):
                x3 = x2.args[0]
                transposed = True
                if is_call(w, {aten.t.default, aten.permute.default, aten.transpose.int}):
                    w, transposed = w.args[0], False
                w = _param(w)
                if w is not None and is_weight(w) and (bias is None or _param(bias) is not None) and len(val(x3).shape) == 3:
                    return Projection(node, x3, w, _param(bias) if bias is not None else None, transposed)
    return None


# --------------------------------------------------------------------------- chains
def trace_chain(start: fx.Node, allow_transforms: bool, is_weight, what: str, is_data) -> tuple[Projection, list]:
    """Walk back from ``start`` to a projection; returns it and the links in forward order."""
    steps: list = []
    cur = start
    for _ in range(200):
        proj = match_projection(cur, is_weight)
        if proj is not None:
            steps.reverse()
            return proj, steps
        # RoPE first: its region may end in a layout op (interleaved pairs: stack + flatten)
        link = match_rms_norm(cur) or match_rope(cur, is_data)
        if link is None and (is_layout_step(cur) or is_call(cur, CAST_OPS)):
            steps.append(cur)
            cur = step_input(cur)
            continue
        if link is not None:
            if not allow_transforms:
                raise SiteError(f"{what} pass through {'RoPE' if isinstance(link, RopeLink) else 'a norm'} before the "
                                "cache; only layout ops can be folded on this path")
            steps.append(link)
            cur = link.input
            continue
        if cur.op == "placeholder":
            raise SiteError(f"{what} are not a projection of the hidden state (they come from input '{cur.name}')")
        raise SiteError(f"unsupported op between the {what[:-1]} projection and the attention: "
                        f"{getattr(cur.target, '__name__', cur.target)} ({cur.name})")
    raise SiteError(f"{what}: chain too long")


def replay_chain(proj: Projection, steps: list, batch_axis: int, seq_axis: int, allow_repeat: bool,
                 ndim: int = 4) -> Chain:
    probe = start_probe(concrete_shape(proj.output))
    rope = norm = rope_probe = None
    marks = []
    for step in steps:
        if isinstance(step, RopeLink):
            rope, rope_probe = step, probe
            marks.append(("RoPE", probe))
        elif isinstance(step, NormLink):
            if norm is not None:
                raise SiteError("two norms on the key path")
            if rope is not None and step.weight is not None:
                # the kernel normalizes, then rotates; a weighted norm does not commute with RoPE
                raise SiteError("k-norm with a weight is applied after RoPE (the latent op norms before rotating)")
            norm = step
            marks.append(("k-norm", probe))
        else:
            probe = replay(step, probe)
    if len(probe.shape) < ndim:  # index_put broadcasts a value with fewer (leading) dims
        probe = probe.map(lambda t: t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape)))
    if len(probe.shape) != 4:
        raise SiteError(f"the cached tensor has {len(probe.shape)} dims; expected [batch, heads, seq, head_dim] "
                        "in some order")
    head_axis = ({0, 1, 2, 3} - {batch_axis, seq_axis, 3}).pop()
    try:
        rows = _rows(probe, batch_axis, head_axis, seq_axis, allow_repeat)
    except LayoutError as e:
        raise SiteError(str(e)) from None
    head_set = {tuple(r) for r in rows.tolist()}
    for what, p in marks:
        if p.shape[-1] != rows.shape[1] or last_dim_rows(p) != head_set:
            raise SiteError(f"{what} acts on {p.shape[-1]} features that are not one head of "
                            f"{rows.shape[1]} (not a per-head transform)")
    return Chain(proj, rows, rope, rope_probe, norm)


def _rows(probe, batch_axis, head_axis, seq_axis, allow_repeat) -> torch.Tensor:
    if not allow_repeat:
        return head_rows(probe, batch_axis, head_axis, seq_axis, 3)
    # Without a cache the attention input may already be GQA-expanded: [Hq, D] rows where
    # query head h reads KV head h // n_rep. Undo the expansion.
    perm = (batch_axis, seq_axis, head_axis, 3)
    feat = probe.feat.permute(perm)
    heads = feat[0, 0]
    first = [0] + [h for h in range(1, heads.shape[0]) if not torch.equal(heads[h], heads[h - 1])]
    n_rep = heads.shape[0] // len(first)
    if n_rep * len(first) != heads.shape[0] or not torch.equal(heads, heads[first].repeat_interleave(n_rep, 0)):
        raise LayoutError("keys are repeated across query heads in a pattern other than GQA (h // n_rep)")
    dedup = Probe(*(t.index_select(head_axis, torch.tensor(first)) for t in (probe.feat, probe.bidx, probe.sidx)))
    return head_rows(dedup, batch_axis, head_axis, seq_axis, 3)


# --------------------------------------------------------------------------- the cache
def _write_of(node: fx.Node) -> Optional[fx.Node]:
    if is_call(node, WRITE_OPS):
        return node
    if node.op == "placeholder":
        writes = [u for u in node.users if is_call(u, WRITE_OPS) and u.args[0] is node]
        if len(writes) > 1:
            raise SiteError(f"cache '{node.name}' is written {len(writes)} times in one step")
        return writes[0] if writes else None
    return None


def trace_cache(attn_input: fx.Node) -> tuple[Optional[CacheWrite], list]:
    """Follow an attention K/V input back through GQA expansion to a cache write."""
    steps, cur = [], attn_input
    while is_layout_step(cur) or is_call(cur, CAST_OPS):
        steps.append(cur)
        cur = step_input(cur)
    if is_call(cur, aten.cat.default):
        raise SiteError("the cache grows by concatenation (dynamic cache); export with a static cache")
    parent = getitem_parent(cur)
    if parent is not None and is_call(parent[0], CACHE_UPDATE_OPS):
        # a LatentCache layer: the op hands back full-shaped K/V; its buffers are already latent
        op, i = parent
        steps.reverse()
        return CacheWrite(op, op.args[i], 2, op.args[5], op.args[3 + i], full=cur, positions=op.args[2]), steps
    write = _write_of(cur)
    if write is None:
        return None, []
    buf = write.args[0]
    if buf.op != "placeholder":
        raise SiteError("the cache written is not a program buffer")
    if write.target in (aten.index_put_.default, aten.index_put.default):
        idx = [i for i, t in enumerate(write.args[1]) if t is not None]
        if len(idx) != 1 or (len(write.args) > 3 and write.args[3]):
            raise SiteError("cache write indexes more than one dim (or accumulates)")
        dim, index, value = idx[0], write.args[1][idx[0]], write.args[2]
    else:
        dim, index, value = write.args[1], write.args[2], write.args[3]
    dim = dim % len(val(buf).shape)
    if len(val(buf).shape) != 4 or dim not in (1, 2):
        raise SiteError(f"cache of shape {list(val(buf).shape)} written along dim {dim} is not a per-head KV cache")
    steps.reverse()
    return CacheWrite(write, buf, dim, index, value), steps


def _step_key(steps: list, sources: set) -> tuple:
    """What the layout steps do, independent of which layer's nodes carry them: each step's
    target and arguments, with the tensor flowing along the chain replaced by a marker (other
    node arguments, e.g. a symbolic read end, keep their identity)."""
    chain = {*sources, *steps}

    def norm(a):
        if isinstance(a, fx.Node):
            return "<chain>" if a in chain else a
        if isinstance(a, (list, tuple)):
            return tuple(norm(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, norm(v)) for k, v in a.items()))
        return a

    return tuple((s.target, norm(s.args), norm(dict(s.kwargs))) for s in steps)


def check_expansion(cache: CacheWrite, steps: list, num_q_heads: int, verdicts: dict) -> None:
    """The layout steps from cache to attention are GQA expansion (q head h -> kv h // n_rep),
    optionally reading only the first slots (``cache[:, :, :end]``, recorded as ``read_end``).

    ``verdicts`` (one dict per graph) remembers the outcome per distinct layout: every layer
    repeats the same steps, and each check replays index probes of the full cache shape
    (gigabytes for a 7B model at batch 8 and 16k slots).
    """
    key = (tuple(cache.full_shape), cache.dim, cache.read_end, num_q_heads,
           _step_key(steps, {cache.write, cache.buffer, cache.full}))
    try:
        hit = verdicts.get(key)
    except TypeError:  # an unhashable argument: check without remembering
        _check_expansion(cache, steps, num_q_heads)
        return
    if hit is None:
        try:
            _check_expansion(cache, steps, num_q_heads)
        except SiteError as e:
            verdicts[key] = (cache.read_end, str(e))
            raise
        verdicts[key] = (cache.read_end, None)
        return
    read_end, error = hit
    if error is not None:
        raise SiteError(error)
    cache.read_end = read_end


def _check_expansion(cache: CacheWrite, steps: list, num_q_heads: int) -> None:
    shp = cache.full_shape
    seq, head = cache.dim, 3 - cache.dim
    idx = [torch.arange(n).view([-1 if a == i else 1 for a in range(4)]).expand(shp).clone() for i, n in enumerate(shp)]
    probe = Probe(idx[head], idx[seq], idx[3])
    for s in steps:
        if is_call(s, aten.slice.Tensor) and _varies(probe.bidx, s.args[1]):
            start = s.args[2] if len(s.args) > 2 else 0
            step = s.args[4] if len(s.args) > 4 else 1
            if start != 0 or step != 1 or cache.read_end is not None:
                raise SiteError("the attention reads a strided or offset window of the cache")
            cache.read_end = s.args[3] if len(s.args) > 3 else None
        probe = replay(s, probe)
    if len(probe.shape) != 4:
        raise SiteError("the attention does not read the cache as [batch, heads, seq, head_dim]")
    Hq, S, D = probe.shape[1:]
    Hkv = shp[head]
    full = shp[seq] if cache.read_end is None else min(shp[seq], concrete(cache.read_end))
    if D != shp[3] or S != full:
        raise SiteError("the attention reads part of the cache in a way palu-fx cannot follow")
    n_rep = Hq // Hkv if Hq % Hkv == 0 else 0
    expect_h = (torch.arange(Hq) // max(n_rep, 1)).view(1, Hq, 1, 1)
    ok = (n_rep > 0 and torch.equal(probe.feat, expect_h.expand_as(probe.feat))
          and torch.equal(probe.bidx, torch.arange(S).view(1, 1, S, 1).expand_as(probe.bidx))
          and torch.equal(probe.sidx, torch.arange(D).view(1, 1, 1, D).expand_as(probe.sidx)))
    if not ok:
        raise SiteError("the cache reaches the attention through something other than GQA expansion")


def _varies(t: torch.Tensor, dim) -> bool:
    if not isinstance(dim, int) or t.shape[dim % t.dim()] < 2:
        return False
    d = dim % t.dim()
    return not torch.equal(t, t.narrow(d, 0, 1).expand_as(t))


# --------------------------------------------------------------------------- sites
def _site(index: int, call: AttentionCall, is_weight, is_data, sources, verdicts: dict) -> AttentionSite:
    qv = val(call.q)
    if len(qv.shape) != 4:
        raise SiteError(f"queries have shape {list(qv.shape)}; expected [batch, heads, seq, head_dim]")
    Hq, D = int(qv.shape[1]), int(qv.shape[-1])
    chains, caches = {}, {}
    for role, node in (("keys", call.k), ("values", call.v)):
        cache, steps = trace_cache(node)
        if cache is not None:
            check_expansion(cache, steps, Hq, verdicts)
            proj, links = trace_chain(cache.value, role == "keys", is_weight, role, is_data)
            chain = replay_chain(proj, links, 0, cache.dim, allow_repeat=False, ndim=len(cache.full_shape))
        else:
            proj, links = trace_chain(node, role == "keys", is_weight, role, is_data)
            chain = replay_chain(proj, links, 0, 2, allow_repeat=True)
        if not sources(proj.input) <= sources(call.q):
            extra = sorted(n.name for n in sources(proj.input) - sources(call.q))
            raise SiteError(f"{role} are a projection of {extra}, which the queries do not see: not self-attention "
                            "over the hidden state (cross-attention?)")
        chains[role], caches[role] = chain, cache
    k, v = chains["keys"], chains["values"]
    Hkv, Dk = k.rows.shape
    if Dk != D:
        raise SiteError(f"key head dim {Dk} differs from query head dim {D}")
    if v.rows.shape[0] != Hkv:
        raise SiteError(f"{Hkv} key heads but {v.rows.shape[0]} value heads")
    if Hq % Hkv:
        raise SiteError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    if (caches["keys"] is None) != (caches["values"] is None):
        raise SiteError("keys and values are not both cached")
    return AttentionSite(index, call, k, v, caches["keys"], caches["values"], Hq, Hkv, D, int(v.rows.shape[1]))


def data_dependence(graph: fx.Graph, is_weight) -> Callable[[fx.Node], bool]:
    """Whether a node depends on model weights (hidden states do; positions, masks and
    rotary coefficients do not)."""
    data: dict[fx.Node, bool] = {}
    for n in graph.nodes:
        data[n] = (n.op == "placeholder" and is_weight(n)) or any(data.get(i, False) for i in n.all_input_nodes)
    return lambda n: data.get(n, False)


def input_sources(graph: fx.Graph, is_weight) -> Callable[[fx.Node], frozenset]:
    """The non-weight placeholders (inputs, buffers) each node depends on."""
    src: dict[fx.Node, frozenset] = {}
    empty: frozenset = frozenset()
    for n in graph.nodes:
        if n.op == "placeholder":
            src[n] = empty if is_weight(n) else frozenset([n])
        else:
            ins = [src.get(i, empty) for i in n.all_input_nodes]
            src[n] = frozenset().union(*ins) if ins else empty
    return lambda n: src.get(n, empty)


def find_sites(graph: fx.Graph, leaf, is_weight) -> tuple[list[AttentionSite], list[Unsupported]]:
    """All attention sites of ``graph`` and the attention ops left alone (with reasons).

    ``leaf(node)`` returns the real tensor of a parameter/buffer placeholder;
    ``is_weight(node)`` says whether a placeholder is a parameter (a foldable weight).
    """
    sites, skipped = [], []
    is_data = data_dependence(graph, is_weight)
    sources = input_sources(graph, is_weight)
    verdicts: dict = {}
    for call in find_attention_calls(graph, leaf):
        if isinstance(call, Unsupported):
            skipped.append(call)
            continue
        try:
            sites.append(_site(len(sites), call, is_weight, is_data, sources, verdicts))
        except SiteError as e:
            skipped.append(Unsupported(call.output, str(e)))
    return sites, skipped


__all__ = ["AttentionSite", "Chain", "CacheWrite", "Projection", "SiteError", "find_sites", "Unsupported"]
