"""Property tests (hypothesis) of quantize / dequantize / pack / unpack over shapes, widths and edge values."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cet_onnx.quant.packing import pack_bits, unpack_bits
from cet_onnx.quant.quantizer import WeightFormat, expand_scale, quantize_weight, weight_qrange

EDGE = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-38, 3e38, -3e38, 1.0, -1.0])
FLOATS = st.one_of(EDGE, st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False).map(lambda v: float(np.float32(v))))

shapes = st.tuples(st.integers(1, 6), st.integers(1, 40)).flatmap(
    lambda s: st.one_of(st.just(s), st.tuples(st.just(s[0]), st.just(s[1]), st.integers(1, 3), st.integers(1, 3))))


@st.composite
def weights(draw):
    shape = draw(shapes)
    kind = draw(st.sampled_from(["zeros", "constant", "random", "huge_range"]))
    if kind == "zeros":
        return np.zeros(shape, np.float32) * draw(st.sampled_from([1.0, -1.0]))  # includes negative zero
    if kind == "constant":
        return np.full(shape, draw(FLOATS), np.float32)
    arr = draw(hnp.arrays(np.float32, shape, elements=FLOATS))
    if kind == "huge_range":
        arr.flat[0] = np.float32(3e38)
    return arr


formats = st.builds(lambda b, g, bs, sym: WeightFormat(b, g, bs if g == "block" else None, sym),
                    st.integers(2, 8), st.sampled_from(["tensor", "channel", "block"]), st.integers(2, 16),
                    st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weights(), formats, st.sampled_from([1.0, "mse"]))
def test_quantize_is_finite_in_range_and_bounded(w, fmt, clip):
    with np.errstate(over="ignore", invalid="ignore"):
        qw = quantize_weight(w, fmt, 0, 1, clip_ratio=clip)
    qmin, qmax = weight_qrange(fmt.bits, fmt.symmetric)
    assert qw.q.shape == w.shape and qw.q.dtype == np.int8
    assert qw.q.min() >= qmin and qw.q.max() <= qmax
    assert np.all(np.isfinite(qw.scale)) and np.all(qw.scale > 0)
    deq = qw.dequantize()
    assert np.all(np.isfinite(deq))
    if clip == 1.0 and np.all(np.abs(w) < 1e30):
        # without clipping every weight is within one step of its dequantized value
        step = expand_scale(qw.scale, w.shape, qw.axis, qw.block_size)
        assert np.all(np.abs(deq.astype(np.float64) - w) <= step.astype(np.float64) * 1.0001 + 1e-30)
    # zeros stay exactly zero (zero is always on the grid)
    assert np.all(deq[w == 0] == 0)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.integers(0, 300), st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(cbits, count, seed):
    lo, hi = -(2 ** (cbits - 1)), 2 ** (cbits - 1) - 1
    q = np.random.default_rng(seed).integers(lo, hi + 1, size=count).astype(np.int8)
    data = pack_bits(q, cbits)
    assert len(data) == -(-count * cbits // 8)
    np.testing.assert_array_equal(unpack_bits(data, count, cbits), q)
