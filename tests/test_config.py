"""PaluConfig validates at construction and names the field."""
import pytest

from palu_fx import GROUP_ALL, PaluConfig


@pytest.mark.parametrize("field,value", [
    ("rank_ratio", 0.0), ("rank_ratio", 1.5), ("rank_ratio", -0.1), ("rank_ratio", float("nan")), ("rank_ratio", "half"),
    ("rank_ratio", True), ("group_size", 0), ("group_size", -2), ("group_size", "some"), ("group_size", 2.0),
    ("rank_multiple", 0), ("rank_multiple", 1.5), ("method", "qr"), ("allocator", "random"), ("fold_values", 1),
])
def test_invalid_field_is_named(field, value):
    with pytest.raises(ValueError, match=rf"PaluConfig\.{field}="):
        PaluConfig(**{field: value})


def test_valid_configs():
    assert PaluConfig(rank_ratio=1.0, group_size=GROUP_ALL).group_size == "all"
    assert PaluConfig(rank_ratio=0.25, group_size=1, rank_multiple=8).rank_multiple == 8


def test_group_size_must_divide_kv_heads_and_lists_valid_sizes():
    cfg = PaluConfig(group_size=4)
    with pytest.raises(ValueError, match=r"valid sizes: \[1, 2, 3, 6\]"):
        cfg.group_size_for(6)
    assert cfg.group_size_for(8) == 4
    assert PaluConfig(group_size=GROUP_ALL).group_size_for(6) == 6
    auto = PaluConfig()
    assert [auto.group_size_for(h) for h in (1, 2, 3, 6, 8, 32)] == [1, 2, 3, 3, 4, 4]


@pytest.mark.parametrize("ratio,full,multiple,expected", [
    (1.0, 128, 16, 128), (0.5, 128, 16, 64), (0.5, 32, 16, 16), (0.1, 32, 16, 16), (0.7, 64, 16, 48), (0.99, 48, 32, 48),
])
def test_rank_rounding(ratio, full, multiple, expected):
    assert PaluConfig(rank_ratio=ratio, rank_multiple=multiple).rank_for(full) == expected


def test_round_trip_dict():
    cfg = PaluConfig(rank_ratio=0.7, group_size=2)
    assert PaluConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        PaluConfig.from_dict({"rank_ratio": 0.5, "bogus": 1})


@pytest.mark.parametrize("kwargs,field", [
    ({"bits": 8}, "bits"), ({"bits": 1}, "bits"), ({"bits": 4.0}, "bits"), ({"bits": True}, "bits"),
    ({"bits": "4"}, "bits"), ({"hadamard": 1}, "hadamard"), ({"hadamard": None}, "hadamard"),
    ({"bits": 4, "quant_group_size": 0}, "quant_group_size"), ({"bits": 4, "quant_group_size": 16.0}, "quant_group_size"),
    ({"bits": 4, "quant_group_size": True}, "quant_group_size"),
    ({"quant_group_size": 32}, "quant_group_size"),  # a group size without bits quantizes nothing
])
def test_invalid_quantization_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=rf"PaluConfig\.{field}="):
        PaluConfig(**kwargs)


def test_quantization_fields_default_off_and_round_trip():
    cfg = PaluConfig()
    assert cfg.bits is None and cfg.hadamard is False and cfg.quant_group_size is None
    for bits in (2, 3, 4):
        q = PaluConfig(bits=bits, hadamard=True, quant_group_size=32)
        assert PaluConfig.from_dict(q.to_dict()) == q
    assert PaluConfig(hadamard=True).bits is None  # rotation alone is allowed (lossless check)
    # dicts saved before these fields existed still load
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("bits", "hadamard", "quant_group_size")}
    assert PaluConfig.from_dict(old) == cfg
