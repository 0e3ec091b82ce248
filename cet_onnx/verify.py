"""Compare a quantized model's outputs with the float model's: SQNR, max error, and the metric the output's meaning calls for.

Per output kind (:mod:`cet_onnx.graph.output_kind`): logits and probabilities get top-1
agreement, embeddings the mean and worst cosine similarity; every float output gets SQNR.

Pure functions over arrays; :func:`compare_models` runs both models on the same batches (the
verify stage of ``quantize`` and ``cet-onnx evaluate`` both use it), and a latency helper
times real onnxruntime runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from cet_onnx.allocation.losses import cosine_similarity
from cet_onnx.calibration import padding
from cet_onnx.graph.output_kind import output_kinds
from cet_onnx.runner import concat_outputs, make_session, run_batches


@dataclass
class OutputMetrics:
    """How one output of the quantized model differs from the reference."""

    name: str
    sqnr_db: float
    max_abs_error: float
    top1_agreement: float | None  # fraction in [0, 1], for logits / probabilities
    kind: str = "tensor"
    mean_cosine: float | None = None  # embeddings: mean cosine similarity to the float output
    min_cosine: float | None = None

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


def compare_outputs(names: Sequence[str], ref: Sequence[np.ndarray], test: Sequence[np.ndarray],
                    kinds: dict[str, str] | None = None, mask: np.ndarray | None = None) -> list[OutputMetrics]:
    """Metrics for every output pair; ``kinds``: output name → kind (without one, classifier-like
    outputs count as logits). ``mask``: the inputs' attention mask; a token-level output counts
    its real tokens only (:mod:`cet_onnx.calibration.padding`)."""
    result = []
    for name, r, t in zip(names, ref, test):
        positions = padding.real_positions(mask, r)
        r = np.asarray(padding.select(r, positions))
        t = np.asarray(padding.select(t, positions))
        if r.dtype.kind != "f":
            same = float(np.mean(r == t)) if r.size else 1.0
            result.append(OutputMetrics(name, float("inf") if same == 1.0 else float("nan"), 0.0 if same == 1.0 else float("nan"), None))
            continue
        maxerr = float(np.max(np.abs(r.astype(np.float64) - t))) if r.size else 0.0
        kind = (kinds or {}).get(name) or ("logits" if is_classifier_like(r) else "tensor")
        m = OutputMetrics(name, sqnr_db(r, t), maxerr, None, kind)
        if kind in ("logits", "probabilities") and is_classifier_like(r):
            m.top1_agreement = top1_agreement(r, t)
        elif kind == "embedding" and r.size:
            cos = cosine_similarity(r, t)
            m.mean_cosine, m.min_cosine = float(np.mean(cos)), float(np.min(cos))
        result.append(m)
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


@dataclass
class Comparison:
    """Both models' outputs on the same batches and how they differ."""

    names: list[str]
    ref: list[np.ndarray]
    test: list[np.ndarray]
    metrics: list[OutputMetrics]
    latency_ms: dict[str, Any] = field(default_factory=dict)
    positions: dict[str, Any] = field(default_factory=dict)   # output → counted positions (token-level outputs)

    def accuracy(self, labels: np.ndarray) -> dict[str, float]:
        """Top-1 accuracy of the first output of both models."""
        return {"fp32": accuracy(self.ref[0], labels), "quantized": accuracy(self.test[0], labels)}


def compare_models(model: ir.Model, qmodel: ir.Model, batches: list, providers: Sequence[str], *, desc: str = "",
                   latency_repeats: int = 0) -> Comparison:
    """Run both models on ``batches`` and compare every output.

    One session at a time, so a large model's float and quantized weights are never both
    held by onnxruntime.
    ``latency_repeats``: also time each model on the first batch (``latency_ms``).
    """
    ref_sess = make_session(model, providers)
    names = [o.name for o in ref_sess.get_outputs()]
    ref = concat_outputs(run_batches(ref_sess, batches, f"{desc}float model"))
    latency: dict[str, Any] = {}
    if latency_repeats:
        latency = {"batch": int(next(iter(batches[0].values())).shape[0]),
                   "fp32": median_latency_ms(ref_sess, batches[0], latency_repeats)}
    del ref_sess
    q_sess = make_session(qmodel, providers)
    test = concat_outputs(run_batches(q_sess, batches, f"{desc}quantized model", names))
    if latency_repeats:
        latency["quantized"] = median_latency_ms(q_sess, batches[0], latency_repeats)
    del q_sess
    mask = padding.batch_mask(batches)
    return Comparison(names, ref, test, compare_outputs(names, ref, test, output_kinds(model.graph), mask), latency,
                      {n: padding.counted(padding.real_positions(mask, r)) for n, r in zip(names, ref)})


def verify(model: ir.Model, qmodel: ir.Model, batches: list, providers: Sequence[str],
           labels: np.ndarray | None = None) -> dict[str, Any]:
    """The verify stage: both models on the held-out batches, worst SQNR and agreement (the gates' inputs)."""
    if not batches:
        return {"samples": 0, "outputs": [], "min_sqnr_db": None, "min_top1_agreement": None}
    c = compare_models(model, qmodel, batches, providers, desc="verify: ")
    sqnrs = [m.sqnr_db for m in c.metrics if not np.isnan(m.sqnr_db)]
    agrees = [m.top1_agreement for m in c.metrics if m.top1_agreement is not None]
    cosines = [m.mean_cosine for m in c.metrics if m.mean_cosine is not None]
    out: dict[str, Any] = {
        "samples": int(sum(next(iter(b.values())).shape[0] for b in batches)),
        "outputs": [{**m.as_dict(), "positions": c.positions.get(m.name)} for m in c.metrics],
        "min_sqnr_db": min(sqnrs) if sqnrs else None,
        "min_top1_agreement": min(agrees) if agrees else None,
        "min_mean_cosine": min(cosines) if cosines else None,
    }
    if labels is not None and c.ref and c.ref[0].shape[0] == len(labels):
        out["accuracy"] = c.accuracy(labels)
    return out
