"""The one adapter over torch.fx / fake-tensor internals that the passes use.

Everything private to torch that the pass touches lives here, so a torch upgrade is
mended in one file. Graphs come from torch.export (training IR, aten ops, in-place cache
writes) or from Dynamo after AOT (aten ops); both are handled by op identity, never by
module or parameter names.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher

aten = torch.ops.aten

# Ops that only re-arrange, re-view or select elements: an index tensor replayed through
# them tells which projection feature lands where (see layout.py).
LAYOUT_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default,
    aten.transpose.int, aten.permute.default, aten.t.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.expand.default, aten.slice.Tensor, aten.select.int,
    aten.contiguous.default, aten.clone.default, aten.alias.default,
    aten.flatten.using_ints, aten.unflatten.int, aten.repeat_interleave.self_int,
}
MULTI_OUTPUT_LAYOUT_OPS = {
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
    aten.unbind.int, aten.tensor_split.sections,
}
CAST_OPS = {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device,
    aten.type_as.default, aten._assert_tensor_metadata.default,
}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
# score matmuls with a fused additive bias (ALiBi) are recognized as attention, then reported
SCORE_OPS = MATMUL_OPS | {aten.baddbmm.default}


def is_call(node: Any, targets: Iterable | Any) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if isinstance(targets, (set, frozenset, list, tuple)):
        return node.target in targets
    return node.target == targets


def val(node: Any) -> Any:
    """The fake value recorded on a node (``meta['val']``), or the argument itself."""
    if isinstance(node, fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def shape(node: fx.Node) -> tuple:
    return tuple(val(node).shape)


def concrete(x: Any, default: int = 3) -> Any:
    """A concrete Python int for a (possibly symbolic) size, using the trace-time hint."""
    if isinstance(x, fx.Node):
        x = val(x)
    if isinstance(x, torch.SymInt):
        hint = getattr(x.node, "hint", None)
        if hint is not None:
            return int(hint)
        expr = x.node.expr
        return int(expr.subs({s: default for s in expr.free_symbols}))
    if isinstance(x, (list, tuple)):
        return type(x)(concrete(v, default) for v in x)
    return x


def upper_bound(x: Any, fallback: int = 4096) -> int:
    """The largest value a (possibly symbolic) size can take, from the shape environment."""
    if not isinstance(x, torch.SymInt):
        return int(x)
    try:
        hi = x.node.shape_env.bound_sympy(x.node.expr).upper
        return int(hi) if hi.is_finite else fallback
    except Exception:
        return fallback


def concrete_shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(concrete(s) for s in shape(node))


def getitem_parent(node: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """For ``getitem(multi_output_op(...), i)`` return (multi_output_node, i)."""
    if is_call(node, operator.getitem) and isinstance(node.args[0], fx.Node):
        return node.args[0], node.args[1]
    return None


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users that consume the value (metadata assertions are not consumers)."""
    return [u for u in node.users if u.target != aten._assert_tensor_metadata.default]


def depends_on(node: fx.Node, target: fx.Node, limit: int = 400) -> bool:
    """Whether ``target`` is an ancestor of ``node`` (bounded backward search)."""
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def evaluate(outputs: Sequence[fx.Node], env: dict[fx.Node, Any], leaf: Callable[[fx.Node], Any],
             dtype: Optional[torch.dtype] = None) -> list[Any]:
    """Evaluate the sub-graph feeding ``outputs`` on real tensors.

    ``env`` seeds chosen nodes with values (probes); any other node without inputs in the
    region is resolved by ``leaf`` (parameters/buffers from the program's state). Used to
    verify a recognizer numerically and to constant-fold coefficient sub-graphs. With
    ``dtype`` set, casts between floating types are skipped (the check runs in ``dtype``).
    """
    order: list[fx.Node] = []
    seen: set[fx.Node] = set(env)

    def visit(n: fx.Node) -> None:
        stack = [(n, False)]
        while stack:
            cur, done = stack.pop()
            if done:
                order.append(cur)
                continue
            if cur in seen:
                continue
            seen.add(cur)
            stack.append((cur, True))
            stack.extend((i, False) for i in cur.all_input_nodes if i not in seen)

    for o in outputs:
        visit(o)
    values = dict(env)
    for n in order:
        if n.op in ("placeholder", "get_attr"):
            values[n] = leaf(n)
            continue
        if n.op != "call_function":
            raise ValueError(f"cannot evaluate {n.op} node {n.name}")
        if dtype is not None and n.target in CAST_OPS and isinstance(values.get(n.args[0]), torch.Tensor) \
                and values[n.args[0]].is_floating_point():
            values[n] = values[n.args[0]]
            continue
        args = fx.node.map_arg(n.args, lambda a: values[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: values[a])
        args, kwargs = concrete(args), {k: concrete(v) for k, v in kwargs.items()}
        values[n] = n.target(*args, **kwargs)
    return [values[o] for o in outputs]


def fake_mode_of(graph: fx.Graph):
    from torch._guards import detect_fake_mode

    vals = [val(n) for n in graph.nodes if isinstance(val(n), torch.Tensor)]
    return detect_fake_mode(vals)


class NodeBuilder:
    """Creates nodes with ``meta['val']`` (computed under the graph's fake mode).

    Exported programs must carry fake values on every node (``torch.export.save`` and the
    verifier need them); we compute them by running the target on the inputs' fake values.
    """

    def __init__(self, graph: fx.Graph, meta_from: Optional[fx.Node] = None):
        self.graph = graph
        self.fake_mode = fake_mode_of(graph)
        self.meta_from = meta_from

    def call(self, target, *args, **kwargs) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        fargs = fx.node.map_arg(args, val)
        fkwargs = fx.node.map_arg(kwargs, val)
        # The Python dispatcher routes composite ops (linear, matmul) through their symbolic-
        # shape-aware decompositions, as export's own tracing does; without it torch 2.11
        # runs the C++ composite, which calls numel() on symbolic batch sizes and raises.
        with self.fake_mode, enable_python_dispatcher():
            node.meta["val"] = target(*fargs, **fkwargs)
        if self.meta_from is not None:
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn"):
                if key in self.meta_from.meta:
                    node.meta[key] = self.meta_from.meta[key]
        return node

    def fake(self, tensor: torch.Tensor):
        return self.fake_mode.from_tensor(tensor, static_shapes=True)
