"""Fold the value reconstruction into the output projection.

Attention returns ``z = P·H_v`` in value-latent space; the original output was
``z_h @ L_{v,h}ᵀ (+ b_v)`` per query head, then re-laid out and fed to ``o_proj``. When the
only consumer of the attention output is such a layout chain into a projection, we fold:
``W_o'[:, h*rv:(h+1)*rv] = W_o[:, cols(h)] @ L_{v,h}`` and ``b_o' = b_o + W_o @ b_v``, so no
value is ever rebuilt at run time. Which input column of ``o_proj`` holds (head, dim) is
read off by replaying the layout chain on index tensors, as for the K/V projections.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from palu_fx.passes.find import Projection, match_projection
from palu_fx.passes.fx_utils import NodeBuilder, aten, concrete_shape, val
from palu_fx.passes.layout import Probe, is_layout_step, replay
from palu_fx.passes.fx_utils import MULTI_OUTPUT_LAYOUT_OPS, getitem_parent


def _output_projection(out: fx.Node, is_weight) -> Optional[tuple[list, Projection]]:
    steps, cur = [], out
    for _ in range(20):
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        proj = _projection_from_input(u, cur, is_weight)
        if proj is not None:
            return steps, proj
        if not is_layout_step(u) or getitem_parent(u) is not None or u.target in MULTI_OUTPUT_LAYOUT_OPS:
            return None
        steps.append(u)
        cur = u
    return None


def _projection_from_input(u: fx.Node, x: fx.Node, is_weight) -> Optional[Projection]:
    proj = match_projection(u, is_weight)
    if proj is not None and u.args[0] is x:
        return proj
    # flattened-token form: view(x, [-1, F]) -> addmm -> view back
    if u.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and len(u.users) == 1:
        mm = next(iter(u.users))
        if len(mm.users) == 1:
            back = next(iter(mm.users))
            proj = match_projection(back, is_weight)
            if proj is not None and proj.input is x:
                return proj
    return None


def fold_value_into_output(graph: fx.Graph, b: NodeBuilder, site, sp, z: fx.Node, editor) -> bool:
    found = _output_projection(site.call.output, lambda n: editor.is_param(n))
    if found is None:
        return False
    steps, proj = found
    zshape = val(z).shape
    if not isinstance(zshape[0], int):
        return False
    Hq, Dv, Hkv = site.num_q_heads, site.v_head_dim, site.num_kv_heads
    # Which (head, dim) feeds each input feature of the output projection.
    B, _, S, _ = concrete_shape(site.call.output)
    hd = torch.arange(Hq * Dv).view(1, Hq, 1, Dv).expand(B, Hq, S, Dv).clone()
    bi = torch.arange(B).view(B, 1, 1, 1).expand(B, Hq, S, Dv).clone()
    si = torch.arange(S).view(1, 1, S, 1).expand(B, Hq, S, Dv).clone()
    probe = Probe(hd, bi, si)
    for s in steps:
        probe = replay(s, probe)
    if len(probe.shape) != 3 or probe.shape[-1] != Hq * Dv:
        return False
    cols = probe.feat[0, 0]
    if not (torch.equal(probe.feat, cols.expand_as(probe.feat))
            and torch.equal(probe.bidx, torch.arange(B).view(B, 1, 1).expand_as(probe.bidx))
            and torch.equal(probe.sidx, torch.arange(S).view(1, S, 1).expand_as(probe.sidx))
            and torch.equal(cols.sort().values, torch.arange(Hq * Dv))):
        return False
    Wo = editor.tensor(proj.weight).detach()
    Wo = Wo.t() if proj.transposed else Wo  # [out, F]
    bo = editor.tensor(proj.bias).detach().reshape(-1) if proj.bias is not None else None
    col_of = torch.argsort(cols)  # col_of[h*Dv+d] = the input feature holding (h, d)
    wdt = torch.float64
    Lv = sp.value.L.to(wdt)  # [G, gs*Dv, rv]
    G, gsD, rv = Lv.shape
    Lv_kv = Lv.view(G, gsD // Dv, Dv, rv).reshape(Hkv, Dv, rv)
    n_rep = Hq // Hkv
    Wo_h = Wo.to(wdt)[:, col_of].view(-1, Hq, Dv)  # [out, Hq, Dv]
    Lq = Lv_kv.repeat_interleave(n_rep, 0)  # [Hq, Dv, rv]
    W_new = torch.einsum("ohd,hdr->ohr", Wo_h, Lq).reshape(Wo.shape[0], Hq * rv)
    b_new = bo.to(wdt) if bo is not None else None
    if sp.value.bias is not None:
        bv_q = sp.value.bias.to(wdt).view(Hkv, Dv).repeat_interleave(n_rep, 0)  # [Hq, Dv]
        extra = torch.einsum("ohd,hd->o", Wo_h, bv_q)
        b_new = extra if b_new is None else b_new + extra
    dt = val(proj.output).dtype
    w_node = editor.add_param(f"palu_{site.name}_o_proj", W_new.to(dt))
    b_node = editor.add_param(f"palu_{site.name}_o_bias", b_new.to(dt)) if b_new is not None else None
    zt = b.call(aten.permute.default, z, [0, 2, 1, 3])
    zf = b.call(aten.reshape.default, zt, [zshape[0], -1, Hq * rv])
    y = b.call(aten.linear.default, zf, w_node, b_node) if b_node is not None else b.call(aten.linear.default, zf, w_node)
    proj.output.replace_all_uses_with(y)
    return True
