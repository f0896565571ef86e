"""ValueKeys: equal keys only for nodes that provably hold equal values."""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from palu_fx.passes.value_key import ValueKeys


def _keys(fn, *args):
    gm = make_fx(fn, tracing_mode="real")(*args)
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    keys = ValueKeys(gm.graph)
    return [keys(n) for n in outs]


def _inputs():
    return torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64), torch.tensor([5, 6, 7])


def test_static_cache_counters_give_one_index():
    def f(c0, c1, pos):
        i0 = torch.arange(3) + c0.copy_(pos[0])  # layer 0: counter set from the positions...
        c0.add_(3)  # ...then advanced, after the index was formed
        i1 = torch.arange(3) + c1.copy_(pos[0]).to(torch.int64)  # layer 1, with a no-op cast
        c1.add_(3)
        return i0, i1

    i0, i1 = _keys(f, *_inputs())
    assert i0 == i1


def test_reads_after_a_write_are_their_own():
    def f(c0, c1, pos):
        i0 = torch.arange(3) + c0.copy_(pos[0])
        c0.add_(3)
        after_add = torch.arange(3) + c0  # the counter as advanced: a different value
        c1.copy_(pos[0])
        c1.add_(1)
        after_copy_and_add = torch.arange(3) + c1
        return i0, after_add, after_copy_and_add

    i0, after_add, after_copy_and_add = _keys(f, *_inputs())
    assert after_add != i0 and after_copy_and_add != i0 and after_add != after_copy_and_add
    assert after_add[0] == "node" and after_copy_and_add[0] == "node"


def test_random_ops_and_different_inputs_differ():
    def f(c0, c1, pos):
        return torch.rand(3) + pos, torch.rand(3) + pos, pos + c0, pos + c1, pos + c0

    r0, r1, a, b, a2 = _keys(f, *_inputs())
    assert r0 != r1 and a != b and a == a2
