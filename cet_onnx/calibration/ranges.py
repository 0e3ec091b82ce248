"""Activation-range observers for calibration (pure numpy).

The calibration runner feeds every intermediate tensor to an observer, one
batch at a time, and finally asks it for a clipping range ``(lo, hi)``.  The
range becomes the scale / zero-point of the tensor's quantizer, so it decides
the trade-off between rounding error (wide range, coarse steps) and clipping
error (narrow range, outliers saturate).  Four methods are offered:

``minmax``
    Running minimum / maximum.  Never clips; sensitive to outliers.
``percentile``
    The ``p``-th percentile of ``|x|`` (symmetric) or the ``100-p`` / ``p``
    percentiles of ``x`` (asymmetric), read off a histogram.
``entropy``
    TensorRT-style KL calibration: choose the threshold that minimises
    ``KL(P || Q)`` between the clipped reference histogram ``P`` and its
    quantized version ``Q``.
``mse``
    Choose the range that minimises the expected squared quantization error
    (rounding error inside the range plus clipping error outside it),
    estimated from the histogram.

Memory is bounded: an observer keeps only running min/max and one (symmetric)
or two (asymmetric) fixed-size histograms; raw activations are never stored.

Histograms and adaptive re-binning
----------------------------------
Each histogram is one-sided: it counts magnitudes ``m >= 0`` in ``num_bins``
bins ``[k*w, (k+1)*w)`` anchored at zero, and the bin width ``w`` is always a
power of two, ``w = 2**e``, the smallest one such that the largest magnitude
seen so far falls into the last bin or earlier.  When a later batch holds a
larger magnitude, ``e`` grows by ``d`` and old bin ``k`` merges into new bin
``k >> d``.  Because the widths are powers of two the new bin edges are a
subset of the old ones, so this merge is *exact*: the result is bit-for-bit the
histogram that would have been built had the final width been used from the
start.  Consequences:

* the histogram does not depend on the order (or batching) of the data;
* the only approximation is the bin width itself: data are known to within
  ``w``, and since ``w`` is rounded up to a power of two, between
  ``num_bins/2`` and ``num_bins`` bins are actually in use.  Within a bin the
  density is taken to be uniform.

Symmetric observers histogram ``|x|``.  Asymmetric observers keep two
histograms, one of ``x`` for ``x >= 0`` and one of ``-x`` for ``x < 0``, so each
side gets its own resolution (a tensor in ``[-0.1, 100]`` keeps a fine
negative side).

Range conventions
-----------------
* Always ``lo <= 0 <= hi`` (zero must be exactly representable) and
  ``lo < hi``; if every value seen is zero the range is ``(0.0, 1e-8)``.
* Symmetric mode assumes signed codes with zero point 0 (``t / (2**(num_bits-1)-1)``
  per step, ``2**(num_bits-1)`` levels for ``entropy``).  The range is ``(-t, t)``,
  except when every value seen is ``>= 0`` (e.g. after ``Relu``): then it is
  ``(0, t)``; the search still assumes signed codes, since that is what a
  symmetric quantizer (scale ``max(|lo|, hi) / (2**(num_bits-1)-1)``) uses.
* Asymmetric mode assumes unsigned codes over ``[lo, hi]`` (``2**num_bits - 1``
  steps); non-negative data give ``lo == 0`` exactly and ``entropy`` then uses
  ``2**num_bits`` levels.
* ``entropy``, asymmetric, with data of both signs: each tail is calibrated on
  its own one-sided histogram with ``2**(num_bits-1)`` levels (each side gets
  about half of the integer grid); a side with no data gives 0.  A full 2-D KL
  search over ``(lo, hi)`` would be much more expensive for little gain.
* ``entropy`` needs more histogram bins than levels: when the data occupy
  ``<= 2**(num_bits-1)`` bins (e.g. 16-bit with the default 2048 bins) there is
  nothing to clip at histogram resolution and the exact max is returned.
* ``mse`` likewise returns the exact min / max when the grid has ``>= num_bins``
  steps: a step finer than a bin cannot be traded against clipping judged per bin.
* Exact zeros are counted (``percentile`` uses them) but left out of the
  ``entropy`` and ``mse`` searches: they are quantized exactly whatever the
  range, and a Relu's spike at 0 would otherwise drag the KL threshold down.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "METHODS",
    "Observer",
    "MinMaxObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MSEObserver",
    "make_observer",
]

METHODS = ("minmax", "percentile", "entropy", "mse")

#: Upper bound of the range returned when every observed value is zero.
_TINY = 1e-8

#: Rough number of float64 elements per temporary matrix in vectorised searches.
_CHUNK_ELEMS = 1 << 18
#: candidate edges per side in the coarse grid of the asymmetric ``mse`` search
_COARSE = 128

#: Floor of the normalised quantized distribution Q in the KL divergence, so
#: that a bin where P > 0 but Q == 0 costs a large but finite amount.
_KL_EPS = 1e-10


@runtime_checkable
class Observer(Protocol):
    """What the calibration runner needs from a range observer."""

    def update(self, x: np.ndarray) -> None:
        """Account for one batch of a tensor (any shape).

        Raises ``ValueError`` if ``x`` holds NaN or infinite values.
        """
        ...

    def range(self) -> tuple[float, float]:
        """The clipping range ``(lo, hi)``; ``lo <= 0 <= hi`` and ``lo < hi``."""
        ...


# --------------------------------------------------------------------------
# helpers


def _as_float_array(x: np.ndarray) -> np.ndarray:
    """Flatten ``x`` (float32 / float64 as they are, anything else to float64) and reject non-finite values.

    float32 stays float32: min / max, magnitudes and the power-of-two bin scaling are exact in it,
    so the histograms are the same as in float64, at half the memory traffic.
    """
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise ValueError(f"observer expects a numeric array, got dtype {a.dtype}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    a = a.reshape(-1)
    if a.size and not np.isfinite(a).all():
        n_bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise ValueError(f"tensor batch contains non-finite values ({n_bad} NaN/Inf)")
    return a


def _finalize(lo: float, hi: float) -> tuple[float, float]:
    """Enforce ``lo <= 0 <= hi`` and ``lo < hi``; return plain floats."""
    lo = min(float(lo), 0.0) + 0.0  # "+ 0.0" turns -0.0 into 0.0
    hi = max(float(hi), 0.0) + 0.0
    if not hi > lo:  # only possible when both are zero
        hi = _TINY
    return lo, hi


def _required_exp(vmax: float, num_bins: int) -> int:
    """Smallest ``e`` with ``floor(vmax / 2**e) <= num_bins - 1`` (``vmax > 0``)."""
    e = math.floor(math.log2(vmax / num_bins)) + 1
    # log2 is inexact near powers of two: fix up with exact ldexp comparisons.
    while math.ldexp(vmax, -e) >= num_bins:
        e += 1
    while math.ldexp(vmax, -(e - 1)) < num_bins:
        e -= 1
    return e


class _MagnitudeHistogram:
    """Fixed-size histogram of magnitudes ``m >= 0`` with power-of-two bin width.

    Bin ``k`` covers ``[k*w, (k+1)*w)`` with ``w = 2**exp``.  ``exp`` is None
    while only zeros have been seen (they all sit in bin 0 whatever ``w``).
    Growing the width merges bins exactly (see the module docstring).
    """

    def __init__(self, num_bins: int) -> None:
        self.num_bins = num_bins
        self.counts = np.zeros(num_bins, dtype=np.float64)
        self.exp: int | None = None
        self.vmax = 0.0  # exact largest magnitude seen
        self.total = 0.0
        self.zeros = 0.0  # how many of the counted magnitudes are exactly 0 (all in bin 0)

    @property
    def width(self) -> float:
        return 1.0 if self.exp is None else math.ldexp(1.0, self.exp)

    def add(self, mags: np.ndarray) -> None:
        if mags.size == 0:
            return
        m = float(mags.max())
        if m > self.vmax:
            self._grow(m)
        self.total += mags.size
        self.zeros += mags.size - np.count_nonzero(mags)
        if self.exp is None:  # every magnitude so far is zero
            self.counts[0] += mags.size
            return
        idx = np.floor(mags * math.ldexp(1.0, -self.exp)).astype(np.int64)
        np.minimum(idx, self.num_bins - 1, out=idx)  # guard; cannot trigger
        self.counts += np.bincount(idx, minlength=self.num_bins)

    def _grow(self, vmax: float) -> None:
        e = _required_exp(vmax, self.num_bins)
        if self.exp is not None and e > self.exp:
            d = min(e - self.exp, 63)
            new_idx = np.arange(self.num_bins, dtype=np.int64) >> d
            self.counts = np.bincount(new_idx, weights=self.counts, minlength=self.num_bins)
        if self.exp is None or e > self.exp:
            self.exp = e
        self.vmax = vmax

    def trimmed(self, skip_zeros: bool = False) -> np.ndarray:
        """Counts up to and including the last non-empty bin.

        With ``skip_zeros`` the exact zeros are left out of bin 0: they are
        quantized exactly whatever the range, so they must not weigh on the
        entropy / MSE searches (a Relu's spike at 0 would otherwise drag the
        KL threshold down).
        """
        counts = self.counts
        if skip_zeros and self.zeros:
            counts = counts.copy()
            counts[0] -= self.zeros
        nz = np.flatnonzero(counts)
        return counts[: nz[-1] + 1] if nz.size else counts[:0]

    def quantile_at_rank(self, r: float) -> float:
        """Magnitude below which ``r`` of the counted values lie (uniform within bins)."""
        c = self.trimmed()
        if c.size == 0 or self.vmax == 0.0:
            return 0.0
        cdf = np.cumsum(c)
        j = int(min(np.searchsorted(cdf, r, side="left"), c.size - 1))
        prev = float(cdf[j - 1]) if j > 0 else 0.0
        frac = (r - prev) / c[j] if c[j] > 0 else 0.0
        frac = min(max(frac, 0.0), 1.0)
        return min((j + frac) * self.width, self.vmax)


def _xlogx(x: np.ndarray) -> np.ndarray:
    """``x * log(x)`` with ``0 log 0 = 0``."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def _kl_threshold(hist: _MagnitudeHistogram, levels: int, max_candidates: int) -> float:
    """TensorRT entropy calibration on a one-sided histogram.

    For each candidate threshold bin ``i`` (``levels <= i <= m``): ``P`` is the
    histogram clipped to ``i`` bins with everything above folded into bin
    ``i-1``; ``Q`` merges the first ``i`` bins (without the outliers) into
    ``levels`` groups of ``i // levels`` bins (the last group takes the rest)
    and spreads each group's count evenly over the bins where ``P`` is
    non-zero.  The threshold with the smallest ``KL(P||Q)`` wins; where
    ``P > 0`` but ``Q == 0`` the normalised ``Q`` is floored at ``_KL_EPS``.

    Since ``Q`` is constant over the non-zero bins of a group,
    ``sum P log Q`` only needs each group's ``P`` mass, and ``sum P log P``
    comes from a cumulative sum of ``c log c``; so the work is
    ``candidates x levels``, not ``candidates x bins``.  At most
    ``max_candidates`` thresholds (evenly spaced, always including ``m``).
    """
    c = hist.trimmed(skip_zeros=True)
    m = c.size
    if hist.vmax == 0.0 or m <= levels:
        return hist.vmax
    cands = np.arange(levels, m + 1, dtype=np.int64)
    if cands.size > max_candidates:
        cands = np.unique(np.round(np.linspace(levels, m, max_candidates)).astype(np.int64))
    csum = np.concatenate(([0.0], np.cumsum(c)))
    nzsum = np.concatenate(([0], np.cumsum(c > 0)))
    clogc = np.concatenate(([0.0], np.cumsum(_xlogx(c))))
    total = csum[-1]
    g = np.arange(levels, dtype=np.int64)[None, :]
    last = g == levels - 1
    rows = max(1, _CHUNK_ELEMS // levels)
    kl_all = np.empty(cands.size)
    for start in range(0, cands.size, rows):
        i = cands[start : start + rows][:, None]  # (k, 1) threshold in bins
        tail = total - csum[i]  # counts at or above bin i
        p_last = c[i - 1] + tail  # P of bin i-1
        # sum P log P (unnormalised, then normalised by total)
        plogp = (clogc[i - 1] + _xlogx(p_last)) / total - math.log(total)
        nm = i // levels
        g_start = g * nm
        g_stop = np.where(last, i, (g + 1) * nm)
        q_mass = csum[g_stop] - csum[g_start]  # Q's group masses (no outliers)
        p_mass = q_mass + np.where(last, tail, 0.0)
        last_fix = ((c[i - 1] == 0) & (tail > 0)).astype(np.int64)  # outliers made bin i-1 non-zero
        n_nz = nzsum[g_stop] - nzsum[g_start] + np.where(last, last_fix, 0)
        q_tot = csum[i]  # sum of Q over all bins (k, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q_bin = np.maximum(q_mass / (np.maximum(n_nz, 1) * np.where(q_tot > 0, q_tot, 1.0)), _KL_EPS)
            plogq = np.where(p_mass > 0, p_mass * np.log(q_bin), 0.0).sum(axis=1, keepdims=True) / total
        kl = (plogp - plogq)[:, 0]
        kl[q_tot[:, 0] <= 0] = np.inf
        kl_all[start : start + rows] = kl
    if not np.isfinite(kl_all).any():
        return hist.vmax
    best = int(cands[int(np.argmin(kl_all))])
    return min(best * hist.width, hist.vmax)


def _clip_tables(hist: _MagnitudeHistogram, include_zero: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate thresholds of one side and, for each, the count and squared error clipped.

    Candidates are the bin edges ``K*w`` inside the data (``K >= 1``, or ``>= 0``
    with ``include_zero``) plus the exact maximum ``vmax`` (no clipping).  A
    value ``x >= t`` clipped to ``t`` costs ``(x - t)**2``; with a uniform
    density in a bin of centre ``x_k`` that is ``(x_k - t)**2 + w**2/12``.
    """
    c = hist.trimmed(skip_zeros=True)
    if hist.vmax == 0.0 or c.size == 0:
        return np.zeros(1), np.zeros(1), np.zeros(1)
    m = c.size
    w = hist.width
    k0 = 0 if include_zero else 1
    centers = np.arange(m) + 0.5  # in units of w
    # suffix sums S[K] = sum_{k >= K}
    s0 = np.cumsum(c[::-1])[::-1]
    s1 = np.cumsum((c * centers)[::-1])[::-1]
    s2 = np.cumsum((c * centers * centers)[::-1])[::-1]
    kk = np.arange(k0, m)
    n_out = s0[kk]
    err = s2[kk] - 2.0 * kk * s1[kk] + kk.astype(np.float64) ** 2 * s0[kk]
    err = (np.maximum(err, 0.0) + n_out / 12.0) * (w * w)
    thr = kk * w
    keep = thr < hist.vmax
    thr = np.append(thr[keep], hist.vmax)
    n_out = np.append(n_out[keep], 0.0)
    err = np.append(err[keep], 0.0)
    return thr, n_out, err


def _mse_symmetric(hist: _MagnitudeHistogram, steps: int) -> float:
    """Threshold ``t`` minimising rounding + clipping error for ``steps`` steps over ``[0, t]``."""
    thr, n_out, clip = _clip_tables(hist, include_zero=False)
    if hist.vmax == 0.0:
        return 0.0
    step = thr / steps
    err = (hist.total - hist.zeros - n_out) * step * step / 12.0 + clip
    return float(thr[int(np.argmin(err))])


def _mse_asymmetric(neg: _MagnitudeHistogram, pos: _MagnitudeHistogram, steps: int) -> tuple[float, float]:
    """``(a, b)`` minimising the error of the range ``[-a, b]`` with ``steps`` steps.

    Coarse to fine over the candidate edges of both sides: a full 2-D grid over every
    ``stride``-th edge (at most ``_COARSE`` per side), then the full-resolution grid in the
    window of ``±2·stride`` edges around its best pair, then coordinate descent on all edges.
    The error is a smooth function of the edges (sums of histogram tails), so this lands on
    the exhaustive grid's minimum (tested), at a few milliseconds instead of ~70 ms a tensor.
    """
    ta, na, ca = _clip_tables(neg, include_zero=True)
    tb, nb, cb = _clip_tables(pos, include_zero=True)
    total = neg.total + pos.total - neg.zeros - pos.zeros  # exact zeros cost nothing

    def cost(ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
        a = ta[ia][:, None]
        b = tb[ib][None, :]
        span = a + b
        n_in = total - na[ia][:, None] - nb[ib][None, :]
        e = n_in * (span / steps) ** 2 / 12.0 + ca[ia][:, None] + cb[ib][None, :]
        return np.where(span > 0, e, np.inf)

    def best(ia: np.ndarray, ib: np.ndarray) -> tuple[int, int]:
        r, col = divmod(int(np.argmin(cost(ia, ib))), ib.size)
        return int(ia[r]), int(ib[col])

    stride = max(1, -(-max(ta.size, tb.size) // _COARSE))
    ia, ib = best(np.arange(0, ta.size, stride), np.arange(0, tb.size, stride))
    if stride > 1:
        ia, ib = best(np.arange(max(ia - 2 * stride, 0), min(ia + 2 * stride + 1, ta.size)),
                      np.arange(max(ib - 2 * stride, 0), min(ib + 2 * stride + 1, tb.size)))
        all_a, all_b = np.arange(ta.size), np.arange(tb.size)
        for _ in range(3):
            ib = int(np.argmin(cost(np.array([ia]), all_b)[0]))
            ia = int(np.argmin(cost(all_a, np.array([ib]))[:, 0]))
    return float(ta[ia]), float(tb[ib])


# --------------------------------------------------------------------------
# observers



def _fold_extremes(observer, a: np.ndarray) -> tuple[float, float]:
    """Fold the batch's min / max into ``observer.min`` / ``.max``; returns the batch's."""
    lo, hi = float(a.min()), float(a.max())
    observer.min = lo if observer.min is None else min(observer.min, lo)
    observer.max = hi if observer.max is None else max(observer.max, hi)
    return lo, hi


class MinMaxObserver:
    """Running min / max of every value seen.

    Symmetric mode returns ``(-m, m)`` with ``m = max|x|``, or ``(0, max)`` if
    no negative value was seen.
    """

    def __init__(self, *, symmetric: bool = False) -> None:
        self.symmetric = symmetric
        self.min: float | None = None
        self.max: float | None = None

    def update(self, x: np.ndarray) -> None:
        a = _as_float_array(x)
        if a.size == 0:
            return
        lo, hi = _fold_extremes(self, a)

    def range(self) -> tuple[float, float]:
        if self.min is None or self.max is None:
            raise RuntimeError("range() called before any data was observed")
        if self.symmetric:
            t = max(abs(self.min), abs(self.max))
            return _finalize(0.0 if self.min >= 0 else -t, t)
        return _finalize(self.min, self.max)


class _HistogramObserver:
    """Shared state of the histogram-based observers.

    Symmetric: one histogram of ``|x|``.  Asymmetric: one of ``x`` for
    ``x >= 0`` (``pos``) and one of ``-x`` for ``x < 0`` (``neg``).  Running
    min / max are kept exactly alongside.
    """

    def __init__(self, *, symmetric: bool, num_bits: int, num_bins: int) -> None:
        self.symmetric = symmetric
        self.num_bits = num_bits
        self.num_bins = num_bins
        self.min: float | None = None
        self.max: float | None = None
        if symmetric:
            self.abs = _MagnitudeHistogram(num_bins)
        else:
            self.pos = _MagnitudeHistogram(num_bins)
            self.neg = _MagnitudeHistogram(num_bins)

    def update(self, x: np.ndarray) -> None:
        a = _as_float_array(x)
        if a.size == 0:
            return
        lo, hi = _fold_extremes(self, a)
        if self.symmetric:
            self.abs.add(np.abs(a))
        elif lo >= 0.0:
            self.pos.add(a)
        else:
            negative = a < 0.0
            self.neg.add(-a[negative])
            self.pos.add(a[~negative])

    def _check(self) -> None:
        if self.min is None:
            raise RuntimeError("range() called before any data was observed")

    @property
    def _nonnegative(self) -> bool:
        return self.min is not None and self.min >= 0.0

    def _symmetric_range(self, t: float) -> tuple[float, float]:
        return _finalize(0.0 if self._nonnegative else -t, t)


class PercentileObserver(_HistogramObserver):
    """Histogram estimate of percentiles.

    Symmetric: ``t`` = the ``percentile``-th percentile of ``|x|``.
    Asymmetric: ``lo`` / ``hi`` = the ``100-percentile`` / ``percentile``-th
    percentiles of ``x`` (then widened to include 0).  Accurate to about one
    bin width.
    """

    def __init__(self, *, symmetric: bool = False, num_bits: int = 8,
                 percentile: float = 99.999, num_bins: int = 2048) -> None:
        super().__init__(symmetric=symmetric, num_bits=num_bits, num_bins=num_bins)
        self.percentile = percentile

    def _value_at_rank(self, r: float) -> float:
        n_neg = self.neg.total
        if n_neg > 0 and r <= n_neg:
            return -self.neg.quantile_at_rank(n_neg - r)
        return self.pos.quantile_at_rank(r - n_neg)

    def range(self) -> tuple[float, float]:
        self._check()
        q = self.percentile / 100.0
        if self.symmetric:
            return self._symmetric_range(self.abs.quantile_at_rank(q * self.abs.total))
        total = self.neg.total + self.pos.total
        lo = max(self._value_at_rank((1.0 - q) * total), self.min)
        hi = min(self._value_at_rank(q * total), self.max)
        return _finalize(lo, hi)


class EntropyObserver(_HistogramObserver):
    """TensorRT-style KL-divergence calibration (see ``_kl_threshold``).

    Symmetric: KL on the ``|x|`` histogram with ``2**(num_bits-1)`` levels
    (range ``(0, t)`` if all data are non-negative).
    Asymmetric: each sign's tail on its own histogram, ``2**num_bits`` levels
    if the other side is empty, else ``2**(num_bits-1)``.
    """

    def __init__(self, *, symmetric: bool = False, num_bits: int = 8,
                 num_bins: int = 2048) -> None:
        super().__init__(symmetric=symmetric, num_bits=num_bits, num_bins=num_bins)

    def range(self) -> tuple[float, float]:
        self._check()
        max_cands = max(self.num_bins // 2, 1)
        if self.symmetric:
            levels = 2 ** (self.num_bits - 1)
            return self._symmetric_range(_kl_threshold(self.abs, levels, max_cands))
        has_neg = self.neg.vmax > 0.0
        has_pos = self.pos.vmax > 0.0
        both = has_neg and has_pos
        levels = 2 ** (self.num_bits - 1) if both else 2 ** self.num_bits
        lo = -_kl_threshold(self.neg, levels, max_cands) if has_neg else 0.0
        hi = _kl_threshold(self.pos, levels, max_cands) if has_pos else 0.0
        return _finalize(lo, hi)


class MSEObserver(_HistogramObserver):
    """Range minimising the expected squared quantization error.

    For a candidate range with step ``s`` the error is ``N_in * s**2 / 12``
    (uniform rounding error of the values inside) plus the squared distance
    of every clipped value to the range edge, both from the histogram.
    Symmetric: 1-D search over ``t`` with ``s = t / (2**(num_bits-1) - 1)``
    (range ``(0, t)`` if all data are non-negative).  Asymmetric: 2-D search
    over ``(lo, hi)`` with ``s = (hi - lo) / (2**num_bits - 1)``.  Candidates
    are the histogram bin edges plus the exact min / max. When the grid has at least as many
    steps as the histogram has bins (16-bit with the default 2048 bins) the exact min / max is
    returned, as for ``entropy``.
    """

    def __init__(self, *, symmetric: bool = False, num_bits: int = 8,
                 num_bins: int = 2048) -> None:
        super().__init__(symmetric=symmetric, num_bits=num_bits, num_bins=num_bins)

    def range(self) -> tuple[float, float]:
        self._check()
        if 2 ** self.num_bits - 1 >= self.num_bins:
            # a step finer than a histogram bin: clipping is judged at bin resolution, coarser
            # than the grid (16-bit would lose ~30 dB), so nothing is clipped
            return MinMaxObserver.range(self)
        if self.symmetric:
            steps = 2 ** (self.num_bits - 1) - 1
            return self._symmetric_range(_mse_symmetric(self.abs, steps))
        a, b = _mse_asymmetric(self.neg, self.pos, 2 ** self.num_bits - 1)
        return _finalize(-a, b)


def make_observer(method: str, *, symmetric: bool = False, num_bits: int = 8,
                  percentile: float = 99.999, num_bins: int = 2048) -> Observer:
    """Build the observer for ``method`` (one of ``METHODS``).

    ``num_bits`` (2..16) is the target integer width, used by ``entropy`` and
    ``mse``; ``percentile`` (50 <= p <= 100) by ``percentile``; ``num_bins``
    (>= 16) is the histogram size of the histogram-based methods.
    Raises ``ValueError`` for an unknown method or an out-of-range option.
    """
    if method not in METHODS:
        raise ValueError(f"unknown range method {method!r}; valid methods: {', '.join(METHODS)}")
    if not isinstance(num_bits, int) or not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be an integer in 2..16, got {num_bits!r}")
    if not isinstance(num_bins, int) or num_bins < 16:
        raise ValueError(f"num_bins must be an integer >= 16, got {num_bins!r}")
    if not 50.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [50, 100], got {percentile!r}")
    if method == "minmax":
        return MinMaxObserver(symmetric=symmetric)
    if method == "percentile":
        return PercentileObserver(symmetric=symmetric, num_bits=num_bits,
                                  percentile=float(percentile), num_bins=num_bins)
    if method == "entropy":
        return EntropyObserver(symmetric=symmetric, num_bits=num_bits, num_bins=num_bins)
    return MSEObserver(symmetric=symmetric, num_bits=num_bits, num_bins=num_bins)
