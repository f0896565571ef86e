"""How the fused kernels split the cached sequence (flash-decoding) over programs."""
from __future__ import annotations

import pytest
import torch

from palu_fx.kernels.latent_attention.wrapper import (
    CHUNK_QUANTUM, KernelConfig, _resident_programs, _split_plan, choose_config,
)

H200_SMS = 132


def fill(n_base: int, splits: int, slots: int) -> float:
    programs = n_base * splits
    return programs / (-(-programs // slots) * slots)


@pytest.mark.parametrize("n_base, skv, want", [
    (256, 32768, 1),    # B=8 x 32 heads: 256 programs fill 97% of one wave of 264
    (256, 16384, 1),
    (1024, 32768, 1),   # B=32: 3.9 waves
    (128, 32768, 2),    # B=4: two splits make one wave
    (32, 32768, 8),     # B=1: eight (nine would add a wave of 24 programs)
])
def test_fill_waves_takes_the_fewest_splits_that_fill_the_waves(n_base, skv, want):
    cfg = KernelConfig(programs_per_sm=8, fill_waves=True)
    splits, chunk = _split_plan(cfg, n_base, skv, H200_SMS, resident=2)
    assert splits == want
    assert (splits - 1) * chunk < skv <= splits * chunk and chunk % CHUNK_QUANTUM == 0
    assert fill(n_base, splits, 2 * H200_SMS) >= 0.9


def test_fill_waves_falls_back_to_the_best_fill():
    # a short cache caps the splits: no count reaches 90%, the fullest last wave wins
    cfg = KernelConfig(programs_per_sm=8, fill_waves=True)
    splits, _ = _split_plan(cfg, 8, 3 * CHUNK_QUANTUM, H200_SMS, resident=2)
    assert splits == 3


def test_plain_plan_without_occupancy():
    # unknown occupancy, or fill_waves off: programs_per_sm decides, as before
    for cfg, resident in ((KernelConfig(programs_per_sm=8, fill_waves=True), 0),
                          (KernelConfig(programs_per_sm=8, fill_waves=False), 2)):
        splits, chunk = _split_plan(cfg, 256, 32768, H200_SMS, resident)
        assert splits == 5 and chunk == 6656
    assert _split_plan(KernelConfig(num_splits=3, fill_waves=True), 256, 1000, H200_SMS, 2) == (3, 334)


def test_measured_defaults_fill_waves_others_do_not():
    assert choose_config(True, 1, 64, 64, 128, 1, False).fill_waves  # RoPE gs1
    assert choose_config(True, 1, 64, 64, 128, 1, False, quantized=True).fill_waves
    assert choose_config(False, 1, 64, 64, 128, 1, False).fill_waves  # absorbed, fp16 latents
    assert not choose_config(False, 1, 64, 64, 128, 1, False, quantized=True).fill_waves  # no gain (0.422 vs 0.421)
    assert not choose_config(True, 2, 128, 128, 128, 1, False).fill_waves
    assert not choose_config(True, 1, 64, 64, 128, 1, True).fill_waves  # interpreter


def test_resident_programs_unknown_off_gpu():
    assert _resident_programs(object(), (1, 1, 1), (torch.zeros(1),), {"num_warps": 4}) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles for the GPU")
def test_resident_programs_of_the_rope_default_on_gpu():
    from palu_fx.kernels.latent_attention import wrapper
    from palu_fx.kernels.latent_attention.wrapper import latent_attention_triton
    from test_latent_attention import make_inputs

    wrapper._RESIDENT.clear()
    args = make_inputs(B=8, Hq=32, Hkv=32, gs=1, D=128, rk=64, rv=64, Skv=4096, mask="add", dtype=torch.float16)
    latent_attention_triton(*args)
    (resident,) = wrapper._RESIDENT.values()
    assert 1 <= resident <= 32


@pytest.mark.parametrize("regs,warps,want", [(208, 1, 8), (200, 1, 8), (168, 1, 12), (255, 1, 8), (128, 1, 16),
                                             (160, 4, 3), (128, 4, 4), (96, 8, 2), (64, 2, 16)])
def test_programs_by_registers_counts_per_partition(regs, warps, want):
    from palu_fx.kernels.latent_attention.wrapper import programs_by_registers

    assert programs_by_registers(regs, warps) == want
