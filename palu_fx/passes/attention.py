"""Anchors: every spelling of attention normalized to one record.

Fused SDPA (``aten.scaled_dot_product_attention`` and the device variants that appear after
decomposition) and explicit ``matmul -> [scale, softcap, mask] -> softmax -> matmul``
attention (eager implementations, hand-written decoders) all become an ``AttentionCall``.
What cannot be expressed (dropout in training, ALiBi added before the scale, sinks...) is
reported with the reason instead.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx as fx

from palu_fx.passes.fx_utils import CAST_OPS, MATMUL_OPS, SCORE_OPS, SOFTMAX_OPS, aten, is_call, real_users, val
from palu_fx.passes.recognize import strip_casts


@dataclass
class AttentionCall:
    """One attention op: ``softmax(softcap(q @ k^T * scale) + mask) @ v``."""

    output: fx.Node  # node whose value is the attention output [B, Hq, Sq, Dv]
    nodes: list  # nodes the rewrite replaces (the anchor and its private helpers)
    q: fx.Node
    k: fx.Node  # [B, H, Skv, D] (not transposed)
    v: fx.Node
    mask: Optional[fx.Node]
    mask_kind: str  # "none", "bool_attend", "bool_masked", "additive"
    scale: float
    softcap: float
    is_causal: bool
    kind: str  # "sdpa" or "eager"


@dataclass
class Unsupported:
    node: fx.Node
    reason: str


# (q, k, v, mask) positions and where dropout/causal/scale live for each fused op.
_SDPA = {
    aten.scaled_dot_product_attention.default: dict(mask=3, dropout=4, causal=5, tuple_out=False),
    aten._scaled_dot_product_flash_attention_for_cpu.default: dict(mask="attn_mask", dropout=3, causal=4, tuple_out=True),
    aten._scaled_dot_product_efficient_attention.default: dict(mask=3, dropout=5, causal=6, tuple_out=True),
    aten._scaled_dot_product_flash_attention.default: dict(mask=None, dropout=3, causal=4, tuple_out=True),
    aten._scaled_dot_product_cudnn_attention.default: dict(mask=3, dropout=5, causal=6, tuple_out=True),
}


def _arg(node: fx.Node, pos, name: str, default=None):
    if isinstance(pos, int) and len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name if not isinstance(pos, str) else pos, default)


def _sdpa_call(node: fx.Node) -> Union[AttentionCall, Unsupported, None]:
    spec = _SDPA.get(node.target) if node.op == "call_function" else None
    if spec is None:
        return None
    q, k, v = node.args[:3]
    mask = _arg(node, spec["mask"], "attn_mask") if spec["mask"] is not None else None
    dropout = _arg(node, spec["dropout"], "dropout_p", 0.0)
    causal = bool(_arg(node, spec["causal"], "is_causal", False))
    scale = node.kwargs.get("scale")
    if dropout not in (0, 0.0):
        return Unsupported(node, f"attention dropout p={dropout} (compress a model in eval mode)")
    output = node
    if spec["tuple_out"]:
        outs = [u for u in node.users if is_call(u, operator.getitem) and u.args[1] == 0]
        if len(outs) != 1:
            return Unsupported(node, "fused attention output is not read through a single getitem")
        output = outs[0]
    D = val(q).shape[-1]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    kind = "none" if mask is None else ("bool_attend" if val(mask).dtype == torch.bool else "additive")
    return AttentionCall(output, [node, output], q, k, v, mask, kind, scale, 0.0, causal, "sdpa")


def _scalar(node, leaf) -> Optional[float]:
    """A Python number, or a 0-d tensor computed from constants only."""
    if isinstance(node, (int, float)):
        return float(node)
    # shapes only (numel() on symbolic fake tensors raises on torch 2.11)
    if isinstance(node, fx.Node) and isinstance(val(node), torch.Tensor) and all(s == 1 for s in val(node).shape):
        from palu_fx.passes.fx_utils import evaluate

        try:
            (v,) = evaluate([node], {}, leaf)
        except Exception:
            return None
        return float(v)
    return None


def _eager_call(softmax: fx.Node, leaf) -> Union[AttentionCall, Unsupported, None]:
    ndim = len(val(softmax).shape)
    if softmax.args[1] % ndim != ndim - 1:
        return None
    users = real_users(softmax)
    p = softmax
    while len(users) == 1 and (is_call(users[0], CAST_OPS) or is_call(users[0], {aten.dropout.default})):
        p = users[0]
        users = real_users(p)
    pv = [u for u in users if is_call(u, MATMUL_OPS) and u.args[0] is p]
    if len(users) != 1 or len(pv) != 1:
        if _scores_side(softmax.args[0]):
            return Unsupported(softmax, "softmax over attention scores is not followed by a plain matmul with the values "
                                        "(attention sinks, ALiBi via baddbmm or re-shaped probabilities are not supported)")
        return None
    pv = pv[0]
    nodes, cur = [softmax, pv], strip_casts(softmax.args[0])
    mask, mask_kind, scale, softcap = None, "none", 1.0, 0.0
    stage = 0  # 0: mask ops allowed, 1: softcap seen, 2: scale ops only
    while not is_call(cur, MATMUL_OPS):
        nodes.append(cur)
        if is_call(cur, aten.add.Tensor) and stage == 0 and mask is None:
            a, b = cur.args
            cur, mask = (a, b) if not _scores_side(b) else (b, a)
            mask_kind = "additive"
        elif is_call(cur, {aten.masked_fill.Scalar}) and stage == 0 and mask is None and cur.args[2] == float("-inf"):
            cur, mask, mask_kind = cur.args[0], cur.args[1], "bool_masked"
        elif is_call(cur, aten.mul.Tensor) and is_call(strip_casts(cur.args[0]), aten.tanh.default) and stage == 0:
            cap = _scalar(cur.args[1], leaf)
            inner = strip_casts(cur.args[0]).args[0]
            if cap is None or not is_call(inner, {aten.div.Tensor, aten.mul.Tensor}):
                return Unsupported(softmax, "tanh on the scores is not a softcap")
            inv = _scalar(inner.args[1], leaf)
            if inv is None or not math.isclose(inv if inner.target == aten.div.Tensor else 1 / inv, cap, rel_tol=1e-6):
                return Unsupported(softmax, "tanh on the scores is not a softcap")
            nodes.append(inner)
            softcap, stage, cur = cap, 1, inner.args[0]
        elif is_call(cur, {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}):
            c = _scalar(cur.args[1], leaf)
            if c is None:
                return Unsupported(softmax, f"scores are scaled by a non-constant ({cur.format_node()})")
            scale *= c if cur.target in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / c
            stage, cur = 2, cur.args[0]
        elif is_call(cur, CAST_OPS):
            cur = cur.args[0]
        else:
            return Unsupported(softmax, f"unsupported op on the attention scores: {getattr(cur, 'target', cur)}")
        cur = strip_casts(cur)
    nodes.append(cur)
    q, kt = cur.args
    if val(q).dim() < 3 or val(kt).dim() < 3:
        return None  # a softmax over products with a weight matrix (gating, routing): not attention
    k = _untranspose(kt)
    if k is None:
        return Unsupported(softmax, "keys enter the score matmul without a transpose of the last two dims")
    nodes.append(kt)
    return AttentionCall(pv, nodes, q, k, pv.args[1], mask, mask_kind, scale, softcap, False, "eager")


def _scores_side(node) -> bool:
    """Heuristic-free test used for ``add``: the side that depends on a matmul is the scores."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if is_call(n, SCORE_OPS):
            return True
        if len(seen) > 50:
            break
        stack.extend(n.all_input_nodes)
    return False


def _untranspose(kt: fx.Node) -> Optional[fx.Node]:
    nd = len(val(kt).shape)
    if is_call(kt, aten.transpose.int) and {kt.args[1] % nd, kt.args[2] % nd} == {nd - 1, nd - 2}:
        return kt.args[0]
    if is_call(kt, aten.permute.default):
        perm = [d % nd for d in kt.args[1]]
        if perm[:-2] == list(range(nd - 2)) and perm[-2:] == [nd - 1, nd - 2]:
            return kt.args[0]
    return None


def find_attention_calls(graph: fx.Graph, leaf) -> list[Union[AttentionCall, Unsupported]]:
    found = []
    for node in graph.nodes:
        call = _sdpa_call(node) if node.op == "call_function" else None
        if call is None and is_call(node, SOFTMAX_OPS):
            call = _eager_call(node, leaf)
        if call is not None:
            found.append(call)
    return found


__all__ = ["AttentionCall", "Unsupported", "find_attention_calls"]
