"""Smoke test on a real pretrained model (SmolLM2-135M) and real text, a few hundred tokens.

Skipped with the reason when the model package or the corpus is not installed (CI installs
both: see .ci/install).
"""
import math

import pytest
import torch

from palu_fx import PaluConfig, compress_exported
from palu_fx.calibrate import calibrated_plan
from palu_fx.evaluate import perplexity


@pytest.fixture(scope="module")
def smollm2():
    from palu_fx.data import CorpusNotFoundError, austen_books, austen_split
    from palu_fx.models import ModelPackageMissingError, load_model

    try:
        model, tok = load_model("smollm2-135m")
    except (ModelPackageMissingError, ImportError) as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    try:
        books = austen_books(["prideprejudice", "emma"], download=True)
    except CorpusNotFoundError as e:
        pytest.skip(f"the Austen corpus is not available: {e}")
    split = austen_split(tok, eval_windows=1, eval_window=256, calib_windows=4, calib_window=128, books=books)
    return model, split


def _logits(ep):
    mod = ep.module()
    return lambda ids: mod(input_ids=ids)


@torch.no_grad()
def test_smollm2_full_rank_is_lossless_and_half_rank_stays_sane(smollm2):
    from palu_fx.export import export_prefill_only

    model, split = smollm2
    ep = export_prefill_only(model, seq_len=16, max_seq_len=257)
    ids = split.evaluation[:1]
    ref = model(input_ids=ids, use_cache=False).logits
    full = compress_exported(ep, PaluConfig(rank_ratio=1.0, group_size="all"))
    assert ((full.module()(input_ids=ids) - ref).norm() / ref.norm()).item() < 1e-4
    # whitened SVD (forward-only calibration keeps CI fast; kfac is covered on tiny models)
    plan = calibrated_plan(ep, PaluConfig(rank_ratio=0.5, group_size="all", method="whitened"),
                           list(split.calibration.unsqueeze(1)), progress=False)
    half = compress_exported(ep, plan)
    plain = compress_exported(ep, PaluConfig(rank_ratio=0.5, group_size="all", method="svd"))
    base = perplexity(_logits(ep), split.evaluation, progress=False)
    ppl = perplexity(_logits(half), split.evaluation, progress=False)
    ppl_plain = perplexity(_logits(plain), split.evaluation, progress=False)
    assert 5 < base < 60 and math.isfinite(ppl)
    # 512 calibration tokens are few for a 576-wide whitening; still far from the collapse of
    # data-free SVD on this model (its layer-1 values lose the directions their inputs use)
    assert ppl < 2.5 * base and ppl_plain > 2 * ppl, (base, ppl, ppl_plain)
