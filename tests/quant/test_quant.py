"""Packed 2/3/4-bit per-token quantization: layouts, round trips, error bounds, byte counts."""
import pytest
import torch

from palu_fx.quant import (
    PackedShape,
    bytes_per_token,
    dequantize,
    dequantize_packed,
    pack_codes,
    packed_shape,
    padded_group,
    quantize,
    quantize_packed,
    unpack_codes,
)

BITS = [pytest.param(b, id=f"b{b}") for b in (2, 3, 4)]
# (channels, group_size): odd widths, ragged packing units, several groups, one channel per group
ROWS = [
    pytest.param(7, None, id="C7"),
    pytest.param(33, 11, id="C33-g11"),
    pytest.param(64, None, id="C64"),
    pytest.param(96, 32, id="C96-g32"),
    pytest.param(5, 1, id="C5-g1"),
    pytest.param(1, None, id="C1"),
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def decode_channel(row: list[int], channel: int, bits: int, group_size: int) -> int:
    """The documented byte layout, one channel at a time with plain ints: what a kernel does."""
    n_pad = padded_group(group_size, bits)
    base = (channel // group_size) * (n_pad * bits // 8)
    l = channel % group_size
    if bits == 3:
        lo = (row[base + l // 4] >> 2 * (l % 4)) & 3
        hi = (row[base + n_pad // 4 + l // 8] >> (l % 8)) & 1
        return lo | (hi << 2)
    per = 8 // bits
    return (row[base + l // per] >> bits * (l % per)) & ((1 << bits) - 1)


@pytest.mark.parametrize("channels,group_size", ROWS)
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits, channels, group_size):
    codes = torch.randint(0, 1 << bits, (3, 5, channels), generator=gen(bits * 100 + channels), dtype=torch.uint8)
    packed = pack_codes(codes, bits, group_size)
    n = group_size or channels
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, packed_shape(channels, bits, group_size).code_bytes)
    assert torch.equal(unpack_codes(packed, bits, n, channels), codes)


@pytest.mark.parametrize("channels,group_size", ROWS)
@pytest.mark.parametrize("bits", BITS)
def test_layout_is_the_documented_one(bits, channels, group_size):
    codes = torch.randint(0, 1 << bits, (channels,), generator=gen(bits + channels), dtype=torch.uint8)
    row = pack_codes(codes, bits, group_size).tolist()
    n = group_size or channels
    assert [decode_channel(row, c, bits, n) for c in range(channels)] == codes.tolist()


def test_known_bytes():
    # low bits hold the first channel
    assert pack_codes(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 3 bits: low-2-bit plane (2 bytes for 8 codes), then the high-bit plane (1 byte)
    codes = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.uint8)
    assert pack_codes(codes, 3).tolist() == [0b11100100, 0b11100100, 0b11110000]
    # padding: 5 codes at 3 bits fill one 8-code unit (3 bytes), padded with zero codes
    assert pack_codes(torch.tensor([7, 7, 7, 7, 7], dtype=torch.uint8), 3).tolist() == [0xFF, 0x03, 0x1F]


def test_packed_shape_and_bytes_per_token():
    assert packed_shape(64, 4) == PackedShape(32, 1)
    assert packed_shape(64, 3) == PackedShape(24, 1)
    assert packed_shape(64, 2, 16) == PackedShape(16, 4)
    assert packed_shape(7, 3) == PackedShape(3, 1)  # padded to 8 channels
    # codes + fp16 scale + fp16 zero per group
    assert [bytes_per_token(64, b) for b in (4, 3, 2)] == [36, 28, 20]
    assert bytes_per_token(3 * 64, 4, 64) == 3 * 36
    assert bytes_per_token(64, 4, 16) == 32 + 4 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("channels,group_size", ROWS)
@pytest.mark.parametrize("bits", BITS)
def test_error_is_at_most_half_a_step(bits, channels, group_size, dtype):
    x = (torch.randn(4, 9, channels, generator=gen(7)) * 3 + 0.5).to(dtype)
    q = quantize(x, bits, group_size)
    n = q.group_size
    assert q.scale.dtype == q.zero.dtype == torch.float16 and q.codes.dtype == torch.uint8
    assert q.scale.shape == q.zero.shape == (4, 9, channels // n)
    assert q.nbytes == 4 * 9 * bytes_per_token(channels, bits, group_size)
    xhat = dequantize(q, torch.float32)
    assert dequantize(q).dtype == dtype and dequantize(q).shape == x.shape
    step = q.scale.float().repeat_interleave(n, dim=-1)
    err = (x.float() - xhat).abs()
    # the bound holds with the *stored* fp16 scale; slack for float32 arithmetic only
    assert (err <= step / 2 + 1e-6 * x.float().abs().amax()).all()
    # and the range is not wasted: zero is the group minimum rounded down to fp16, and the
    # step is the remaining range over the codes, rounded up to fp16
    xf = x.float().unflatten(-1, (channels // n, n))
    lo, z = xf.amin(-1), q.zero.float()
    assert (z <= lo).all() and (lo - z <= lo.abs() * 2**-10 + 2**-24).all()
    ideal = (xf.amax(-1) - z) / ((1 << bits) - 1)
    assert (q.scale.float() >= ideal).all()
    assert torch.allclose(q.scale.float(), ideal, rtol=2**-10, atol=2**-24)


@pytest.mark.parametrize("bits", BITS)
def test_group_extremes_use_both_end_codes(bits):
    x = torch.randn(16, 64, generator=gen(3))
    q = quantize(x, bits)
    codes = unpack_codes(q.codes, bits, 64, 64)
    assert (codes.amin(-1) == 0).all() and (codes.amax(-1) == (1 << bits) - 1).all()


@pytest.mark.parametrize("bits", BITS)
def test_constant_rows_have_zero_scale_and_decode_exactly(bits):
    x = torch.randn(6, 32, generator=gen(4))
    x[0] = 1.5
    x[1] = 0.0
    x[2, :16] = -3.25  # a constant group in a non-constant row
    q = quantize(x, bits, group_size=16)
    assert q.scale[0].eq(0).all() and q.scale[1].eq(0).all() and q.scale[2, 0] == 0 and q.scale[2, 1] > 0
    xhat = dequantize(q)
    assert torch.equal(xhat[:2], x[:2]) and torch.equal(xhat[2, :16], x[2, :16])
    assert torch.isfinite(xhat).all()


def test_range_far_from_zero_keeps_the_bound():
    # An integer zero point would be ~ -1e6 here (not an fp16 integer); the float offset is fine.
    x = 1000.0 + 0.01 * torch.randn(8, 64, generator=gen(5))
    q = quantize(x, 4)
    err = (dequantize(q) - x).abs()
    assert (err <= q.scale.float() / 2 + 1e-4).all()
    assert err.max() < 0.1  # fp16's spacing at 1000 is 0.5: the range adapts around the offset


def test_more_bits_less_error():
    x = torch.randn(256, 64, generator=gen(6))
    errs = [float((dequantize(quantize(x, b)) - x).norm() / x.norm()) for b in (2, 3, 4)]
    assert errs[0] > 1.8 * errs[1] > 3.2 * errs[2]
    assert errs[2] < 0.1


def test_plain_tensor_forms_match_the_dataclass():
    x = torch.randn(2, 3, 48, generator=gen(8))
    codes, scale, zero = quantize_packed(x, 3, 16)
    q = quantize(x, 3, 16)
    assert torch.equal(codes, q.codes) and torch.equal(scale, q.scale) and torch.equal(zero, q.zero)
    assert torch.equal(dequantize_packed(codes, scale, zero, 3, 16), dequantize(q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_packed_leaves_its_input_alone(dtype):
    # the codes are computed in place on a float32 copy: never on the caller's tensor
    x = torch.randn(4, 64, generator=gen(10)).to(dtype)
    before = x.clone()
    codes, scale, zero = quantize_packed(x, 4, 32)
    assert torch.equal(x, before)
    assert (dequantize_packed(codes, scale, zero, 4, 32) - x.float()).abs().max() <= scale.float().max() / 2 + 1e-3


def test_quantize_traces_without_data_dependent_branches():
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(2, 4, 64, generator=gen(9))
    gm = make_fx(lambda t: quantize_packed(t, 4, 32))(x)
    for a, b in zip(gm(x), quantize_packed(x, 4, 32)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 8}, "bits=8"), ({"bits": 1}, "bits=1"), ({"bits": True}, "bits=True"),
    ({"bits": 4, "group_size": 5}, "does not divide"), ({"bits": 4, "group_size": 0}, "positive"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(2, 64), **kwargs)


def test_bad_storage():
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.ones(2, 8, dtype=torch.int32), 4)
    q = quantize(torch.randn(2, 64), 4)
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(q.codes[:, :-1], 4, 64, 64)
