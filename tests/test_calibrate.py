"""Calibration through the graph: Grams, Fisher, calibrated plans (tiny random models)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palu_fx import CompressionPlan, PaluConfig, compress_exported  # noqa: E402
from palu_fx.calibrate import calibrated_plan, collect_fisher, collect_grams  # noqa: E402
from palu_fx.export import export_prefill_only  # noqa: E402
from palu_fx.exported import analyze_exported  # noqa: E402
from tests.passes.helpers import exported, perturbed, rel_err, run, tokens  # noqa: E402
from tests.zoo import build  # noqa: E402


@pytest.fixture(scope="module")
def calib():
    model = perturbed(build("qwen2"))
    ep = export_prefill_only(model, seq_len=16, max_seq_len=32)
    batches = [torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return model, ep, batches


def test_grams_are_the_input_activations(calib):
    model, ep, batches = calib
    sites, *_ = analyze_exported(ep)
    cal = collect_grams(ep, sites, batches, progress=False)
    # the K/V projections of layer 0 read the output of the first input norm: recompute it eagerly
    x = torch.cat([model.model.layers[0].input_layernorm(model.model.embed_tokens(b)) for b in batches], 1)[0]
    gram = cal.grams[sites[0].key.proj.input.name]
    assert torch.allclose(gram, (x.T @ x).double(), rtol=1e-4, atol=1e-3)
    assert cal.tokens == 48


def test_fisher_and_output_grams(calib):
    _, ep, batches = calib
    sites, *_ = analyze_exported(ep)
    fi = collect_fisher(ep, sites, batches, progress=False, output_grams=True)
    k = fi[(0, "key")]
    assert k.shape == (64, 128) and (k >= 0).all() and k.sum() > 0
    g = fi[(0, "key", "out")]
    assert g.shape == (64, 64) and torch.allclose(g, g.T) and torch.linalg.eigvalsh(g).min() > -1e-6 * g.abs().max()


@pytest.mark.parametrize("method,allocator", [("whitened", "uniform"), ("kfac", "energy"), ("whitened", "fisher")])
def test_full_rank_calibrated_plans_are_lossless(calib, method, allocator):
    _, ep_cal, batches = calib
    plan = calibrated_plan(ep_cal, PaluConfig(rank_ratio=1.0, group_size=1, method=method, allocator=allocator),
                           batches, progress=False)
    ep = exported("qwen2")
    ids = tokens()
    assert rel_err(run(compress_exported(ep, plan), ids), run(ep, ids)) < 1e-4


def test_saved_plan_gives_identical_outputs(calib, tmp_path):
    _, ep_cal, batches = calib
    plan = calibrated_plan(ep_cal, PaluConfig(rank_ratio=0.5, group_size="all", method="kfac", allocator="energy"),
                           batches, progress=False)
    plan.save(str(tmp_path / "plan.pt"))
    loaded = CompressionPlan.load(str(tmp_path / "plan.pt"))
    ep = exported("qwen2")
    ids = tokens(3)
    assert torch.equal(run(compress_exported(ep, plan), ids), run(compress_exported(ep, loaded), ids))
    with pytest.raises(ValueError, match="made for shape"):  # a plan never lands on another model silently
        compress_exported(exported("gpt2"), loaded)


def test_whitened_without_calibration_is_a_clear_error():
    with pytest.raises(ValueError, match="calibrat"):
        compress_exported(exported("qwen2"), PaluConfig(method="whitened"))


def test_plan_from_statistics_rotates_with_hadamard(calib):
    """The sweep's path (precomputed statistics) applies the Hadamard rotation like make_plan:
    same ranks and products ``L @ R``, rotated factors, the rotation recorded in the plan."""
    from palu_fx.calibrate import plan_from_statistics

    _, ep, batches = calib
    sites, _, editor, _ = analyze_exported(ep)
    grams = {}
    fi = collect_fisher(ep, sites, batches, progress=False, output_grams=True, input_grams=grams)
    fisher = {(s.index, r): fi[(s.index, r)] for s in sites for r in ("key", "value")}
    grad = {(s.index, r): fi[(s.index, r, "out")] for s in sites for r in ("key", "value")}
    cfg = PaluConfig(rank_ratio=0.5, group_size="all", method="kfac", allocator="energy", bits=2)
    plain = plan_from_statistics(sites, editor.tensor, cfg, grams, fisher, grad)
    rot = plan_from_statistics(sites, editor.tensor, PaluConfig(**{**cfg.to_dict(), "hadamard": True}), grams,
                               fisher, grad)
    assert rot.config.hadamard and "hadamard" in rot.meta and "hadamard" not in plain.meta
    for a, b in zip(plain.sites, rot.sites):
        for m, n in ((a.key, b.key), (a.value, b.value)):
            assert m.rank == n.rank and not torch.allclose(m.R, n.R)
            assert torch.allclose(m.L @ m.R, n.L @ n.R, atol=1e-5)
