"""torch.compile(model.forward, backend=palu_fx.backend(cfg)) with a LatentCache in generate().

At full rank the greedy tokens of generate() (batch 2, left-padded prompts of different
lengths) equal the uncompressed model's; at rank 0.5 the cache allocates at most 0.55x the
bytes of transformers' StaticCache; Dynamo compiles as many graphs as without Palu.
"""
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import palu_fx  # noqa: E402
from palu_fx import LatentCache, PaluConfig  # noqa: E402
from tests.handwritten import MLPOnly  # noqa: E402
from tests.passes.helpers import OutputCopies, perturbed  # noqa: E402
from tests.zoo import build  # noqa: E402

NEW, MAX_CACHE = 32, 48


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with torch.no_grad():
        yield
    torch._dynamo.reset()


def _model(name):
    m = perturbed(build(name))
    m.generation_config.eos_token_id = None  # always generate NEW tokens
    m.generation_config.pad_token_id = 0
    return m


def _prompts():
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # the second prompt is 4 tokens shorter (left padding)
    return ids, mask


def _generate(model, cache):
    ids, mask = _prompts()
    return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW, do_sample=False)


def _static_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "phi3", "gpt_neox", "gpt2"])
def test_full_rank_generate_matches_uncompressed(name):
    ref = _generate(_model(name), StaticCache(config=_model(name).config, max_cache_len=MAX_CACHE))
    m = _model(name)
    cfg = PaluConfig(rank_ratio=1.0, group_size=1)
    m.forward = torch.compile(m.forward, backend=palu_fx.backend(cfg, eager=True))
    out = _generate(m, LatentCache(m.config, max_cache_len=MAX_CACHE, compression=cfg))
    assert torch.equal(out, ref)
    rep = palu_fx.compiled.last_report()
    assert len(rep.sites) == m.config.num_hidden_layers and not rep.skipped


def test_inductor_half_rank_allocates_latents_only():
    base = _model("llama")
    static = StaticCache(config=base.config, max_cache_len=MAX_CACHE)
    _generate(base, static)
    m = _model("llama")
    cfg = PaluConfig(rank_ratio=0.5, group_size=1)
    m.forward = torch.compile(m.forward, backend=palu_fx.backend(cfg))  # Inductor
    cache = LatentCache(m.config, max_cache_len=MAX_CACHE, compression=cfg)
    out = _generate(m, cache)
    assert out.shape == (2, 9 + NEW)
    assert cache.nbytes <= 0.55 * _static_bytes(static), (cache.nbytes, _static_bytes(static))
    # what was allocated is the latents (and slot positions), nothing full-size
    for layer in cache.layers:
        assert layer.keys.shape == (2, MAX_CACHE, 32) and layer.values.shape == (2, MAX_CACHE, 32)


@pytest.mark.parametrize("group", [1, "all"])
def test_compiled_prefill_copies_no_attention_output(group, monkeypatch):
    # the graph Dynamo traces views SDPA's output ([B, S, H, D] memory) to flatten the heads for
    # o_proj; the op returns that layout, so the rewrite adds no copy before the view (a
    # contiguous result took one here, plus one inside the op). Run on the rewritten aten graph.
    seen, inner = OutputCopies(), palu_fx.compiled._inner

    def watched(*a, **k):
        fn = inner(*a, **k)

        def run(*args):
            with seen:
                return fn(*args)
        return run

    monkeypatch.setattr(palu_fx.compiled, "_inner", watched)
    m = _model("llama")
    cfg = PaluConfig(rank_ratio=0.5, group_size=group)
    m.forward = torch.compile(m.forward, backend=palu_fx.backend(cfg, eager=True))
    cache = LatentCache(m.config, max_cache_len=MAX_CACHE, compression=cfg)
    m(input_ids=_prompts()[0], past_key_values=cache, cache_position=torch.arange(9))
    assert seen.calls == m.config.num_hidden_layers and seen.copied == 0


def test_full_rank_inductor_matches():
    ref = _generate(_model("qwen2"), StaticCache(config=_model("qwen2").config, max_cache_len=MAX_CACHE))
    m = _model("qwen2")
    cfg = PaluConfig(rank_ratio=1.0, group_size="all")
    m.forward = torch.compile(m.forward, backend=palu_fx.backend(cfg))
    assert torch.equal(_generate(m, LatentCache(m.config, MAX_CACHE, cfg)), ref)


def _graphs_and_breaks():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def test_no_more_graphs_than_without_palu():
    from torch._dynamo.utils import counters

    counters.clear()
    m = _model("llama")
    m.forward = torch.compile(m.forward, backend="eager")
    _generate(m, StaticCache(config=m.config, max_cache_len=MAX_CACHE))
    baseline = _graphs_and_breaks()
    torch._dynamo.reset()
    counters.clear()
    m = _model("llama")
    cfg = PaluConfig(rank_ratio=0.5)
    m.forward = torch.compile(m.forward, backend=palu_fx.backend(cfg, eager=True))
    _generate(m, LatentCache(m.config, MAX_CACHE, cfg))
    assert _graphs_and_breaks() == baseline and baseline[0] >= 2  # prefill + decode


def test_model_without_attention_runs_with_a_warning():
    m = MLPOnly()
    ref = m(torch.randint(0, 256, (1, 5)), torch.arange(5))
    m.forward = torch.compile(m.forward, backend=palu_fx.palu_backend)
    ids = torch.randint(0, 256, (1, 5))
    with pytest.warns(UserWarning, match="no attention op found"):
        out = m(ids, torch.arange(5))
    assert out.shape == ref.shape


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_a_cache_the_backend_cannot_use_compiles_without_palu(cache_kind):
    ref = _generate(_model("llama"), None)
    m = _model("llama")
    m.forward = torch.compile(m.forward, backend=palu_fx.backend(PaluConfig(group_size=3)))  # 2 KV heads: no fit
    cache = DynamicCache() if cache_kind == "dynamic" else StaticCache(config=m.config, max_cache_len=MAX_CACHE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _generate(m, cache)
    assert torch.equal(out, ref)
    msgs = [str(w.message) for w in caught if "palu-fx" in str(w.message)]
    assert msgs and all("without Palu" in s for s in msgs)


def test_latent_cache_with_a_group_size_that_does_not_fit_names_the_field():
    m = _model("llama")
    cfg = PaluConfig(group_size=3)
    m.forward = torch.compile(m.forward, backend=palu_fx.backend(cfg, eager=True))
    with pytest.raises(Exception, match=r"group_size=3 .*valid sizes: \[1, 2\]"):
        _generate(m, LatentCache(m.config, MAX_CACHE, cfg))


def test_latent_cache_without_the_backend_says_so():
    m = _model("llama")
    with pytest.raises(RuntimeError, match="palu_backend"):
        _generate(m, LatentCache(m.config, MAX_CACHE, PaluConfig()))


def test_bad_backend_arguments():
    with pytest.raises(TypeError, match="PaluConfig or CompressionPlan"):
        palu_fx.backend({"rank_ratio": 0.5})
    with pytest.raises(TypeError, match="PaluConfig or CompressionPlan"):
        LatentCache(_model("llama").config, MAX_CACHE, compression="half")


def test_backend_mode_and_options_are_checked_and_reach_inductor(monkeypatch):
    with pytest.raises(ValueError, match="mode='fastest'"):
        palu_fx.backend(mode="fastest")
    with pytest.raises(ValueError, match="'triton.nope' is not an Inductor setting"):
        palu_fx.backend(options={"triton.nope": True})
    seen = []
    import torch._inductor.compile_fx as cfx

    real = cfx.compile_fx
    def spy(gm, ex, config_patches=None, **kw):
        if "inner_compile" not in kw:  # our call, not compile_fx's call to itself
            seen.append(config_patches)
        return real(gm, ex, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    m = _model("llama")
    cfg = PaluConfig(rank_ratio=0.5, group_size=1)
    # on the CPU Inductor skips CUDA graphs and compiles as usual
    m.forward = torch.compile(m.forward, backend=palu_fx.backend(cfg, mode="reduce-overhead",
                                                                 options={"max_autotune": False}))
    out = _generate(m, LatentCache(m.config, max_cache_len=MAX_CACHE, compression=cfg))
    assert out.shape == (2, 9 + NEW)
    assert seen and all({k: v for k, v in p.items() if k != "post_grad_custom_pre_pass"}
                        == {"triton.cudagraphs": True, "max_autotune": False} for p in seen)


def test_inductor_cache_is_keyed_by_the_op_contracts(monkeypatch, tmp_path):
    """Inductor's FX graph cache does not see a custom op's fake implementation: the backend adds
    a no-op pass whose uuid hashes the ops' contract sources, so a changed contract misses the
    cache instead of running code compiled for the old one."""
    from palu_fx import compiled

    key = compiled._inductor_options(None, None)["post_grad_custom_pre_pass"]
    assert key.uuid() == key.uuid() and key(torch.fx.Graph()) is None
    fake_ops = tmp_path / "ops.py"
    fake_ops.write_text("strides = (S * H * D, D, H * D, 1)\n")
    monkeypatch.setattr(compiled, "_op_contract_files", lambda: (str(fake_ops),))
    before = key.uuid()
    fake_ops.write_text("strides = (H * S * D, S * D, D, 1)\n")  # the contract changed
    assert key.uuid() != before
    # a hook the caller sets is theirs
    mine = object()
    assert compiled._inductor_options(None, {"post_grad_custom_pre_pass": mine})["post_grad_custom_pre_pass"] is mine


def test_cache_buffers_stay_static_inputs_for_cuda_graphs(monkeypatch):
    """The rewritten graph keeps Dynamo's input metadata: CUDA graphs (reduce-overhead) skip
    any graph that writes an input not known to be static, i.e. every decode step."""
    graphs = []
    real = palu_fx.compiled._inner
    monkeypatch.setattr(palu_fx.compiled, "_inner", lambda gm, ex, *a: graphs.append((gm, ex)) or real(gm, ex, *a))
    m = _model("llama")
    cfg = PaluConfig(rank_ratio=0.5, group_size=1)
    m.forward = torch.compile(m.forward, backend=palu_fx.backend(cfg, eager=True))
    cache = LatentCache(m.config, max_cache_len=MAX_CACHE, compression=cfg)
    cache.early_initialization(2, m.config.num_key_value_heads, m.config.head_dim, m.dtype, m.device)
    _generate(m, cache)
    buffers = {id(t) for layer in cache.layers for t in (layer.keys, layer.values, layer.positions)}
    gm, ex = graphs[-1]
    static = [n.meta.get("tensor_dict", {}).get("_dynamo_static_input_type") is not None
              for n, x in zip(gm.graph.find_nodes(op="placeholder"), ex) if id(x) in buffers]
    assert len(static) == 2 * m.config.num_hidden_layers + 1 and all(static)
    assert gm._param_name_to_source and "dynamo_compile_id" in gm.meta


def test_registered_backend_name_with_defaults():
    m = _model("gpt2")
    m.forward = torch.compile(m.forward, backend="palu")  # PaluConfig() defaults, Inductor
    cache = LatentCache(m.config, MAX_CACHE)
    out = _generate(m, cache)
    assert out.shape == (2, 9 + NEW) and cache.nbytes > 0


def test_factorization_is_reused_across_the_graphs_of_one_model(monkeypatch):
    """Prefill and decode graphs (and recompiles) of one model factor its weights once; a
    new model, or an in-place weight update, gets a fresh plan."""
    calls = []
    real = palu_fx.compiled.make_plan
    monkeypatch.setattr(palu_fx.compiled, "make_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = PaluConfig(rank_ratio=0.5, group_size=1)
    be = palu_fx.backend(cfg, eager=True)
    m = _model("llama")
    m.forward = torch.compile(m.forward, backend=be)
    _generate(m, LatentCache(m.config, max_cache_len=MAX_CACHE, compression=cfg))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2 and len(calls) == 1
    m.model.layers[0].self_attn.k_proj.weight.mul_(1.5)  # a changed weight must be re-factored
    torch._dynamo.reset()  # m.forward recompiles with the same backend
    _generate(m, LatentCache(m.config, max_cache_len=MAX_CACHE, compression=cfg))
    assert len(calls) == 2


def test_slot_positions_are_shared_and_gathered_once(monkeypatch):
    """The rotary coefficients of the cached slots are gathered once per step, not per layer
    (the per-layer gather cost as much memory traffic as the latent reads on a GPU)."""
    graphs = []
    real = palu_fx.compiled._inner
    monkeypatch.setattr(palu_fx.compiled, "_inner", lambda gm, ex, *a: graphs.append(gm) or real(gm, ex, *a))
    cfg = PaluConfig(rank_ratio=0.5, group_size=1)
    m = _model("llama")
    assert m.config.num_hidden_layers >= 2
    m.forward = torch.compile(m.forward, backend=palu_fx.backend(cfg, eager=True))
    cache = LatentCache(m.config, max_cache_len=MAX_CACHE, compression=cfg)
    _generate(m, cache)
    assert len({id(layer.positions) for layer in cache.layers}) == 1
    latents = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert cache.nbytes == latents + cache.layers[0].positions.nbytes
    for gm in graphs:
        slot_gathers = [n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default
                        and n.meta["val"].shape[1] == MAX_CACHE]
        assert len(slot_gathers) == 2, [n.name for n in slot_gathers]  # cos and sin
