"""Sensitivity of every activation quantizer: the loss change when that point alone is quantized.

An activation quantizer's error is a known perturbation too, so it is measured the way a weight's
is. For every tensor static mode would quantize (:func:`cet_onnx.graph.rewriter.activation_tensors`:
the CNN plan, or the transformer plan on a graph with attention or LayerNorm) and every precision
in ``bits`` (8 and 16 by default):

* the range comes from the calibration batches with ``--calib-method``, for each width on its own
  (``mse`` clips an 8-bit grid to the bulk, but keeps a 16-bit one's full range); with ``compare`` methods, the 8-bit point is also
  probed with each of their ranges, and ``best_method`` names the one whose ΔL is lowest;
* the model with that one Q/DQ pair and everything else float (weights too) is emitted by the
  rewriter exactly as it would deploy it, run on the probe batches in a fresh onnxruntime session,
  and scored with the probe loss against the float model's outputs: ``delta_loss``;
* ``quantizer_sqnr_db``: the pair's own error, ``Q/DQ(t)`` against ``t`` on the probe batches.

Tensors that carry non-finite values or sentinels (attention masks) get no range and no probe; they
are listed with the reason. Then, as for weights, the additive prediction is checked: on
``fidelity_samples`` random sets of 8-bit points the measured loss is compared with the sum of the
points' ``delta_loss`` (Spearman rank correlation, median measured / predicted); each set takes every point
with a probability drawn for that set, so that the sets span few to most points (with a fixed one half, every
set's prediction was about the same and the ranking measured mostly noise).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from cet_onnx.allocation.allocate import rank_agreement
from cet_onnx.allocation.probes import ProbeSession
from cet_onnx.calibration.observe import collect_ranges
from cet_onnx.exposed import ExposedSession
from cet_onnx.graph.rewriter import activation_tensors, rewrite
from cet_onnx.prepared import Prepared
from cet_onnx.progress import Progress
from cet_onnx.quant.quantizer import ActivationParams, QuantizedWeight, activation_params, quantize_activation
from cet_onnx.runner import concat_outputs, make_session, run_batches
from cet_onnx.tensor_errors import SqnrSums


def activation_ranges(p: Prepared, method: str, symmetric: bool, num_bits: int = 8
                      ) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """(``num_bits`` range of every point static mode would quantize, the points left float and why)."""
    tensors = activation_tensors(p.model, remove_relus=not symmetric)
    left_float: dict[str, str] = {}
    ranges = collect_ranges(p.model, tensors, p.calib_batches, p.providers, method, symmetric=symmetric,
                            num_bits=num_bits, left_float=left_float)
    return ranges, left_float


def written_loss(p: Prepared, session: ProbeSession, params: Mapping[str, ActivationParams],
                 qweights: Mapping[str, QuantizedWeight] | None = None) -> float:
    """The probe loss of the model written with ``params``' activation Q/DQ pairs and ``qweights`` (none: weights
    float)."""
    model = rewrite(p.model, p.weights, dict(qweights or {}), dict(params)).model
    sess = make_session(model, p.providers)
    out = concat_outputs(run_batches(sess, session.batches, "", [session.loss_output]))[0]
    session.runs += 1
    return session.outputs_loss(out)


def _quantizer_sqnr(p: Prepared, session: ProbeSession, params: dict[tuple[str, int, str], ActivationParams]
                    ) -> dict[tuple[str, int, str], float]:
    """SQNR of each (point, bits, range method)'s Q/DQ against its float value on the probe batches
    (float model, one run per batch)."""
    sess = ExposedSession(p.model, (k[0] for k in params), p.providers)
    sums = {k: SqnrSums() for k in params}
    for feed in session.batches:
        values = sess.run(feed)
        for key, prm in params.items():
            if key[0] in values:
                sums[key].add(values[key[0]], quantize_activation(values[key[0]], prm))
    return {k: s.db() for k, s in sums.items()}


def activation_sensitivities(p: Prepared, session: ProbeSession, method: str = "mse", symmetric: bool = False,
                             bits: Sequence[int] = (8, 16), fidelity_samples: int = 8, seed: int = 0,
                             compare: Sequence[str] = ()) -> dict[str, Any]:
    """Per point × precision (× range method, with ``compare``): ΔL when it alone is quantized and its own SQNR;
    the points left float; fidelity of the additive prediction at 8 bits with ``method``."""
    ranges, left_float = activation_ranges(p, method, symmetric)
    wide = {b: ranges if b == 8 else activation_ranges(p, method, symmetric, b)[0] for b in bits}
    probes = {(t, b, method): wide[b][t] for t in ranges for b in bits if t in wide[b]}
    for other in dict.fromkeys(m for m in compare if m != method):
        other_ranges, _ = activation_ranges(p, other, symmetric)
        probes.update({(t, 8, other): other_ranges[t] for t in ranges if t in other_ranges})
    params = {k: activation_params(lo, hi, k[1], symmetric) for k, (lo, hi) in probes.items()}
    own = _quantizer_sqnr(p, session, params) if params else {}
    rows = []
    bar = Progress(len(params), "activation probes", "probe")
    try:
        for (t, b, m), prm in params.items():
            rows.append({"tensor": t, "precision": f"int{b} static", "method": m, "range": list(probes[(t, b, m)]),
                         "delta_loss": written_loss(p, session, {t: prm}) - session.base_loss,
                         "quantizer_sqnr_db": own[(t, b, m)]})
            bar.update()
    finally:
        bar.close()
    result: dict[str, Any] = {"points": rows, "left_float": left_float, "base_loss": session.base_loss,
                              "calib_method": method}
    if len({r["method"] for r in rows}) > 1:
        result["best_method"] = _best_methods(rows)
    eight = {r["tensor"]: r["delta_loss"] for r in rows if r["precision"] == "int8 static" and r["method"] == method}
    if fidelity_samples and len(eight) >= 2:
        result["fidelity"] = _fidelity(p, session, {t: params[(t, 8, method)] for t in eight}, eight,
                                       fidelity_samples, seed)
    return result


def _best_methods(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Point → the range method whose 8-bit probe lost least."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["precision"] == "int8 static" and (r["tensor"] not in best or r["delta_loss"] < best[r["tensor"]]["delta_loss"]):
            best[r["tensor"]] = r
    return {t: r["method"] for t, r in best.items()}


def random_share(rng: np.random.Generator, names: Sequence[str]) -> list[str]:
    """A random subset of ``names``: each taken with a probability drawn per call, so repeated draws span few to
    most of them (with a fixed one half every subset is about the same size)."""
    share = rng.random()
    return [t for t in names if rng.random() < share]


def _fidelity(p: Prepared, session: ProbeSession, params: dict[str, ActivationParams], delta: dict[str, float],
              samples: int, seed: int) -> dict[str, Any]:
    """Measured loss of random sets of 8-bit points against the sum of their single-point ΔL."""
    rng = np.random.default_rng(seed)
    names = list(params)
    rows = []
    bar = Progress(samples, "activation fidelity check", "assignment")
    try:
        for _ in range(samples):
            chosen = random_share(rng, names) or [names[int(rng.integers(len(names)))]]
            predicted = session.base_loss + sum(delta[t] for t in chosen)
            measured = written_loss(p, session, {t: params[t] for t in chosen})
            rows.append({"points": len(chosen), "predicted": predicted, "measured": measured})
            bar.update()
    finally:
        bar.close()
    rho, ratio = rank_agreement(np.array([r["predicted"] for r in rows]), np.array([r["measured"] for r in rows]))
    return {"assignments": rows, "spearman": rho, "median_measured_over_predicted": ratio}
