"""Pure-numpy quantizer and packing: error bounds, ranges, round trips."""

import numpy as np
import pytest

from cet_onnx.quant.packing import pack_bits, unpack_bits
from cet_onnx.quant.quantizer import (WeightFormat, activation_params, container_bits, expand_scale, quantize_activation,
                                quantize_weight, weight_qrange)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("fmt_kind", ["tensor", "channel", "block"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_at_most_half_a_step(bits, fmt_kind, symmetric):
    w = RNG.normal(size=(12, 40, 3, 3)).astype(np.float32)
    fmt = WeightFormat(bits, fmt_kind, 16 if fmt_kind == "block" else None, symmetric=symmetric)
    qw = quantize_weight(w, fmt, channel_axis=0, reduction_axis=1)
    qmin, qmax = weight_qrange(bits, symmetric)
    assert qw.q.min() >= qmin and qw.q.max() <= qmax
    step = expand_scale(qw.scale, w.shape, qw.axis, qw.block_size)
    err = np.abs(qw.dequantize() - w)
    if symmetric:
        assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
        # the largest magnitude of each group is represented exactly (no clipping at ratio 1)
        assert np.isclose(np.abs(qw.dequantize()).max(), np.abs(w).max(), rtol=1e-5)
    else:
        # the rounded zero point shifts the grid by at most half a step
        assert np.all(err <= step * (1 + 1e-5) + 1e-7)
        assert np.all(err[(w > -step * 1.5 * 2 ** (bits - 1) * 0.5) & (w < 0)] <= step[(w > -step * 1.5 * 2 ** (bits - 1) * 0.5) & (w < 0)] / 2 * (1 + 1e-5) + 1e-7)


def test_asymmetric_grid_uses_every_code_and_beats_symmetric_at_two_bits():
    w = RNG.normal(size=(32, 64)).astype(np.float32)
    sym = quantize_weight(w, WeightFormat(2), 0, 1, clip_ratio="mse")
    asym = quantize_weight(w, WeightFormat(2, symmetric=False), 0, 1, clip_ratio="mse")
    assert set(np.unique(asym.q)) == {-2, -1, 0, 1} and set(np.unique(sym.q)) <= {-1, 0, 1}
    assert np.mean((asym.dequantize() - w) ** 2) < np.mean((sym.dequantize() - w) ** 2)


def test_mse_clipping_lowers_error_on_heavy_tails():
    w = RNG.standard_t(3, size=(16, 128)).astype(np.float32)
    fmt = WeightFormat(3, "block", 32)
    plain = quantize_weight(w, fmt, 0, 1)
    clipped = quantize_weight(w, fmt, 0, 1, clip_ratio="mse")
    assert np.mean((clipped.dequantize() - w) ** 2) < 0.9 * np.mean((plain.dequantize() - w) ** 2)
    # per group the search never does worse than no clipping (ratio 1 is on the grid)
    err = lambda q: ((q.dequantize() - w) ** 2).reshape(16, 4, 32).sum(-1)  # noqa: E731
    assert np.all(err(clipped) <= err(plain) + 1e-6)


def test_block_scales_have_blocked_shape_with_short_last_block():
    w = RNG.normal(size=(5, 70)).astype(np.float32)
    qw = quantize_weight(w, WeightFormat(4, "block", 32), channel_axis=0, reduction_axis=1)
    assert qw.scale.shape == (5, 3) and qw.axis == 1 and qw.block_size == 32
    # last block covers 6 columns only: its scale comes from those columns
    assert np.isclose(qw.scale[2, 2], np.abs(w[2, 64:]).max() / 7)


def test_zero_weight_gets_unit_scale_and_zero_codes():
    qw = quantize_weight(np.zeros((3, 4), np.float32), WeightFormat(4), 0, 1)
    assert np.all(qw.scale == 1.0) and np.all(qw.q == 0) and np.all(qw.dequantize() == 0)


def test_nbytes_counts_packed_codes_scales_and_zero_points():
    w = RNG.normal(size=(64, 128)).astype(np.float32)
    qw = quantize_weight(w, WeightFormat(4, "block", 32), 0, 1)
    nscale = 64 * 4
    assert qw.nbytes() == 64 * 128 // 2 + 4 * nscale + nscale // 2
    assert container_bits(3) == 4 and container_bits(2) == 2 and container_bits(6) == 8


def test_invalid_bits_rejected():
    with pytest.raises(ValueError):
        WeightFormat(9)
    with pytest.raises(ValueError):
        WeightFormat(4, "block")


@pytest.mark.parametrize("cbits", [2, 4, 8])
@pytest.mark.parametrize("count", [1, 3, 4, 7, 64, 1001])
def test_pack_unpack_round_trip(cbits, count):
    lo, hi = -(2 ** (cbits - 1)), 2 ** (cbits - 1) - 1
    q = RNG.integers(lo, hi + 1, size=count).astype(np.int8)
    data = pack_bits(q, cbits)
    assert len(data) == -(-count * cbits // 8)
    assert np.array_equal(unpack_bits(data, count, cbits), q)


def test_pack_int4_nibble_order():
    # ONNX: first element in the low nibble
    assert pack_bits(np.array([1, -1], np.int8), 4) == bytes([0xF1])
    assert pack_bits(np.array([1, -2, 0, -1], np.int8), 2) == bytes([0b11001001])


def test_activation_params_asymmetric_and_symmetric():
    p = activation_params(-1.0, 3.0)
    assert p.dtype == np.uint8 and 0 <= p.zero_point <= 255
    x = np.linspace(-1, 3, 1000, dtype=np.float32)
    assert np.abs(quantize_activation(x, p) - x).max() <= p.scale / 2 + 1e-6
    relu = activation_params(0.0, 6.0)
    assert relu.zero_point == 0
    assert quantize_activation(np.array([-5.0], np.float32), relu)[0] == 0.0
    s = activation_params(-2.0, 1.0, symmetric=True)
    assert s.dtype == np.int8 and s.zero_point == 0 and np.isclose(s.scale, 2.0 / 127)
    assert activation_params(0.0, 0.0).scale == 1.0
