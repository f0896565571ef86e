"""What the pass must leave alone, and the errors users see on bad input."""
import pytest
import torch

import palu_fx
from palu_fx import PaluConfig, compress_exported
from palu_fx.export import export_prefill_only
from tests.handwritten import CrossAttentionToy, MLPOnly, export_handwritten
from tests.passes.helpers import exported, rel_err, run, tokens
from tests.zoo import build


def test_graph_without_attention_comes_back_unchanged():
    # MLPOnly also holds softmax(x @ W1^T) @ W2 (a softmax between two matmuls with weights)
    ep = export_handwritten(MLPOnly())
    ep2 = compress_exported(ep, PaluConfig())
    rep = palu_fx.report(ep2)
    assert rep.sites == [] and rep.skipped == []
    assert ep2.graph_module.code == ep.graph_module.code


def test_cross_attention_is_skipped_with_a_reason():
    ep = export_handwritten(CrossAttentionToy())
    ep2 = compress_exported(ep, PaluConfig(rank_ratio=0.5, group_size=1))
    rep = palu_fx.report(ep2)
    assert rep.sites == [] and len(rep.skipped) == 1
    assert "memory" in rep.skipped[0].reason and "cross-attention" in rep.skipped[0].reason
    ids, mem = torch.randint(0, 256, (1, 5)), torch.randn(1, 6, 64)
    assert torch.equal(ep2.module()(input_ids=ids, memory=mem), ep.module()(input_ids=ids, memory=mem))


def test_second_compression_is_refused():
    ep2 = compress_exported(exported("llama"), PaluConfig(rank_ratio=0.5))
    with pytest.raises(ValueError, match="already compressed"):
        compress_exported(ep2, PaluConfig(rank_ratio=0.5))


def test_prefill_only_program_compresses_projections_and_reports_no_cache():
    model = build("llama")
    ep = export_prefill_only(model, seq_len=8)
    ep1 = compress_exported(ep, PaluConfig(rank_ratio=1.0, group_size=1))
    rep = palu_fx.report(ep1)
    assert len(rep.sites) == 2 and not rep.cache_found
    assert all(not s.cached for s in rep.sites) and rep.cache_bytes_before == 0
    ids = torch.randint(3, 256, (1, 8))
    ref = ep.module()(input_ids=ids)
    out = ep1.module()(input_ids=ids)
    ref, out = (getattr(x, "logits", x) for x in (ref, out))
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("bad,exc,match", [
    ("not a program", TypeError, "ExportedProgram"),
    (torch.nn.Linear(2, 2), TypeError, "ExportedProgram"),
])
def test_wrong_program_type(bad, exc, match):
    with pytest.raises(exc, match=match):
        compress_exported(bad, PaluConfig())


def test_wrong_config_type():
    with pytest.raises(TypeError, match="PaluConfig"):
        compress_exported(exported("llama"), {"rank_ratio": 0.5})


def test_group_size_not_dividing_kv_heads_lists_valid_sizes_and_leaves_program_alone():
    ep = exported("llama")  # 2 KV heads
    code = ep.graph_module.code
    with pytest.raises(ValueError, match=r"group_size=3 .* valid sizes: \[1, 2\]"):
        compress_exported(ep, PaluConfig(group_size=3))
    assert ep.graph_module.code == code
    assert torch.isfinite(run(ep, tokens())).all()


def test_report_requires_a_compressed_program():
    with pytest.raises(ValueError, match="no palu-fx report"):
        palu_fx.report(exported("llama"))
    with pytest.raises(TypeError):
        palu_fx.report(42)
