"""The zoo exports (one dynamic-seq program: prefill + decode) and matches eager logits.

Runtime: ~2-3 s per zoo entry on 2 CPU cores. The core families run by default; ``PALU_ZOO=all``
runs every family (tests/passes/test_zoo_sweep.py exports all of them through the pass anyway).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palu_fx.export import ExportError, export_decoder, export_prefill_only  # noqa: E402
from tests.handwritten import (  # noqa: E402
    CrossAttentionToy,
    HandwrittenDecoder,
    MLPOnly,
    export_handwritten,
)
from tests.zoo import BROKEN, CORE, ZOO  # noqa: E402

PREFILL, DECODE = 5, 3
RTOL = 1e-4

# The full zoo is exported by tests/passes/test_zoo_sweep.py too; here the core families are
# checked against eager logits unless PALU_ZOO=all.
_NAMES = list(ZOO) if os.environ.get("PALU_ZOO", "") == "all" else list(CORE)


def _tokens(n: int = PREFILL + DECODE) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _run_static_cache_program(ep: torch.export.ExportedProgram, ids: torch.Tensor) -> torch.Tensor:
    """Prefill PREFILL tokens, then decode the rest one by one; concatenated logits."""
    m = ep.module()
    outs = [m(input_ids=ids[:, :PREFILL], cache_position=torch.arange(PREFILL))]
    for p in range(PREFILL, ids.shape[1]):
        outs.append(m(input_ids=ids[:, p:p + 1], cache_position=torch.arange(p, p + 1)))
    return torch.cat(outs, dim=1)


def _check_zoo_entry(name: str, entry, model=None) -> None:
    model = entry() if model is None else model
    gen_cfg_before = model.generation_config.cache_implementation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = export_decoder(model, batch_size=1, max_cache_len=64)
    assert model.generation_config.cache_implementation == gen_cfg_before, "export_decoder changed the model"

    # The cache buffers the pass will replace: one key/value buffer per layer, shaped as the facts say.
    bufs = dict(ep.named_buffers())
    for i in range(entry.num_layers):
        assert tuple(bufs[f"key_cache_{i}"].shape) == entry.cache_shape(), (name, i, bufs[f"key_cache_{i}"].shape)
        assert tuple(bufs[f"value_cache_{i}"].shape) == entry.cache_shape()

    ids = _tokens()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = _run_static_cache_program(ep, ids)
    assert out.shape == ref.shape
    rel = _rel(out, ref)
    assert rel < RTOL, f"{name}: exported prefill+decode differs from eager (rel {rel:.2e})"


@pytest.mark.parametrize("name", _NAMES)
def test_zoo_export_matches_eager(name: str) -> None:
    entry = ZOO[name]
    if not entry.available():
        pytest.skip(f"transformers {transformers.__version__} has no model type {entry.model_type!r}")
    if not entry.supported_here():
        pytest.xfail(f"{name} needs transformers >= {entry.min_transformers}: {entry.notes}")
    model = entry()
    assert model.config._attn_implementation == entry.attn_impl
    _check_zoo_entry(name, entry, model)


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_families_still_broken(name: str) -> None:
    """Documented failures; xfail (non-strict) so an upgrade that fixes them shows as XPASS."""
    entry, reason = BROKEN[name]
    if not entry.available():
        pytest.skip(f"transformers {transformers.__version__} has no model type {entry.model_type!r}")
    try:
        _check_zoo_entry(name, entry)
    except Exception as e:  # noqa: BLE001 - any failure is the documented one
        pytest.xfail(f"{reason} [{type(e).__name__}]")


def test_export_error_names_model_and_hints() -> None:
    entry, _ = BROKEN["falcon_mqa"]
    with pytest.raises(ExportError) as info:
        export_decoder(entry())
    msg = str(info.value)
    assert "FalconForCausalLM" in msg and "Hint:" in msg
    assert info.value.__cause__ is not None


def test_export_decoder_static_decode_program() -> None:
    model = ZOO["llama"]()
    ep = export_decoder(model, dynamic_seq=False)  # S = 1: a decode-only program
    ids = _tokens()
    m = ep.module()
    with torch.no_grad():
        out = torch.cat([m(input_ids=ids[:, p:p + 1], cache_position=torch.arange(p, p + 1))
                         for p in range(ids.shape[1])], dim=1)
        ref = model(ids, use_cache=False).logits
    assert _rel(out, ref) < RTOL


def test_export_decoder_batch2() -> None:
    model = ZOO["qwen2"]()
    ep = export_decoder(model, batch_size=2, max_cache_len=32)
    ids = torch.randint(3, 256, (2, PREFILL + DECODE), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = _run_static_cache_program(ep, ids)
        ref = model(ids, use_cache=False).logits
    assert _rel(out, ref) < RTOL


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3"])
def test_export_prefill_only(name: str) -> None:
    model = ZOO[name]()
    ep = export_prefill_only(model, seq_len=6)
    for n in (3, 9):
        ids = _tokens(n)
        with torch.no_grad():
            assert _rel(ep.module()(input_ids=ids), model(ids, use_cache=False).logits) < RTOL


# ---- hand-written models ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {},
    {"rope": "half", "mask": "masked_fill"},
    {"cache_write": "index_put", "qkv_bias": True},
    {"rope": "none", "kv_heads": 1},
], ids=["interleaved-additive-index_copy", "half-masked_fill", "index_put-bias", "nope-mqa"])
def test_handwritten_decoder_export(kwargs) -> None:
    model = HandwrittenDecoder(**kwargs)
    ep = export_handwritten(model)
    ids = _tokens()
    with torch.no_grad():
        out = _run_static_cache_program(ep, ids)
        model.reset_cache()  # ep.module() shares (and has mutated) the model's cache buffers
        ref = model(ids, torch.arange(ids.shape[1]))
    assert _rel(out, ref) < RTOL
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "aten.scaled_dot_product_attention.default" not in targets
    assert "aten.softmax.int" in targets
    if kwargs.get("kv_heads", 2) > 1:
        assert "aten.repeat_interleave.self_int" in targets


def test_cross_attention_toy_export() -> None:
    model = CrossAttentionToy()
    ep = export_handwritten(model)
    ids, mem = _tokens(), torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _rel(ep.module()(input_ids=ids, memory=mem), model(ids, mem)) < RTOL
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "aten.scaled_dot_product_attention.default" in targets
    assert not any("index_copy" in t or "index_put" in t for t in targets)


def test_mlp_only_export() -> None:
    model = MLPOnly()
    ep = export_handwritten(model)
    ids = _tokens()
    with torch.no_grad():
        assert _rel(ep.module()(input_ids=ids, cache_position=torch.arange(ids.shape[1])),
                    model(ids, torch.arange(ids.shape[1]))) < RTOL
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "aten.scaled_dot_product_attention.default" not in targets and "aten.softmax.int" in targets
