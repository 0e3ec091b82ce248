"""Major-axis rounding: GPTQ-style error feedback that pushes quantization error into low-curvature directions.

For a layer ``y = W x`` the output error on the calibration inputs is ``‖(W − Ŵ) X‖²``, a
quadratic form with Hessian ``H = X Xᵀ`` (per output row). Round-to-nearest ignores ``H``.
Here columns are quantized one at a time, and the error each one leaves is fed back into the
columns not yet quantized, weighted by the inverse Hessian (its Cholesky factor), so the
remaining columns absorb it along the directions the inputs barely excite — the major axis of
the error ellipsoid. Columns are visited in activation order (largest ``H_jj`` first) and in
blocks of ``block`` columns with lazy batch updates, as in the GPTQ reference.

Scales and zero points are fixed before rounding (they come from the weight format, with the
MSE clipping search), so this only changes which integer each weight rounds to; any
granularity and bit-width works. Pure numpy: arrays in, codes out.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import LinAlgError, cholesky
from scipy.linalg.lapack import dtrtri


def _inverse_cholesky_upper(h: np.ndarray, order: np.ndarray, dead: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(Hp + λI)⁻¹ = UᵀU`` for ``Hp = H[order][:, order]`` (the
    ``dead`` columns, in ``Hp``'s order, get unit curvature), raising the damping until it is
    positive definite; float32, the precision :func:`gptq_round` works in.

    With ``J`` the reversal permutation and ``J(Hp + λI)J = RRᵀ`` (lower ``R``), ``U = J R⁻¹ J``:
    one Cholesky and one triangular inverse, no full inverse (about 3x faster). Besides ``h``
    it holds one float64 ``n × n`` array (``J Hp J``, gathered from ``h`` in one copy) and the
    float32 result: a layer with 8192 inputs has 512 MB float64 Hessians.
    """
    n = h.shape[0]
    rev = order[::-1]
    k = np.flatnonzero(dead[::-1])
    diag = np.arange(n)
    mean_diag = float(np.where(dead, 1.0, np.diag(h)[order]).mean()) or 1.0
    lam = damp * mean_diag
    for _ in range(8):
        try:
            r = np.asarray(h[np.ix_(rev, rev)], dtype=np.float64)   # J Hp J, a fresh copy per attempt
            r[k, k] = 1.0
            r[diag, diag] += lam
            r = cholesky(r, lower=True, overwrite_a=True, check_finite=False)  # zeros above the diagonal
            r, info = dtrtri(r, lower=1, overwrite_c=1)
            if info != 0:
                raise LinAlgError("singular Cholesky factor")
            return r[::-1, ::-1].astype(np.float32)
        except (LinAlgError, np.linalg.LinAlgError):
            lam *= 10.0
    raise LinAlgError("Hessian is not positive definite even with heavy damping")


def hessian_factor(h: np.ndarray, damp: float = 0.01, act_order: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(column order, upper Cholesky factor of the damped inverse Hessian in that order, float32).

    Depends on ``H`` only, so one factor serves every format a weight is probed at. ``h`` is
    not modified.
    """
    d = np.diag(h).astype(np.float64)
    dead = d <= 0
    d[dead] = 1.0                      # inputs that are always zero: unit curvature, any rounding is free
    perm = np.argsort(-d, kind="stable") if act_order else np.arange(h.shape[0])
    return perm, _inverse_cholesky_upper(h, perm, dead[perm], damp)


def gptq_round(w: np.ndarray, h: np.ndarray | tuple[np.ndarray, np.ndarray], scale: np.ndarray,
               zero_point: np.ndarray, qmin: int, qmax: int, block: int = 128, damp: float = 0.01,
               act_order: bool = True) -> np.ndarray:
    """Integer codes for ``w`` ``[rows, cols]`` given ``H`` ``[cols, cols]`` and per-element scale / zero point.

    ``h`` may also be a precomputed :func:`hessian_factor`. Returns int8 codes with the same
    shape as ``w``; ``(q − zero_point) · scale`` is the dequantized weight. ``scale`` and
    ``zero_point`` may be broadcast views: only one block of their columns is read at a time.
    The working copy is float32 and column-major (one visited column per row), as in the GPTQ
    reference: besides the factor it holds about 1.5 bytes per weight on top of float32 ``w``.
    """
    rows, n = w.shape
    perm, u = h if isinstance(h, tuple) else hessian_factor(h, damp, act_order)
    if u.shape != (n, n):
        raise ValueError(f"Hessian shape {u.shape} does not match {n} columns")
    step = max(1, 2**22 // max(rows, 1))           # bounds the temporaries of gathers and updates
    wt = np.empty((n, rows), np.float32)            # wt[k] = column perm[k] of w
    for k in range(0, n, step):
        wt[k:k + step] = np.asarray(w[:, perm[k:k + step]], dtype=np.float32).T
    qt = np.empty((n, rows), np.int8)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        cols = perm[i1:i2]
        st = np.ascontiguousarray(np.asarray(scale[:, cols], dtype=np.float32).T)
        zt = np.ascontiguousarray(np.asarray(zero_point[:, cols], dtype=np.float32).T)
        w1 = wt[i1:i2]
        err1 = np.empty_like(w1)
        u1 = u[i1:i2, i1:i2].astype(np.float32)
        for i in range(i2 - i1):
            col = w1[i]
            qc = np.clip(np.rint(col / st[i]) + zt[i], qmin, qmax)
            qt[i1 + i] = qc
            err = (col - (qc - zt[i]) * st[i]) / u1[i, i]
            w1[i:] -= np.outer(u1[i, i:], err)
            err1[i] = err
        for k in range(i2, n, step):                # the lazy batch update of the columns not yet visited
            wt[k:k + step] -= u[i1:i2, k:k + step].T.astype(np.float32) @ err1
    out = np.empty((rows, n), np.int8)
    out[:, perm] = qt.T
    return out


def major_axis_rounding(info, spec, hessians: list[np.ndarray], block: int = 128, damp: float = 0.01,
                        act_order: bool = True, keep_hessians: bool = False):
    """A :data:`cet_onnx.quant.quantizer.Rounding` that applies :func:`gptq_round` to one layer's weight.

    ``info`` / ``spec`` describe the weight's layout (:mod:`cet_onnx.rounding.hessian`), ``hessians`` holds
    one Hessian per convolution group (one for Gemm / MatMul). With ``keep_hessians`` the Hessians
    stay after factoring, and ``rounding.quadratic(delta)`` gives the layer's exact quadratic form
    ``Σ tr(δ H δᵀ)`` of a weight error (``None`` without them); fast probes extrapolate with it.
    """
    from cet_onnx.rounding.hessian import from_rows, groups_rows, quadratic_error, to_rows

    factors: list = []
    kept = list(hessians) if keep_hessians else []

    def rounding(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
        if not factors:
            while hessians:  # each Hessian is dropped once factored (unless kept): one n × n array per group
                factors.append(hessian_factor(hessians.pop(0), damp, act_order))
        w2, s2, z2 = (to_rows(a, info) for a in (w, scale, zero_point))
        q2 = np.empty(w2.shape, dtype=np.int8)
        for rows, f in zip(groups_rows(info, spec, len(factors)), factors):
            q2[rows] = gptq_round(w2[rows], f, s2[rows], z2[rows], qmin, qmax, block)
        return from_rows(q2, w.shape, info)

    def quadratic(delta: np.ndarray) -> float | None:
        return quadratic_error(delta, info, spec, kept) if kept else None

    rounding.quadratic = quadratic
    return rounding
