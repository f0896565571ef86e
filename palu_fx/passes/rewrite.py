"""Graph surgery: sites + a compression plan -> latent projections, latent cache, latent attention.

For each site (all new nodes are inserted just before the attention op):

    hk = x_k @ R_kᵀ                      [B, S, G*rk]   (replaces the K projection)
    hv = x_v @ R_vᵀ                      [B, S, G*rv]
    latent_k.index_copy_(1, pos, hk)     latent cache [B, S_max, G*rk] replaces K's buffer
    latent_v.index_copy_(1, pos, hv)
    cos_cache.index_copy_(1, pos, cos)   RoPE only: the rotary coefficients of each slot,
                                         shared by every layer that uses the same table
    z = palu::latent_attention(q, latent_k, latent_v, L_k, ...)   [B, Hq, Sq, rv]
    z folded into the output projection (rv <= Dv and the graph allows it); else
    out = palu::latent_attention(..., L_v) (+ b_v)  [B, Hq, Sq, Dv] -> old users

Models without RoPE or k-norm absorb ``L_k`` into the query (``q' = q @ L_k``) and attend in
latent space. The old caches, projections and attention nodes become dead and are removed;
the ``StateEditor`` (export or compile flavour) owns placeholders and their tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import itertools
import math
import operator

import sympy
import torch
import torch.fx as fx

from palu_fx.kernels.latent_attention.naive import ROPE_NONE
from palu_fx.passes.find import AttentionSite, SiteError
from palu_fx.passes.fold import fold_value_into_output
from palu_fx.passes.rotary import RotaryCaches
from palu_fx.passes.fx_utils import NodeBuilder, aten, concrete_shape, evaluate, real_users, val
from palu_fx.plan import SitePlan

palu = torch.ops.palu


class StateEditor(Protocol):
    def add_param(self, name: str, tensor: torch.Tensor) -> fx.Node: ...
    def add_buffer(self, name: str, tensor: torch.Tensor) -> fx.Node: ...
    def tensor(self, node: fx.Node) -> torch.Tensor: ...
    def is_param(self, node: fx.Node) -> bool: ...


@dataclass
class SiteResult:
    site: str
    layer: int
    rope: str
    q_heads: int
    kv_heads: int
    group_size: int
    rank_k: int
    rank_v: int
    head_dim: int
    cached: bool
    absorbed: bool
    folded: bool
    bytes_before: int
    bytes_after: int
    table_bytes: int = 0  # constant rotary tables (shared by layers; not per token)
    notes: list = field(default_factory=list)


def _nbytes(v) -> int:
    return v.numel() * v.element_size()


def _per_query_head(L: torch.Tensor, q_heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """``[Hq, D, r]``: the slice of the group factor each query head reads."""
    G, gsD, r = L.shape
    gs = gsD // head_dim
    per_kv = L.view(G, gs, head_dim, r).reshape(kv_heads, head_dim, r)
    return per_kv.repeat_interleave(q_heads // kv_heads, dim=0)


def rewrite_site(graph: fx.Graph, site: AttentionSite, sp: SitePlan, editor: StateEditor,
                 rotary: RotaryCaches, fold: bool, bits: Optional[int] = None,
                 quant_group_size: Optional[int] = None) -> SiteResult:
    call = site.call
    # insert after every input of the old attention (eager masks are built after the score matmul)
    anchor = max(call.nodes, key=lambda n: _order(graph)[n])
    b = NodeBuilder(graph, meta_from=anchor)
    p = site.name
    Hq, Hkv, D, Dv = site.num_q_heads, site.num_kv_heads, site.head_dim, site.v_head_dim
    kf, vf = sp.key, sp.value
    rope, norm = site.key.rope, site.key.norm
    absorbed = rope is None and norm is None and (kf.bias is None or call.softcap == 0)
    dt = val(site.key.proj.output).dtype
    rk_w, rv_w = (f.R.reshape(-1, f.R.shape[-1]).to(dt) for f in (kf, vf))
    # K and V read the same hidden states in most decoders: one product with both down
    # projections side by side. A decode step's projections are weight-bound GEMVs, and two
    # narrow ones ran at about half the bandwidth of one twice as wide (H200, B=8: 6.7 us
    # each for 4096 -> 2048, 7 us for 4096 -> 4096; RESULTS.md).
    shared_input = site.key.proj.input is site.value.proj.input
    with graph.inserting_before(anchor):
        if shared_input:
            Rkv = editor.add_param(f"palu_{p}_kv_down", torch.cat([rk_w, rv_w], 0))
        else:
            Rk = editor.add_param(f"palu_{p}_k_down", rk_w)
            Rv = editor.add_param(f"palu_{p}_v_down", rv_w)
    with graph.inserting_before(anchor):
        if shared_input:
            hkv = b.call(aten.linear.default, site.key.proj.input, Rkv)
            last, ck = val(hkv).dim() - 1, rk_w.shape[0]
            hk = b.call(aten.slice.Tensor, hkv, last, 0, ck)
            hv = b.call(aten.slice.Tensor, hkv, last, ck, ck + rv_w.shape[0])
        else:
            hk = b.call(aten.linear.default, site.key.proj.input, Rk)
            hv = b.call(aten.linear.default, site.value.proj.input, Rv)
        before = after = 0
        quantized: dict = {}
        if bits is not None and site.key_cache is None:
            raise SiteError("quantized latents need a static cache (an exported program's or a LatentCache)")
        if site.key_cache is not None:
            for role, cache, h in (("k", site.key_cache, hk), ("v", site.value_cache, hv)):
                shp = cache.full_shape
                group = quant_group_size or (kf.rank if role == "k" else vf.rank)
                if cache.latent and bits is not None:  # a quantized LatentCache: rows of codes, scales, zeros
                    quantized[role], nbytes = _quantized_row_write(b, p, role, cache, h, bits, group, shp)
                    before += math.prod(shp) * val(h).element_size()
                    after += nbytes
                    continue
                if cache.latent:  # a LatentCache: the caller already allocated the latents
                    buf = cache.buffer
                    if val(buf).dtype == torch.uint8:
                        raise SiteError(f"the LatentCache holds quantized rows for {p}.{role} but the backend's config "
                                        "has bits=None: build the cache with the same config or plan as the backend")
                    if tuple(concrete_shape(buf)) != (shp[0], shp[cache.dim], val(h).shape[-1]):
                        raise SiteError(f"the LatentCache holds {list(concrete_shape(buf))} for {p}.{role} but the plan "
                                        f"needs {[shp[0], shp[cache.dim], val(h).shape[-1]]}: build the cache with the "
                                        "same config or plan as the backend")
                    before += math.prod(shp) * val(buf).element_size()
                elif bits is not None:
                    before += _nbytes(val(cache.buffer))
                    quantized[role], nbytes = _quantized_write(b, editor, f"palu_{p}_{role}", cache, h, bits, group,
                                                               shp)
                    after += nbytes
                    continue
                else:
                    bv = val(cache.buffer)
                    buf = editor.add_buffer(f"palu_{p}_{role}_latent", torch.zeros(
                        shp[0], shp[cache.dim], val(h).shape[-1], dtype=bv.dtype, device=bv.device))
                    before += _nbytes(bv)
                after += _nbytes(val(buf))
                if role == "k":
                    hk = _write_slots(b, buf, cache, h)
                else:
                    hv = _write_slots(b, buf, cache, h)
        cos = sin = None
        table_bytes = 0
        if rope is not None:
            cos, sin, pos_bytes, table_bytes = rotary.coefficients(b, site)
            after += pos_bytes
        q = call.q
        lk = k_bias = knw = None
        if absorbed:
            Lq = editor.add_param(f"palu_{p}_q_absorb", _per_query_head(kf.L, Hq, Hkv, D).to(val(q).dtype))
            q = b.call(aten.matmul.default, q, Lq)
        else:
            lk = editor.add_param(f"palu_{p}_k_up", kf.L.to(dt))
            if kf.bias is not None:
                k_bias = editor.add_param(f"palu_{p}_k_bias", kf.bias.to(dt))
        eps = 1e-6
        if norm is not None:
            w = torch.ones(D) if norm.weight is None else evaluate([norm.weight], {}, editor.tensor)[0]
            knw = editor.add_param(f"palu_{p}_k_norm", w.detach().reshape(-1).expand(D).contiguous().to(torch.float32))
            eps = norm.eps
        mask = call.mask
        if mask is not None and call.mask_kind == "bool_masked":
            mask = b.call(aten.logical_not.default, mask)
        style = rope.style if rope is not None else ROPE_NONE
        if quantized:
            (kc, ks, kz), (vc, vs, vz) = quantized["k"], quantized["v"]
            gk, gv = quant_group_size or kf.rank, quant_group_size or vf.rank
            op, args = palu.quant_latent_attention.default, (q, kc, ks, kz, vc, vs, vz, lk, k_bias, cos, sin, knw,
                                                             mask, call.scale, bits, gk, bits, gv)
        else:
            op, args = palu.latent_attention.default, (q, hk, hv, lk, k_bias, cos, sin, knw, mask, call.scale)
        args += (call.softcap, call.is_causal, style, eps)
        # Folding L_v into o_proj widens it by rv / Dv where the value rank passes the head dim
        # (rank ratio 0.5 at 4 heads per group: rv = 256 for Dv = 128), and P @ hv with it;
        # there the op takes L_v and returns Dv-wide heads instead, so o_proj stays as it was.
        folded = False
        if fold and vf.rank <= Dv:
            z = b.call(op, *args)
            folded = fold_value_into_output(graph, b, site, sp, z, editor)
            if not folded:  # nothing else was touched: attend with lv below instead
                graph.erase_node(z)
        if not folded:
            # [G, gs*Dv, rv] -> [Hkv, Dv, rv]: rows of a group are its KV heads' dims in order
            Lv = editor.add_param(f"palu_{p}_v_up", vf.L.reshape(Hkv, Dv, vf.rank).to(dt))
            out = b.call(op, *args, Lv)
            if vf.bias is not None:
                bq = vf.bias.view(Hkv, 1, Dv).repeat_interleave(Hq // Hkv, 0)
                out = b.call(aten.add.Tensor, out, editor.add_param(f"palu_{p}_v_bias", bq.to(dt)))
            call.output.replace_all_uses_with(_laid_out_as(b, out, call.output))
    # fused attention variants return tuples: drop the unread extras (logsumexp...) with it
    for n in call.nodes:
        for u in list(n.users):
            if u.op == "call_function" and u.target is operator.getitem and not u.users:
                graph.erase_node(u)
    return SiteResult(p, site.index, site.rope_kind, Hq, Hkv, sp.group_size, kf.rank, vf.rank, D,
                      site.key_cache is not None, absorbed, folded, before, after, table_bytes)


def _laid_out_as(b: NodeBuilder, node: fx.Node, old: fx.Node) -> fx.Node:
    """``node`` where the users of ``old`` (the attention output it replaces) can take it, else
    copied into the memory order of ``old`` where that is a permuted dense layout.

    The op's heads are in [B, S, H, D] memory like SDPA's, and the usual users flatten them for
    the output projection (``transpose`` + ``reshape``: a view); a ``view`` reads strides, so a
    graph traced on another layout (eager attention's contiguous matmul under compile) gets the
    copy. Orders are found on the symbolic sizes and strides: reading a symbolic size as an int
    would add a guard that pins an exported program to its example length.
    """
    order = _dense_order(val(old))
    if order is None or order == _dense_order(val(node)) or _takes_any_layout(old.users):
        return node
    inverse = [order.index(d) for d in range(len(order))]
    moved = b.call(aten.clone.default, b.call(aten.permute.default, node, list(order)),
                   memory_format=torch.contiguous_format)
    return b.call(aten.permute.default, moved, inverse)


# ops whose output's layout follows their input's (a reshape may return a view), and ops that
# take any layout and return a fresh contiguous tensor
_VIEWS = {aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim,
          aten.slice.Tensor, aten.select.int, aten.alias.default, aten.detach.default, aten.reshape.default}
_ANY_LAYOUT = {aten.contiguous.default, aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default}


def _takes_any_layout(users) -> bool:
    """Whether every use of a tensor, through view ops, reaches an op that takes any strides
    (a product, a copy into contiguous memory) before one that reads them (``view``)."""
    for u in users:
        if u.op != "call_function":
            return False
        if u.target in _VIEWS:
            if not _takes_any_layout(u.users):
                return False
        elif not (u.target in _ANY_LAYOUT or (u.target is aten.clone.default
                                               and u.kwargs.get("memory_format") == torch.contiguous_format)):
            return False
    return True


def _dense_order(t) -> Optional[tuple]:
    """The dims of ``t`` from outermost to innermost in memory if ``t`` is a permutation of a
    contiguous tensor (dims of static size 1 may sit anywhere), else None; the identity first."""
    def expr(x):
        return sympy.Integer(x) if isinstance(x, int) else x.node.expr

    try:
        sizes, strides = [expr(x) for x in t.shape], [expr(x) for x in t.stride()]
    except AttributeError:
        return None
    for order in itertools.permutations(range(len(sizes))):
        expect, ok = sympy.Integer(1), True
        for d in reversed(order):
            if sizes[d] != 1 and sympy.expand(strides[d] - expect) != 0:
                ok = False
                break
            expect = expect * sizes[d]
        if ok:
            return order
    return None


def _write_slots(b: NodeBuilder, buf: fx.Node, cache, value: fx.Node) -> fx.Node:
    """Write ``value`` into ``buf`` at the cache's slots; what the attention then reads."""
    written = b.call(aten.index_copy_.default, buf, 1, cache.index, value)
    if cache.read_end is not None:  # the attention reads only the first slots
        written = b.call(aten.slice.Tensor, written, 1, 0, cache.read_end)
    return written


def _quantize(b: NodeBuilder, h: fx.Node, bits: int, group: int) -> list[fx.Node]:
    """Nodes of the packed codes, scales and zeros of the new latents ``h``."""
    from palu_fx.quant import resolve_group_size

    try:
        resolve_group_size(val(h).shape[-1], group)
    except ValueError as e:
        raise SiteError(f"PaluConfig.quant_group_size={group}: {e}") from None
    q = b.call(palu.quantize_latent.default, h, bits, group)
    return [b.call(operator.getitem, q, i) for i in range(3)]


def _quantized_write(b: NodeBuilder, editor, prefix: str, cache, h: fx.Node, bits: int, group: int,
                     full_shape: tuple) -> tuple[tuple, int]:
    """Quantize the new latents and write codes, scales and zeros into their own caches."""
    from palu_fx.quant import packed_shape

    parts = _quantize(b, h, bits, group)
    ps = packed_shape(val(h).shape[-1], bits, group)
    B, smax = full_shape[0], full_shape[cache.dim]
    dev = val(h).device
    out, nbytes = [], 0
    for part, name, width, dtype in zip(parts, ("codes", "scale", "zero"), (ps.code_bytes, ps.groups, ps.groups),
                                        (torch.uint8, torch.float16, torch.float16)):
        buf = editor.add_buffer(f"{prefix}_{name}", torch.zeros(B, smax, width, dtype=dtype, device=dev))
        nbytes += _nbytes(val(buf))
        out.append(_write_slots(b, buf, cache, part))
    return tuple(out), nbytes


def _quantized_row_write(b: NodeBuilder, p: str, role: str, cache, h: fx.Node, bits: int, group: int,
                         full_shape: tuple) -> tuple[tuple, int]:
    """Quantize the new latents into a LatentCache's rows (``palu_fx.quant.rows``): one write
    of whole rows, then views of the codes, scales and zeros for the attention."""
    from palu_fx.quant.rows import row_layout

    codes, scale, zero = _quantize(b, h, bits, group)
    try:
        layout = row_layout(val(h).shape[-1], bits, group)
    except ValueError as e:
        raise SiteError(f"PaluConfig.quant_group_size={group}: {e}") from None
    buf = cache.buffer
    want = [full_shape[0], full_shape[cache.dim], layout.row_bytes]
    if list(concrete_shape(buf)) != want or val(buf).dtype != torch.uint8:
        raise SiteError(f"the LatentCache holds {val(buf).dtype} {list(concrete_shape(buf))} for {p}.{role} but the "
                        f"plan needs uint8 {want} ({bits}-bit rows): build the cache with the same config or plan as "
                        "the backend")
    row = b.call(aten.cat.default, [codes, b.call(aten.view.dtype, scale, torch.uint8),
                                    b.call(aten.view.dtype, zero, torch.uint8)], -1)
    rows = _write_slots(b, buf, cache, row)

    def field(start, end, dtype=None):
        view = b.call(aten.slice.Tensor, rows, 2, start, end)
        return view if dtype is None else b.call(aten.view.dtype, view, dtype)

    views = (field(0, layout.scale_start), field(layout.scale_start, layout.zero_start, torch.float16),
             field(layout.zero_start, layout.row_bytes, torch.float16))
    return views, math.prod(concrete_shape(buf))


def _order(graph: fx.Graph) -> dict:
    return {n: i for i, n in enumerate(graph.nodes)}


def old_writes(sites) -> list[fx.Node]:
    """The K/V cache writes the rewrite made obsolete (removed by ``cleanup``)."""
    return [c.write for s in sites for c in (s.key_cache, s.value_cache) if c is not None]


def _mutates(node: fx.Node) -> bool:
    if node.target is operator.getitem:
        return False
    schema = getattr(node.target, "_schema", None)
    return schema is None or schema.is_mutable


def live_snapshot(graph: fx.Graph) -> dict:
    """How many consumers each node has before the rewrite (``cleanup`` only removes what the
    rewrite made dead)."""
    return {n: len(real_users(n)) for n in graph.nodes}


def cleanup(graph: fx.Graph, writes: list[fx.Node], before: dict) -> None:
    """Remove what the rewrite made dead, including the in-place writes into replaced caches.

    fx's own dead code elimination keeps in-place ops and anything viewing a mutated buffer,
    so we sweep ourselves: a node that had consumers before the rewrite and has none now is
    erased unless it mutates something (the obsolete cache writes excepted); metadata
    assertions on such nodes go with them. Nodes that were already unused stay.
    """
    doomed = set(writes)
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph.nodes)):
            if n.op != "call_function" or n.users:
                continue
            if n.target == aten._assert_tensor_metadata.default:
                dead = all(not real_users(i) and before.get(i, 0) > 0 for i in n.all_input_nodes)
            else:
                dead = n in doomed or (before.get(n, 0) > 0 and not _mutates(n))
            if dead:
                graph.erase_node(n)
                changed = True
