"""compress_exported on real transformers decoders and a hand-written one.

For each model: at rank_ratio=1.0 the logits of a prefill plus 8 decode steps match the
uncompressed program; at 0.5 the cache buffers shrink to at most 0.55x and decoding runs;
torch.export.save/load gives the same logits.
"""

import pytest
import torch

import palu_fx
from palu_fx import PaluConfig, compress_exported
from tests.passes.helpers import (PREFILL, attention_output_copies, cache_buffers, cache_bytes, exported, rel_err, run,
                                  tokens)

MODELS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "phi3", "gpt_neox", "gpt2",
          "handwritten", "handwritten:rope=half:qkv_bias=True", "handwritten:mask=masked_fill:cache_write=index_put"]
# what the finder must see in each (rope kind of the first site)
ROPE = {"gpt2": "none", "gpt_neox": "rotate-half (partial 8/32)", "handwritten": "interleaved"}


@pytest.mark.parametrize("name", MODELS)
def test_full_rank_is_lossless(name):
    ep = exported(name)
    ids = tokens()
    ref = run(ep, ids)
    ep1 = compress_exported(ep, PaluConfig(rank_ratio=1.0, group_size=1))
    rep = palu_fx.report(ep1)
    assert len(rep.sites) == 2 and not rep.skipped, str(rep)
    assert all(s.cached for s in rep.sites)
    if name in ROPE:
        assert rep.sites[0].rope == ROPE[name]
    assert rel_err(run(ep1, ids), ref) < 1e-4
    # no attention op of the original survives: every cache read goes through the latent op
    assert sum(n.target == torch.ops.palu.latent_attention.default for n in ep1.graph.nodes) == 2


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "gpt2", "handwritten"])
def test_value_rank_above_head_dim_is_rebuilt_in_the_op(name):
    # one group of every KV head at full rank: value rank gs*D > D, where a fold would widen
    # o_proj; the op takes L_v instead and returns D-wide heads. The prefill and the decode
    # steps run one program (no guard may pin its length), and it stays lossless.
    ep = exported(name)
    ids = tokens()
    ep1 = compress_exported(ep, PaluConfig(rank_ratio=1.0, group_size="all"))
    rep = palu_fx.report(ep1)
    sites = rep.sites
    assert sites and all(s.rank_v > s.head_dim and not s.folded for s in sites)
    assert "values rebuilt inside the attention op" in str(rep)
    ops = [n for n in ep1.graph.nodes if n.target == torch.ops.palu.latent_attention.default]
    assert len(ops) == len(sites) and all(len(n.args) == 15 for n in ops)  # ... with lv
    assert rel_err(run(ep1, ids), run(ep, ids)) < 1e-4


@pytest.mark.parametrize("name,group,noted", [("llama", 1, False), ("llama", "all", True), ("gpt2", "all", False)])
def test_report_says_what_grouped_key_rebuilds_cost(name, group, noted):
    # with RoPE each decode step rebuilds every cached key from its group's latent, whose rank
    # grows with the group: the report says so (absorbed keys, gpt2, rebuild nothing)
    rep = palu_fx.report(compress_exported(exported(name), PaluConfig(rank_ratio=0.5, group_size=group)))
    assert ("keys rebuilt per decode step" in str(rep)) == noted
    if noted:
        assert f"up to {rep.sites[0].group_size} KV heads" in str(rep) and rep.sites[0].group_size > 1


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("group", [1, "all"])
def test_half_rank_halves_the_cache(name, group):
    ep = exported(name)
    ep5 = compress_exported(ep, PaluConfig(rank_ratio=0.5, group_size=group))
    rep = palu_fx.report(ep5)
    before, after = cache_bytes(ep), cache_bytes(ep5)
    assert after <= 0.55 * before, (before, after)
    assert rep.cache_bytes_before == before and rep.cache_bytes_after == after
    out = run(ep5, tokens())
    assert torch.isfinite(out).all()
    # the original K/V cache buffers are gone, not kept beside the latents
    assert not set(cache_buffers(ep)) & {s.target for s in ep5.graph_signature.input_specs}


def test_key_and_value_latents_come_from_one_product():
    # both down projections read the same hidden states: one GEMM with the factors side by side
    ep5 = compress_exported(exported("llama"), PaluConfig(rank_ratio=0.5, group_size=1))
    sites = palu_fx.report(ep5).sites
    names = set(ep5.state_dict) | set(ep5.constants)
    assert sum(n.endswith("_kv_down") for n in names) == len(sites) == 2
    assert not any(n.endswith(("_k_down", "_v_down")) for n in names)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_save_load_gives_same_logits(name, tmp_path):
    ep5 = compress_exported(exported(name), PaluConfig(rank_ratio=0.5, group_size=1))
    path = tmp_path / "model.pt2"
    torch.export.save(ep5, str(path))
    loaded = torch.export.load(str(path))
    ids = tokens(1)
    assert torch.equal(run(ep5, ids), run(loaded, ids))


def test_input_program_is_not_mutated():
    ep = exported("qwen2")
    code, specs = ep.graph_module.code, list(ep.graph_signature.input_specs)
    keys = set(ep.state_dict) | set(ep.constants)
    compress_exported(ep, PaluConfig(rank_ratio=0.5))
    assert ep.graph_module.code == code and list(ep.graph_signature.input_specs) == specs
    assert set(ep.state_dict) | set(ep.constants) == keys


def test_compiled_with_inductor_matches():
    ep5 = compress_exported(exported("llama"), PaluConfig(rank_ratio=0.5, group_size=1))
    ids = tokens(2)
    eager = run(ep5, ids)
    mod = torch.compile(ep5.module(), backend="inductor")
    outs = [mod(input_ids=ids[:, :5], cache_position=torch.arange(5))]
    for t in range(5, ids.shape[1]):
        outs.append(mod(input_ids=ids[:, t:t + 1], cache_position=torch.tensor([t])))
    assert rel_err(torch.cat(outs, 1), eager) < 1e-4


def test_rotary_tables_are_stored_in_the_model_dtype():
    """A half-precision model gets half-precision cos/sin tables: the values are the model's
    own (exact in its dtype), and float32 tables doubled what the kernels stream per slot."""
    from palu_fx.export import export_decoder
    from tests.passes.helpers import perturbed
    from tests.zoo import build

    model = perturbed(build("llama")).to(torch.bfloat16)
    ep = export_decoder(model, batch_size=2, max_cache_len=32)
    out = compress_exported(ep, PaluConfig(rank_ratio=1.0))
    tables = {k: v for k, v in out.state_dict.items() if "rope" in k}
    assert tables and all(t.dtype == torch.bfloat16 for t in tables.values()), {k: t.dtype for k, t in tables.items()}
    ids = torch.randint(3, 200, (2, 6))
    with torch.no_grad():
        ref = ep.module()(input_ids=ids, cache_position=torch.arange(6)).float()
        got = out.module()(input_ids=ids, cache_position=torch.arange(6)).float()
    assert rel_err(got, ref) < 2e-2


def test_layers_share_one_expansion_check_and_vectorized_rotary_probes(monkeypatch):
    """Long caches stay cheap to rewrite: the GQA-expansion check (index probes of the full
    cache shape) runs once for layers that repeat the same layout steps, and the rotary
    tables come from vmapped probes, equal to a plain loop."""
    import palu_fx.passes.find as find
    import palu_fx.passes.rotary as rotary

    checks = []
    real = find._check_expansion
    monkeypatch.setattr(find, "_check_expansion", lambda *a: checks.append(1) or real(*a))
    ep = exported("llama")
    out = compress_exported(ep, PaluConfig(rank_ratio=1.0))
    n_layers = len(palu_fx.report(out).sites)
    assert n_layers >= 2 and len(checks) == 1
    fn = lambda p: torch.stack([p.float().sin(), (p * 3).float().cos()], -1)  # noqa: E731
    probes = torch.arange(40).view(10, 1, 4)
    assert torch.equal(rotary._map_probes(fn, probes, 4), torch.stack([fn(p) for p in probes]))


@pytest.mark.parametrize("name,group,bits", [(m, g, None) for m in MODELS for g in (1, "all")] + [("llama", 1, 4)])
def test_attention_output_reaches_the_output_projection_uncopied(name, group, bits):
    # the graph flattens the attention heads for o_proj ([B, H, S, D] -> [B, S, H*D]): a view of
    # SDPA's output, whose memory is [B, S, H, D]. The op returns that layout too, so prefill
    # copies none of its output (gpt2 "all" adds a value bias first; the hand-written models
    # attend eagerly, their matmul output contiguous: the flattening reshape after the op is a
    # view all the same)
    ep = compress_exported(exported(name), PaluConfig(rank_ratio=0.5, group_size=group, bits=bits))
    calls, copied = attention_output_copies(ep, tokens()[:, :PREFILL])
    assert calls == 2 and copied == 0


def test_dense_order_reads_layouts_without_guards():
    # the op's output is laid out as the attention output it replaces (SDPA: [B, H, S, D]
    # heads in [B, S, H, D] memory); found on symbolic strides, so no length gets pinned
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from palu_fx.passes.rewrite import _dense_order

    assert _dense_order(torch.empty(2, 3, 5, 4)) == (0, 1, 2, 3)
    assert _dense_order(torch.empty(2, 5, 3, 4).transpose(1, 2)) == (0, 2, 1, 3)
    assert _dense_order(torch.empty(2, 3, 5, 8)[..., :4]) is None  # not dense
    env = ShapeEnv()
    seq = env.create_symintnode(env.create_symbol(7, ConstantSource("seq")), hint=7)
    with FakeTensorMode(shape_env=env):
        x = torch.empty(2, seq, 3, 4).transpose(1, 2)  # strides (12*seq, 4, 12, 1)
    assert _dense_order(x) == (0, 2, 1, 3)
    assert not env.guards  # no size was read as an int (int() here adds one)


def test_only_users_that_read_strides_get_the_old_layout():
    # the rewrite copies the op's output into the replaced output's layout only for users that
    # would read its strides (a view), through view-like ops; a reshape may itself be a view
    import torch.fx as fx

    from palu_fx.passes.rewrite import _takes_any_layout

    aten = torch.ops.aten

    def users(*chain):
        g = fx.Graph()
        x = node = g.placeholder("x")
        for target, *args in chain:
            node = g.call_function(target, (node, *args))
        g.output(node)
        return list(x.users)

    flat = (aten.permute.default, [0, 2, 1, 3]), (aten.reshape.default, [2, 5, 12])
    assert _takes_any_layout(users(*flat, (aten.linear.default, None)))
    assert _takes_any_layout(users((aten.permute.default, [0, 2, 1, 3]), (aten.contiguous.default,)))
    assert not _takes_any_layout(users((aten.permute.default, [0, 2, 1, 3]), (aten.view.default, [2, 5, 12])))
    assert not _takes_any_layout(users(*flat, (aten.view.default, [10, 12])))
    assert not _takes_any_layout(users((aten.clone.default,), (aten.view.default, [120])))  # clone keeps strides
