"""Compare a quantized model's outputs with the float model's: SQNR, max error, agreement.

Pure functions over arrays, plus a latency helper that times real onnxruntime runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass
class OutputMetrics:
    """How one output of the quantized model differs from the reference."""

    name: str
    sqnr_db: float
    max_abs_error: float
    top1_agreement: float | None  # fraction in [0, 1], for classifier-like outputs

    def as_dict(self) -> dict:
        return asdict(self)


def is_classifier_like(x: np.ndarray) -> bool:
    """Float output with classes on a last axis of at least two entries."""
    return x.dtype.kind == "f" and x.ndim >= 2 and x.shape[-1] >= 2


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """10·log10(‖ref‖² / ‖ref − test‖²); +inf when identical."""
    ref = np.asarray(ref, dtype=np.float64)
    err = ref - np.asarray(test, dtype=np.float64)
    noise = float(np.sum(err * err))
    signal = float(np.sum(ref * ref))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


def top1_agreement(ref: np.ndarray, test: np.ndarray) -> float:
    """Fraction of positions whose argmax over the last axis is the same."""
    return float(np.mean(np.argmax(ref, axis=-1) == np.argmax(test, axis=-1)))


def compare_outputs(names: Sequence[str], ref: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> list[OutputMetrics]:
    """Metrics for every output pair."""
    result = []
    for name, r, t in zip(names, ref, test):
        r = np.asarray(r)
        t = np.asarray(t)
        if r.dtype.kind != "f":
            same = float(np.mean(r == t)) if r.size else 1.0
            result.append(OutputMetrics(name, float("inf") if same == 1.0 else float("nan"), 0.0 if same == 1.0 else float("nan"), None))
            continue
        maxerr = float(np.max(np.abs(r.astype(np.float64) - t))) if r.size else 0.0
        agree = top1_agreement(r, t) if is_classifier_like(r) else None
        result.append(OutputMetrics(name, sqnr_db(r, t), maxerr, agree))
    return result


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of logits against integer labels (positions flattened)."""
    pred = np.argmax(logits, axis=-1).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    return float(np.mean(pred == labels))


def median_latency_ms(session, feed: dict, repeats: int = 30, warmup: int = 3) -> float:
    """Median wall time of ``session.run`` on ``feed``, in milliseconds."""
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)
