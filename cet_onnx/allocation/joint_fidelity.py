"""Does the sum of single probes predict the loss of weights and activations quantized together?

The exact solve adds weight terms (one per weight and format, :mod:`.probes`) and activation terms
(one per activation point, :mod:`.activation_probes`), each measured with everything else float. This
check draws random assignments of both kinds at once:

* a format per weight, as the weight fidelity check draws them (:func:`.allocate.random_choice`);
* a random share of the 8-bit activation points (:func:`.activation_probes.random_share`);

writes each with the rewriter exactly as it would deploy it (weights' own codes, activation Q/DQ pairs),
runs it on the probe batches in a fresh onnxruntime session, and compares the measured loss change with
the summed prediction: Spearman rank correlation and median measured / predicted. Each assignment keeps
its weights' and its activations' predicted terms apart, so a user sees which kind carries the prediction.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from cet_onnx.allocation.activation_probes import random_share, written_loss
from cet_onnx.allocation.allocate import Candidates, random_choice, rank_agreement
from cet_onnx.allocation.probes import ProbeSession
from cet_onnx.prepared import Prepared
from cet_onnx.progress import Progress
from cet_onnx.quant.quantizer import ActivationParams


def joint_fidelity(p: Prepared, session: ProbeSession, weight_costs: np.ndarray, cand: Candidates,
                   act_params: Mapping[str, ActivationParams], act_delta: Mapping[str, float],
                   count: int = 12, seed: int = 0) -> dict[str, Any]:
    """Predicted (Σ weight terms + Σ activation terms) vs measured loss change of ``count`` random assignments.

    ``weight_costs``: ``[weights, formats]`` predicted ΔL (:class:`~cet_onnx.allocation.probes.Sensitivity`
    ``.costs``); ``act_params`` / ``act_delta``: each 8-bit activation point's Q/DQ parameters and its
    single-point ΔL."""
    rng = np.random.default_rng(seed)
    points = list(act_params)
    idx = np.arange(len(cand.weights))
    rows = []
    bar = Progress(count, "joint fidelity check", "assignment")
    try:
        for _ in range(count):
            choice = random_choice(rng, cand)
            acts = random_share(rng, points)
            w_pred = float(weight_costs[idx, choice].sum())
            a_pred = float(sum(act_delta[t] for t in acts))
            measured = written_loss(p, session, {t: act_params[t] for t in acts}, cand.chosen(choice)) \
                - session.base_loss
            rows.append({"bytes": float(cand.sizes[idx, choice].sum()), "activation_points": len(acts),
                         "predicted_weights": w_pred, "predicted_activations": a_pred,
                         "predicted": w_pred + a_pred, "measured": measured})
            bar.update()
    finally:
        bar.close()
    rho, ratio = rank_agreement(np.array([r["predicted"] for r in rows]), np.array([r["measured"] for r in rows]))
    return {"assignments": rows, "spearman": rho, "median_measured_over_predicted": ratio,
            "activation_points": len(points), "weights": len(cand.weights)}
