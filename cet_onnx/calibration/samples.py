"""The data stage: read the samples (and labels), split off held-out verification samples, batch both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np

from cet_onnx.calibration.data import ModelInput, batched, load_samples, run_reason
from cet_onnx.errors import InputError, first_line
from cet_onnx.progress import warn

if TYPE_CHECKING:
    from cet_onnx.options import DataOptions


@dataclass
class Samples:
    """Calibration and verification samples, batched, with the labels of all samples (if given)."""

    calib_samples: list
    verify_samples: list
    batch_size: int
    calib_batches: list
    verify_batches: list
    labels: np.ndarray | None


def read_samples(calib: str | None, inputs: list[ModelInput], data: DataOptions, seed: int,
                 fixed: Mapping[str, tuple[ModelInput, np.ndarray]] | None = None) -> Samples:
    """Samples from ``calib`` (random data without it), the last ones held out to verify on. ``fixed``: inputs
    frozen by ``--fix-input``, dropped from the data."""
    limit = data.calib_size + data.verify_size if data.calib_size else None
    samples = load_samples(calib, inputs, limit=limit, image=data.image, seed=seed, fixed=fixed)
    labels = load_labels(data.labels, len(samples), truncated=limit is not None) if data.labels else None
    calib_samples, verify_samples = split_samples(samples, data.verify_size)
    bs = effective_batch_size(inputs, data.batch_size)
    return Samples(calib_samples, verify_samples, bs, batched(calib_samples, bs, inputs=inputs),
                   batched(verify_samples, bs, inputs=inputs), labels)


def effective_batch_size(inputs: list[ModelInput], requested: int) -> int:
    """The requested batch size, unless an input fixes its first dimension; 1 (one run per batch) where
    feeds are runs (:func:`~cet_onnx.calibration.data.run_reason`)."""
    if run_reason(inputs) is not None:
        return 1
    fixed = {d for i in inputs for d in i.shape[:1] if isinstance(d, int) and d > 0}
    if fixed:
        b = min(fixed)
        if b != requested and requested != 1:
            warn(f"the model fixes its batch dimension to {b}; using --batch-size {b}")
        return b
    if requested < 1:
        raise InputError(f"--batch-size must be at least 1, got {requested}")
    return requested


def split_samples(samples: list, verify_size: int) -> tuple[list, list]:
    """Calibration samples and held-out verification samples (disjoint when possible)."""
    n = len(samples)
    k = min(verify_size, n // 4)
    if k <= 0:
        if verify_size > 0:
            warn(f"only {n} calibration sample(s): verifying on the calibration data itself")
        return samples, samples if verify_size > 0 else []
    return samples[: n - k], samples[n - k:]


def load_labels(path: str, count: int, truncated: bool = False) -> np.ndarray:
    """Integer labels from ``.npy``, checked to line up with ``count`` samples.

    With ``truncated`` (the data was cut to its first ``count`` samples) the labels may be longer
    and are cut the same way.
    """
    try:
        labels = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"labels '{path}': cannot read ({type(exc).__name__}: {first_line(exc, '')})") from None
    if labels.dtype.kind not in "iu" or labels.ndim < 1:
        raise InputError(f"labels '{path}': expected integer class labels, got dtype {labels.dtype} shape {list(labels.shape)}")
    if labels.shape[0] != count and not (truncated and labels.shape[0] > count):
        raise InputError(f"labels '{path}': {labels.shape[0]} labels for {count} samples")
    return labels[:count]
