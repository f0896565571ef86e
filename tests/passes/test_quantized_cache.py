"""Quantized latent cache: packed 2/3/4-bit codes with fp16 scales/zeros are what is stored."""
import pytest
import torch

import palu_fx
from palu_fx import PaluConfig, compress_exported
from palu_fx.quant import bytes_per_token
from tests.passes.helpers import BATCH, MAX_CACHE, cache_buffers, cache_bytes, exported, rel_err, run, tokens


@pytest.fixture(scope="module")
def reference():
    ep = exported("llama")
    ids = tokens()
    return ep, ids, run(ep, ids)


def test_bits_trade_bytes_for_error(reference):
    ep, ids, ref = reference
    errs, sizes = [], []
    for bits in (4, 3, 2):
        ep_q = compress_exported(ep, PaluConfig(rank_ratio=1.0, group_size=1, bits=bits))
        bufs = cache_buffers(ep_q)
        codes = [t for k, t in bufs.items() if k.endswith("_codes")]
        assert codes and all(t.dtype == torch.uint8 for t in codes)
        # codes + fp16 scale/zero per token for K and V of 2 layers (latent width 2 groups x 32),
        # plus one int64 slot-position row shared by the sequences and the layers
        expected = 2 * 2 * BATCH * MAX_CACHE * bytes_per_token(64, bits, 32) + MAX_CACHE * 8
        assert cache_bytes(ep_q) == expected == palu_fx.report(ep_q).cache_bytes_after
        errs.append(rel_err(run(ep_q, ids), ref))
        sizes.append(cache_bytes(ep_q))
    assert errs[0] < errs[1] < errs[2] and errs[0] < 0.3
    assert sizes[0] > sizes[1] > sizes[2] and sizes[0] < 0.2 * cache_bytes(ep)


def test_hadamard_without_quantization_is_lossless(reference):
    ep, ids, ref = reference
    ep_h = compress_exported(ep, PaluConfig(rank_ratio=1.0, group_size=1, hadamard=True))
    assert rel_err(run(ep_h, ids), ref) < 1e-4


def test_quantized_program_saves_and_loads(reference, tmp_path):
    ep, ids, _ = reference
    ep_q = compress_exported(ep, PaluConfig(rank_ratio=0.5, group_size=1, bits=4, hadamard=True))
    torch.export.save(ep_q, str(tmp_path / "q.pt2"))
    assert torch.equal(run(torch.export.load(str(tmp_path / "q.pt2")), ids), run(ep_q, ids))


def test_quant_group_size_must_divide_the_rank(reference):
    ep, *_ = reference
    with pytest.raises(Exception, match="quant_group_size=24"):
        compress_exported(ep, PaluConfig(rank_ratio=1.0, group_size=1, bits=4, quant_group_size=24))


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "inductor"])
def test_latent_cache_under_compile_matches_the_exported_program(reference, eager):
    """A quantized LatentCache under torch.compile holds packed rows (codes, fp16 scales and
    zeros) and gives the logits of the quantized exported program of the same model."""
    from palu_fx import LatentCache
    from palu_fx.quant.rows import row_layout
    from tests.passes.helpers import DECODE, PREFILL, perturbed
    from tests.zoo import build

    ep, ids, _ = reference
    cfg = PaluConfig(rank_ratio=0.5, group_size=1, bits=4, hadamard=True)
    want = run(compress_exported(ep, cfg), ids)
    torch._dynamo.reset()
    model = perturbed(build("llama"))
    model.forward = torch.compile(model.forward, backend=palu_fx.backend(cfg, eager=eager))
    cache = LatentCache(model.config, MAX_CACHE, cfg)
    with torch.no_grad():
        outs = [model(input_ids=ids[:, :PREFILL], past_key_values=cache, cache_position=torch.arange(PREFILL)).logits]
        for t in range(PREFILL, PREFILL + DECODE):
            outs.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache,
                              cache_position=torch.tensor([t])).logits)
    torch._dynamo.reset()
    assert rel_err(torch.cat(outs, 1), want) < 1e-4
    row = row_layout(32, 4, 16).row_bytes  # 2 KV heads x rank 16, one scale/zero per head
    for layer in cache.layers:
        assert layer.keys.dtype == torch.uint8 and layer.keys.shape == (BATCH, MAX_CACHE, row)
    assert cache.nbytes == 2 * len(cache.layers) * BATCH * MAX_CACHE * row + BATCH * MAX_CACHE * 8


@pytest.mark.parametrize("cache_bits,backend_bits", [(4, None), (None, 4), (2, 4)])
def test_latent_cache_and_backend_must_agree_on_bits(cache_bits, backend_bits):
    """A LatentCache built for other bits than the backend's config: a clear error, not garbage."""
    from palu_fx import LatentCache
    from tests.passes.helpers import PREFILL
    from tests.zoo import build

    torch._dynamo.reset()
    model = build("llama")
    model.forward = torch.compile(model.forward, backend=palu_fx.backend(
        PaluConfig(rank_ratio=0.5, group_size=1, bits=backend_bits), eager=True))
    cache = LatentCache(model.config, MAX_CACHE, PaluConfig(rank_ratio=0.5, group_size=1, bits=cache_bits))
    with pytest.raises(Exception, match="build the cache with the same config or plan as the backend"):
        with torch.no_grad():
            model(input_ids=tokens()[:, :PREFILL], past_key_values=cache, cache_position=torch.arange(PREFILL))
    torch._dynamo.reset()
