"""Rank allocators: budget, rounding, bounds, and the behaviour each one promises."""
import dataclasses
import itertools
import math

import pytest
import torch

from palu_fx.compress.allocate import (
    MatrixStats,
    allocate,
    allocate_energy,
    allocate_fisher,
    allocate_uniform,
    energy_weighting,
    fisher_scores,
    kept_rank,
    round_rank,
    total_rank,
)
from palu_fx.config import PaluConfig


def spectrum(groups: int, full: int, decay: float, scale: float = 1.0) -> torch.Tensor:
    """Geometric singular values ``[groups, full]``: small ``decay`` = nearly low rank."""
    s = scale * decay ** torch.arange(full, dtype=torch.float64)
    return s.expand(groups, full).clone()


def model_like(groups: int = 1, full: int = 192, layers: int = 6) -> list[MatrixStats]:
    """K (fast decay) and V (slow decay) per layer, with different scales and Fisher scores."""
    out = []
    for i in range(layers):
        out.append(MatrixStats(f"{i}.k", groups, full, spectrum(groups, full, 0.90, 10.0 * (i + 1)),
                               fisher=0.01 * (i + 1), fisher_trace=1.0 + i, input_energy=100.0))
        out.append(MatrixStats(f"{i}.v", groups, full, spectrum(groups, full, 0.98, 1.0),
                               fisher=0.05, fisher_trace=50.0, input_energy=100.0))
    return out


ALLOCATORS = {
    "uniform": lambda st, r, m: allocate_uniform(st, r, m),
    "fisher": lambda st, r, m: allocate_fisher(st, r, m),
    "energy": lambda st, r, m: allocate_energy(st, r, m),
    "energy-sens": lambda st, r, m: allocate_energy(st, r, m, normalize=False, sensitivity_power=1.0),
}


@pytest.mark.filterwarnings("ignore:rank_ratio=.* is below the floor")
@pytest.mark.parametrize("name", list(ALLOCATORS))
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("groups,full,multiple", [(1, 192, 16), (3, 64, 16), (3, 64, 32), (2, 40, 16)],
                         ids=["J-192-m16", "M-64-m16", "M-64-m32", "G-40-m16"])
def test_budget_rounding_and_bounds(name, ratio, groups, full, multiple):
    stats = model_like(groups, full)
    ranks = ALLOCATORS[name](stats, ratio, multiple)
    assert set(ranks) == {s.name for s in stats}
    for s in stats:
        r = ranks[s.name]
        assert multiple <= r <= full or r == full
        assert r % multiple == 0 or r == full
    budget = ratio * total_rank(stats)
    kept = kept_rank(stats, ranks)
    floor = sum(s.num_groups * min(multiple, full) for s in stats)
    if name.startswith("energy") and floor > budget:  # the floor wins, as for uniform
        assert ranks == {s.name: min(multiple, full) for s in stats}
    elif name.startswith("energy"):
        assert kept <= budget  # water-filling never overshoots
        # ...and leaves less than one block per matrix unspent.
        assert kept > budget - sum(s.num_groups * multiple for s in stats)
    else:  # nearest-multiple rounding per matrix: off by at most half a block each
        assert abs(kept - budget) <= sum(s.num_groups * (multiple / 2 + 1) for s in stats)


@pytest.mark.parametrize("name", list(ALLOCATORS))
def test_ratio_one_keeps_everything(name):
    stats = model_like(3, 64)
    assert ALLOCATORS[name](stats, 1.0, 16) == {s.name: 64 for s in stats}


def test_uniform_rounds_to_nearest_multiple():
    stats = [MatrixStats("j", 1, 192), MatrixStats("m", 3, 64), MatrixStats("tiny", 1, 8)]
    assert allocate_uniform(stats, 0.7, 16) == {"j": 128, "m": 48, "tiny": 8}  # 134.4, 44.8, full < multiple
    assert allocate_uniform(stats, 0.5, 16) == {"j": 96, "m": 32, "tiny": 8}
    assert allocate_uniform(stats, 0.01, 16) == {"j": 16, "m": 16, "tiny": 8}  # floor: one multiple
    assert round_rank(134.4, 1, 192) == 134


def test_energy_below_floor_keeps_floor_and_warns():
    with pytest.warns(UserWarning, match="floor"):
        ranks = allocate_energy([MatrixStats("a", 1, 64, torch.ones(1, 64))], 0.1, 16)
    assert ranks == {"a": 16}


def test_energy_prefers_the_matrix_that_is_not_low_rank():
    stats = [MatrixStats("lowrank", 1, 128, spectrum(1, 128, 0.8)), MatrixStats("flat", 1, 128, spectrum(1, 128, 0.995))]
    ranks = allocate_energy(stats, 0.5, 16)
    assert ranks["flat"] > ranks["lowrank"]
    assert ranks["lowrank"] + ranks["flat"] == 128
    # Counter-example: uniform ignores the spectra.
    assert allocate_uniform(stats, 0.5, 16) == {"lowrank": 64, "flat": 64}


def test_energy_normalization_makes_scale_irrelevant():
    base = [MatrixStats("a", 1, 96, spectrum(1, 96, 0.95)), MatrixStats("b", 1, 96, spectrum(1, 96, 0.97))]
    loud = [base[0], MatrixStats("b", 1, 96, spectrum(1, 96, 0.97, scale=1e3))]
    assert allocate_energy(base, 0.5, 16) == allocate_energy(loud, 0.5, 16)
    # Without normalization the loud matrix takes everything it can.
    raw = allocate_energy(loud, 0.5, 16, normalize=False)
    assert raw["b"] == 80 and raw["a"] == 16


def _lost(stats, ranks):
    return sum(float(s.singular_values[:, ranks[s.name]:].pow(2).sum() / s.singular_values.pow(2).sum()) for s in stats)


def test_energy_greedy_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    stats = []
    for i, (g, full) in enumerate([(1, 64), (2, 32), (1, 48)]):
        sv = torch.sort(torch.rand(g, full, generator=gen, dtype=torch.float64) ** (3 + i), descending=True).values
        stats.append(MatrixStats(f"m{i}", g, full, sv))
    ratio, m = 0.45, 16
    got = allocate_energy(stats, ratio, m)
    budget = ratio * total_rank(stats)
    best = None
    for combo in itertools.product(*[range(m, s.full_rank_per_group + 1, m) for s in stats]):
        ranks = {s.name: r for s, r in zip(stats, combo)}
        if kept_rank(stats, ranks) <= budget and (best is None or _lost(stats, ranks) < _lost(stats, best)):
            best = ranks
    assert _lost(stats, got) == pytest.approx(_lost(stats, best))


def test_energy_sensitivity_moves_rank_to_sensitive_matrices():
    sv = spectrum(1, 128, 0.97)
    stats = [
        MatrixStats("dull", 1, 128, sv, fisher_trace=1.0, input_energy=10.0),
        MatrixStats("sharp", 1, 128, sv, fisher_trace=100.0, input_energy=10.0),
    ]
    plain = allocate_energy(stats, 0.5, 16)
    assert plain["dull"] == plain["sharp"]  # identical spectra, no sensitivity: a tie
    weighted = allocate_energy(stats, 0.5, 16, sensitivity_power=1.0)
    assert weighted["sharp"] > weighted["dull"]


def test_fisher_is_proportional_then_rounded():
    stats = [MatrixStats("a", 1, 256, fisher=1.0), MatrixStats("b", 1, 256, fisher=3.0)]
    # target 0.5 * 512 = 256 -> shares 64 and 192
    assert allocate_fisher(stats, 0.5, 16) == {"a": 64, "b": 192}
    # A share above full rank is capped; the excess goes to the other matrix.
    stats = [MatrixStats("a", 1, 128, fisher=1.0), MatrixStats("b", 1, 128, fisher=9.0)]
    assert allocate_fisher(stats, 0.75, 16) == {"a": 64, "b": 128}  # shares 19.2, 172.8 (cap 128)


def test_fisher_splits_evenly_over_groups():
    stats = [MatrixStats("a", 3, 64, fisher=1.0), MatrixStats("b", 3, 64, fisher=1.0)]
    ranks = allocate_fisher(stats, 0.5, 16)
    assert ranks == {"a": 32, "b": 32}


def test_fisher_scores_are_palu_rms_mean_and_trace():
    g2 = torch.tensor([[4.0, 0.0], [1.0, 9.0]])
    palu, trace = fisher_scores(g2)
    assert palu == pytest.approx((2 + 0 + 1 + 3) / 4)
    assert trace == pytest.approx(14.0)
    with pytest.raises(ValueError, match="non-negative"):
        fisher_scores(-g2)


def test_allocate_dispatches_on_config():
    stats = model_like(1, 192, layers=2)
    for alloc, fn in [("uniform", allocate_uniform), ("fisher", allocate_fisher)]:
        cfg = PaluConfig(rank_ratio=0.5, rank_multiple=16, allocator=alloc, group_size="all")
        assert allocate(stats, cfg) == fn(stats, 0.5, 16)
    cfg = PaluConfig(rank_ratio=0.5, rank_multiple=16, allocator="energy", group_size="all")
    assert allocate(stats, cfg) == allocate_energy(stats, 0.5, 16, normalize=False, sensitivity_power=0.5)


def _with(stats, **changes):
    return [dataclasses.replace(s, **changes) for s in stats]


def test_energy_weighting_follows_the_spectrum_kind():
    stats = model_like(1, 64, layers=2)
    # loss-unit spectra (kfac) are compared as they are
    assert energy_weighting(_with(stats, spectrum="loss")) == {"normalize": False, "sensitivity_power": 0.0}
    # whitened + Fisher: tempered K-FAC sensitivity
    assert energy_weighting(stats) == {"normalize": False, "sensitivity_power": 0.5}
    # whitened without Fisher, or plain: relative energy
    assert energy_weighting(_with(stats, fisher_trace=None)) == {"normalize": True, "sensitivity_power": 0.0}
    assert energy_weighting(_with(stats, spectrum="plain")) == {"normalize": True, "sensitivity_power": 0.0}
    with pytest.raises(ValueError, match="one kind"):
        energy_weighting([stats[0], dataclasses.replace(stats[1], spectrum="loss")])


def test_loss_spectra_let_a_sensitive_value_beat_a_loud_key():
    # In loss units a matrix with larger singular values simply matters more: no
    # normalization may hide that (relative energy would split the budget evenly here).
    k = MatrixStats("k", 1, 64, spectrum(1, 64, 0.95, scale=1.0), spectrum="loss")
    v = MatrixStats("v", 1, 64, spectrum(1, 64, 0.95, scale=10.0), spectrum="loss")
    cfg = PaluConfig(rank_ratio=0.5, rank_multiple=16, allocator="energy", group_size="all")
    ranks = allocate([k, v], cfg)
    assert ranks["v"] > ranks["k"]
    assert allocate_energy([k, v], 0.5, 16) == {"k": 32, "v": 32}  # normalized: a tie


@pytest.mark.parametrize(
    "call,match",
    [
        pytest.param(lambda: allocate_energy([MatrixStats("a", 1, 64)], 0.5, 16), "singular_values", id="energy-no-sv"),
        pytest.param(lambda: allocate_fisher([MatrixStats("a", 1, 64)], 0.5, 16), "fisher", id="fisher-no-score"),
        pytest.param(lambda: allocate_uniform([MatrixStats("a", 1, 64)] * 2, 0.5, 16), "unique", id="duplicate-names"),
        pytest.param(lambda: allocate_uniform([], 0.5, 16), "at least one", id="empty"),
        pytest.param(lambda: allocate_uniform([MatrixStats("a", 1, 64)], 1.5, 16), "rank_ratio", id="ratio"),
        pytest.param(lambda: MatrixStats("a", 2, 64, torch.ones(1, 64)), "shape", id="sv-shape"),
        pytest.param(lambda: MatrixStats("a", 1, 64, fisher=math.nan), "fisher", id="nan-fisher"),
        pytest.param(lambda: MatrixStats("a", 1, 64, spectrum="fancy"), "spectrum", id="bad-spectrum"),
        pytest.param(lambda: allocate_energy([MatrixStats("a", 1, 64, torch.ones(1, 64))], 0.5, 16, weights={}),
                     "weights", id="weights-missing-name"),
        pytest.param(lambda: allocate_energy([MatrixStats("a", 1, 64, torch.ones(1, 64))], 0.5, 16,
                                             sensitivity_power=1.0), "fisher_trace", id="sens-no-fisher"),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_energy_looks_past_a_dip_in_a_weighted_spectrum():
    # Loss-weighted spectra need not decrease: A's second block is worthless but its third
    # is worth more than all of B's; a one-block-at-a-time greedy would give B everything.
    a = torch.cat([torch.full((16,), 5.0), torch.full((16,), 0.01), torch.full((16,), 4.0)]).double()
    b = torch.cat([torch.full((16,), 5.0), torch.full((16,), 2.0), torch.full((16,), 2.0)]).double()
    stats = [MatrixStats("a", 1, 48, a[None], spectrum="loss"), MatrixStats("b", 1, 48, b[None], spectrum="loss")]
    ranks = allocate_energy(stats, 64 / 96, 16, normalize=False)
    assert ranks == {"a": 48, "b": 16}
    # With room for only one more block, the dip cannot be crossed: B gets it.
    assert allocate_energy(stats, 48 / 96, 16, normalize=False) == {"a": 16, "b": 32}
