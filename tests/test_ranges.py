"""Tests of cet_onnx.calibration.ranges: activation-range observers."""

from __future__ import annotations

import numpy as np
import pytest

from cet_onnx.calibration.ranges import METHODS, Observer, _MagnitudeHistogram, make_observer

HIST_METHODS = ("percentile", "entropy", "mse")


def _feed(obs: Observer, *batches: np.ndarray) -> tuple[float, float]:
    for b in batches:
        obs.update(b)
    return obs.range()


@pytest.fixture(scope="module")
def gauss() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(1_000_000)


@pytest.fixture(scope="module")
def outlier_data() -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian bulk of 1M values plus two huge outliers (+1000, -1000)."""
    bulk = np.random.default_rng(1).standard_normal(1_000_000)
    data = np.concatenate([bulk[:400_000], [1000.0], bulk[400_000:], [-1000.0]])
    return bulk, data


def test_methods_tuple() -> None:
    assert METHODS == ("minmax", "percentile", "entropy", "mse")


@pytest.mark.parametrize("method", METHODS)
def test_observers_satisfy_protocol(method: str) -> None:
    assert isinstance(make_observer(method), Observer)


def test_minmax_exact_across_batches() -> None:
    batches = [
        np.array([[0.5, -1.25], [3.0, 2.0]], dtype=np.float32),
        np.array([-7.5, 0.0, 1.0]),
        np.array([[[4.0]], [[-2.0]]], dtype=np.float16),
    ]
    assert _feed(make_observer("minmax"), *batches) == (-7.5, 4.0)
    assert _feed(make_observer("minmax", symmetric=True), *batches) == (-7.5, 7.5)
    # symmetric on non-negative data: unsigned range
    assert _feed(make_observer("minmax", symmetric=True), np.array([0.0, 2.0]), np.array([3.5])) == (0.0, 3.5)
    # positive-only data still gives lo == 0 (zero representable)
    assert _feed(make_observer("minmax"), np.array([2.0, 5.0]), np.array([3.0])) == (0.0, 5.0)
    # negative-only data gives hi == 0
    assert _feed(make_observer("minmax"), np.array([-2.0, -5.0])) == (-5.0, 0.0)


@pytest.mark.parametrize("p", [99.0, 99.9, 99.999])
def test_percentile_symmetric_matches_numpy(gauss: np.ndarray, p: float) -> None:
    lo, hi = _feed(make_observer("percentile", symmetric=True, percentile=p), *np.array_split(gauss, 5))
    expected = np.percentile(np.abs(gauss), p)
    assert lo == -hi
    assert hi == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("p", [99.0, 99.99])
def test_percentile_asymmetric_matches_numpy(p: float) -> None:
    # skewed data: both tails must be estimated separately
    rng = np.random.default_rng(2)
    x = rng.exponential(2.0, 500_000) - 1.5
    lo, hi = _feed(make_observer("percentile", percentile=p), *np.array_split(x, 3))
    assert lo == pytest.approx(np.percentile(x, 100 - p), abs=0.01)
    assert hi == pytest.approx(np.percentile(x, p), abs=0.02)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_outliers_are_clipped_but_bulk_kept(outlier_data, method: str, symmetric: bool) -> None:
    bulk, data = outlier_data
    lo, hi = _feed(make_observer(method, symmetric=symmetric), *np.array_split(data, 4))
    assert hi < 0.5 * data.max()
    assert -lo < 0.5 * -data.min()
    assert hi > np.percentile(bulk, 99)
    assert -lo > -np.percentile(bulk, 1)
    if symmetric:
        assert lo == -hi


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_nonnegative_data_gives_lo_zero(gauss: np.ndarray, method: str, symmetric: bool) -> None:
    relu = np.maximum(gauss[:300_000], 0.0)
    lo, hi = _feed(make_observer(method, symmetric=symmetric), *np.array_split(relu, 3))
    assert lo == 0.0
    assert 1.0 < hi <= relu.max()


@pytest.mark.parametrize("method", METHODS)
def test_nonpositive_data_gives_hi_zero(gauss: np.ndarray, method: str) -> None:
    x = -np.abs(gauss[:200_000])
    lo, hi = _feed(make_observer(method), x)
    assert hi == 0.0
    assert x.min() <= lo < -1.0


@pytest.mark.parametrize("method", METHODS)
def test_symmetric_mode_is_symmetric(method: str) -> None:
    x = np.random.default_rng(3).standard_normal(100_000) * 0.5 + 1.0  # mostly positive, some negative
    lo, hi = _feed(make_observer(method, symmetric=True), x)
    assert lo == -hi
    assert hi > 1.5


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_rebinning_is_order_independent(method: str, symmetric: bool) -> None:
    rng = np.random.default_rng(4)
    small = rng.standard_normal(50_000) * 0.01
    large = np.concatenate([rng.standard_normal(50_000) * 3.0 + 0.5, [40.0, -25.0]])
    a = _feed(make_observer(method, symmetric=symmetric), small, large)
    b = _feed(make_observer(method, symmetric=symmetric), large, small)
    c = _feed(make_observer(method, symmetric=symmetric), np.concatenate([small, large]))
    # growing ranges in many steps (several re-binnings)
    steps = [small, small * 10, small * 100, large]
    d = _feed(make_observer(method, symmetric=symmetric), *steps)
    e = _feed(make_observer(method, symmetric=symmetric), np.concatenate(steps))
    np.testing.assert_allclose(a, c, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b, c, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d, e, rtol=1e-9, atol=1e-12)
    # the range must reflect the large batch, not the first small one
    assert c[1] > 1.0 and c[0] < -1.0


def test_histogram_rebinning_merges_exactly() -> None:
    rng = np.random.default_rng(5)
    parts = [np.abs(rng.standard_normal(10_000)) * s for s in (0.001, 1.0, 0.1, 1000.0, 3.0)]
    parts.insert(0, np.zeros(7))  # all-zero first batch: width still undecided
    grown = _MagnitudeHistogram(256)
    for p in parts:
        grown.add(p)
    direct = _MagnitudeHistogram(256)
    direct.add(np.concatenate(parts))
    assert grown.exp == direct.exp
    np.testing.assert_array_equal(grown.counts, direct.counts)
    assert grown.counts.sum() == sum(p.size for p in parts)
    assert grown.zeros == 7
    # bin width is the smallest power of two that fits the maximum into 256 bins
    w = 2.0 ** grown.exp
    assert grown.vmax < 256 * w and grown.vmax >= 128 * w


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(method: str, bad: float) -> None:
    obs = make_observer(method)
    obs.update(np.array([1.0, -2.0]))
    with pytest.raises(ValueError, match="non-finite values"):
        obs.update(np.array([[0.5, bad], [1.0, 2.0]], dtype=np.float32))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_all_zero_input_gives_valid_range(method: str, symmetric: bool) -> None:
    lo, hi = _feed(make_observer(method, symmetric=symmetric), np.zeros((4, 8)), np.zeros(3, dtype=np.float32))
    assert lo <= 0.0 <= hi
    assert lo < hi
    assert hi - lo < 1e-3
    assert np.isfinite(lo) and np.isfinite(hi)


@pytest.mark.parametrize("method", METHODS)
def test_zeros_then_data(method: str) -> None:
    x = np.random.default_rng(6).standard_normal(20_000)
    lo, hi = _feed(make_observer(method), np.zeros(1000), x)
    assert lo < -1.0 and hi > 1.0


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        make_observer("kl-divergence")
    msg = str(info.value)
    assert "kl-divergence" in msg
    for name in METHODS:
        assert name in msg


@pytest.mark.parametrize(
    "kwargs",
    [{"num_bits": 1}, {"num_bits": 17}, {"num_bins": 4}, {"percentile": 40.0}, {"percentile": 100.5}],
)
def test_invalid_options_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_observer("percentile", **kwargs)


def test_percentile_bounds_inclusive() -> None:
    x = np.linspace(-1.0, 3.0, 4001)
    lo, hi = _feed(make_observer("percentile", percentile=100.0), x)
    assert lo == -1.0 and hi == 3.0
    lo, hi = _feed(make_observer("percentile", percentile=50.0), x)  # median: 1.0 -> range (0, ~1)
    assert lo == 0.0 and hi == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("method", METHODS)
def test_range_before_update_raises(method: str) -> None:
    obs = make_observer(method)
    obs.update(np.zeros(0))  # empty batches are ignored
    with pytest.raises(RuntimeError):
        obs.range()


def test_mse_range_grows_with_bits(gauss: np.ndarray) -> None:
    # fewer levels -> rounding error dominates sooner -> tighter optimal clip
    t4 = _feed(make_observer("mse", symmetric=True, num_bits=4), gauss)[1]
    t8 = _feed(make_observer("mse", symmetric=True, num_bits=8), gauss)[1]
    assert 2.0 < t4 < 3.2
    assert 3.3 < t8 < 4.8
    assert t4 < t8


def test_entropy_ignores_spike_at_zero(gauss: np.ndarray) -> None:
    # A Relu's mass of exact zeros must not drag the KL threshold down.
    relu = np.maximum(gauss[:300_000], 0.0)
    with_zeros = _feed(make_observer("entropy"), relu)
    without = _feed(make_observer("entropy"), relu[relu > 0])
    assert with_zeros == pytest.approx(without)
    assert with_zeros[1] > np.percentile(relu[relu > 0], 99)


@pytest.mark.parametrize("seed", range(6))
def test_asymmetric_mse_search_finds_the_exhaustive_grid_minimum(seed: int) -> None:
    from cet_onnx.calibration import ranges

    rng = np.random.default_rng(seed)
    x = [rng.normal(size=50_000) * 3 + 1, rng.standard_t(2.0, size=80_000), rng.exponential(size=60_000) - 0.7,
         np.concatenate([rng.normal(size=40_000) - 3, rng.normal(size=40_000) * 0.1 + 5, [-40.0, 60.0]]),
         rng.laplace(size=70_000) * np.where(rng.random(70_000) < 0.5, 1, 5),
         np.concatenate([rng.normal(size=50_000), rng.normal(size=500) * 50])][seed]
    obs = make_observer("mse", num_bits=8)
    obs.update(x.astype(np.float32))
    ta, na, ca = ranges._clip_tables(obs.neg, include_zero=True)
    tb, nb, cb = ranges._clip_tables(obs.pos, include_zero=True)
    total = obs.neg.total + obs.pos.total - obs.neg.zeros - obs.pos.zeros
    span = ta[:, None] + tb[None, :]
    err = (total - na[:, None] - nb[None, :]) * (span / 255) ** 2 / 12 + ca[:, None] + cb[None, :]
    err = np.where(span > 0, err, np.inf)
    a, b = ranges._mse_asymmetric(obs.neg, obs.pos, 255)
    assert err[np.searchsorted(ta, a), np.searchsorted(tb, b)] == pytest.approx(err.min(), rel=1e-12)


def test_mse_at_16_bits_clips_nothing(gauss: np.ndarray) -> None:
    # 65535 steps over 2048 bins: clipping cannot be judged finer than the grid, so the range is the data's
    for symmetric in (True, False):
        lo, hi = _feed(make_observer("mse", symmetric=symmetric, num_bits=16), gauss)
        assert hi == pytest.approx(np.abs(gauss).max() if symmetric else gauss.max())
        assert lo == pytest.approx(-np.abs(gauss).max() if symmetric else gauss.min())


def test_calibration_runs_large_batches_in_pieces_with_the_same_ranges(monkeypatch):
    import onnx_ir as ir

    from cet_onnx import exposed
    from cet_onnx.calibration.observe import collect_ranges
    from cet_onnx.graph.rewriter import activation_tensors
    from models import small_cnn

    model = ir.from_proto(small_cnn())
    tensors = activation_tensors(model, remove_relus=True)
    batches = [{"x": np.random.default_rng(i).normal(size=(8, 3, 8, 8)).astype(np.float32)} for i in range(2)]
    sizes: list[int] = []
    run = exposed.ExposedSession.run

    def counted(self, feed):
        sizes.append(feed["x"].shape[0])
        return run(self, feed)

    monkeypatch.setattr(exposed.ExposedSession, "run", counted)
    whole = collect_ranges(model, tensors, batches, ["CPUExecutionProvider"], "mse")
    assert sizes == [1, 8, 8]                       # one sample sizes the runs; whole batches fit
    sizes.clear()
    monkeypatch.setattr(exposed, "RUN_MAX_BYTES", 1)
    split = collect_ranges(model, tensors, batches, ["CPUExecutionProvider"], "mse")
    assert sizes == [1] * 17 and split == whole     # histograms merge exactly: the same ranges
