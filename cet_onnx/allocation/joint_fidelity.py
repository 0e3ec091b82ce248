"""Does the sum of single probes predict the loss of weights and activations quantized together?

The exact solve adds weight terms (one per weight and format, :mod:`.probes`) and activation terms
(one per activation point, :mod:`.activation_probes`), each measured with everything else float. This
check draws random assignments of both kinds at once:

* a format per weight, as the weight fidelity check draws them (:func:`.allocate.random_choice`);
* a random share of the 8-bit activation points (the share itself drawn per assignment, so that the
  assignments span few to most points);

writes each with the rewriter exactly as it would deploy it (weights' own codes, activation Q/DQ pairs),
runs it on the probe batches in a fresh onnxruntime session, and compares the measured loss change with
the summed prediction: Spearman rank correlation and median measured / predicted, overall and as
measured by each kind alone (weights' terms, activations' terms) so a user sees which kind the sum misjudges.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from cet_onnx.allocation.allocate import Candidates, random_choice, rank_agreement
from cet_onnx.allocation.probes import ProbeSession
from cet_onnx.graph.rewriter import rewrite
from cet_onnx.prepared import Prepared
from cet_onnx.progress import Progress
from cet_onnx.quant.quantizer import ActivationParams
from cet_onnx.runner import concat_outputs, make_session, run_batches


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
            share = rng.random()
            acts = [t for t in points if rng.random() < share]
            w_pred = float(weight_costs[idx, choice].sum())
            a_pred = float(sum(act_delta[t] for t in acts))
            measured = _loss(p, session, cand.chosen(choice), {t: act_params[t] for t in acts}) - session.base_loss
            rows.append({"bytes": float(cand.sizes[idx, choice].sum()), "activation_points": len(acts),
                         "predicted_weights": w_pred, "predicted_activations": a_pred,
                         "predicted": w_pred + a_pred, "measured": measured})
            bar.update()
    finally:
        bar.close()
    rho, ratio = rank_agreement(np.array([r["predicted"] for r in rows]), np.array([r["measured"] for r in rows]))
    return {"assignments": rows, "spearman": rho, "median_measured_over_predicted": ratio,
            "activation_points": len(points), "weights": len(cand.weights)}


def _loss(p: Prepared, session: ProbeSession, qweights: Mapping[str, Any],
          acts: Mapping[str, ActivationParams]) -> float:
    """The probe loss of the model written with ``qweights`` and the activation Q/DQ pairs ``acts``."""
    model = rewrite(p.model, p.weights, dict(qweights), dict(acts)).model
    out = concat_outputs(run_batches(make_session(model, p.providers), session.batches, "", [session.loss_output]))[0]
    session.runs += 1
    return session.outputs_loss(out)
