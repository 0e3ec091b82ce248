"""The allocation stage: the probe session, sensitivities (through the probe cache), the solve and its report.

``quantize`` with a budget calls :func:`allocate`; ``analyze`` calls :func:`sensitivity_report`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from cet_onnx import __version__
from cet_onnx.allocation import cache as probe_cache, parallel
from cet_onnx.allocation.allocate import FAST_SCHEME, Budget, Candidates, Sensitivity, candidate_formats, closed_loop_loss_budget, \
    fidelity, measure_cet, measure_cet_fast, measure_hawq, measure_sqnr, refine_size_budget, solve
from cet_onnx.allocation.float_option import WHY_FLOAT, WithFloat, is_float
from cet_onnx.allocation.losses import default_loss
from cet_onnx.graph.output_kind import output_kind
from cet_onnx.allocation.probes import ProbeSession, float_outputs
from cet_onnx.allocation.latency_budget import LatencyBudget
from cet_onnx.allocation.solver import Limit, Solution, min_size, pareto_front
from cet_onnx.calibration import padding
from cet_onnx.calibration.branches import NOT_KEPT, WHY
from cet_onnx.calibration.probe_batches import probe_batches
from cet_onnx.errors import InputError
from cet_onnx.io import external_data
from cet_onnx.progress import Progress, warn
from cet_onnx.quant.quantizer import QuantizedWeight, WeightFormat
from cet_onnx.rounding.plan import hessian_budget, hessian_chunks, keeps_hessians, prepare_major_axis
from cet_onnx.timer import Timer

if TYPE_CHECKING:
    from cet_onnx.options import QuantizeOptions
    from cet_onnx.prepared import Prepared

#: ``--probe-numerics`` choices: activations in the probes float, or quantized as deployed
PROBE_NUMERICS = ("float", "deployed")
#: ``--probes`` choices: ``fast`` (one probe per weight and the layer's quadratic form where that is
#: exact to second order, one-sided probes elsewhere) or ``full`` (both finite differences of every format)
PROBE_MODES = ("fast", "full")


def loss_output(model: ir.Model, requested: str | None) -> str:
    """The output the probes measure their loss on: the requested one, else the first float output."""
    outputs = [o.name for o in model.graph.outputs]
    if requested is not None:
        if requested not in outputs:
            raise InputError(f"--loss-output '{requested}' is not a model output (outputs: {', '.join(outputs)})")
        return requested
    floats = [o.name for o in model.graph.outputs if o.dtype == ir.DataType.FLOAT]
    if not floats:
        raise InputError("the model has no float output to measure a loss on; choose one with --loss-output")
    return floats[0]


def probe_session(p: Prepared, opts: QuantizeOptions) -> tuple[ProbeSession, dict[str, Any]]:
    """The long-lived probe session on the first ``--probe-size`` calibration samples."""
    a = opts.allocation
    probe = probe_batches(p, min(a.probe_size, len(p.calib_samples)))
    batches, labels, n = probe.batches, probe.labels, probe.samples
    out = loss_output(p.model, a.loss_output)
    reference = float_outputs(p.model, batches, out, p.providers)
    kind = output_kind(next(v for v in p.model.graph.outputs if v.name == out))
    loss = a.loss or default_loss(reference, labels is not None, kind)
    acts = p.act_params if a.probe_numerics == "deployed" else None
    session = ProbeSession(p.model, p.weights, p.values, acts, batches, p.providers, loss, out, labels,
                           reference=reference)
    info = {"loss": loss, "loss_output": out, "output_kind": kind, "probe_samples": n, "base_loss": session.base_loss,
            "device": session.device, "probe_numerics": a.probe_numerics, "probes": a.probes,
            "probes_extrapolated": extrapolates(a.probes, loss, a.probe_numerics),
            "loss_positions": padding.counted(session.positions), "probe_padding": probe.report()}
    return session, info


def extrapolates(probes: str, loss: str, numerics: str) -> bool:
    """Whether fast probes may scale costs with the layer's quadratic form: only where the gradient at
    the float weights is zero (a loss against the float model's outputs, with float probe numerics)."""
    return probes == "fast" and loss != "ce" and numerics == "float"


def candidates(p: Prepared, opts: QuantizeOptions, quadratic: bool = False, prepare: bool = True) -> Candidates:
    """Every weight × candidate format (``--bits`` × per-channel / blocks of ``--candidate-block``).

    With ``prepare`` each is quantized now (every probed allocator reads them all), and with
    ``quadratic`` each weight's quadratic forms are kept for fast probes. Layer Hessians too
    large to hold at once (:func:`~cet_onnx.rounding.plan.hessians_fit`) are collected here chunk
    by chunk, used for every format of the chunk's weights and dropped. A model whose weights
    stay on disk keeps the codes on disk too.
    """
    a = opts.allocation
    formats = candidate_formats(a.bits, a.candidate_block, opts.weights.grid)
    keep = {w for w, why in p.unexercised.items() if why == WHY}
    budget_bytes = a.budget.size_bytes(sum(w.size for w in p.weights)) if a.budget is not None else None
    if keep and budget_bytes is not None and min_size(Candidates(p.weights, formats, {}, keep_8bit=keep).sizes) > budget_bytes:
        warn(f"{len(keep)} weight(s) in If branches the calibration data never takes cannot stay at 8 bits within "
             f"{a.budget.describe()}: they are allocated like the others, with no measured cost; calibrate with "
             "runs that take those branches (or --fix-input)")
        p.unexercised = {w: NOT_KEPT for w in keep}
        keep = set()
    cand = Candidates(p.weights, formats, p.values, opts.weights.clip, p.roundings,
                      on_disk=external_data.data_dir(p.model) is not None, keep_8bit=keep)
    if not prepare:
        return cand
    index = {w.name: i for i, w in enumerate(p.weights)}
    chunked = p.rounding == "major-axis" and p.hessians_deferred
    chunks = hessian_chunks(p, hessian_budget(p.weights)) if chunked else [p.weights]
    bar = Progress(len(p.weights), "candidate formats", "weight")
    try:
        for chunk in chunks:
            if chunked:
                prepare_major_axis(p, opts, only=chunk, keep_hessians=keeps_hessians(opts))
            for w in chunk:
                cand.prepare(index[w.name], quadratic)
                if chunked:
                    p.roundings.roundings.pop(w.name, None)   # its Hessian and factor
                bar.update()
    finally:
        bar.close()
    return cand


def _cache_settings(p: Prepared, opts: QuantizeOptions, cand: Candidates, allocator: str,
                    probe_info: dict[str, Any]) -> dict[str, Any]:
    """Everything besides the model and the data that the probe results depend on."""
    acts, r = opts.activations, opts.weight_rounding
    return {"allocator": allocator, "formats": [f.label for f in cand.formats], "loss": probe_info["loss"],
            "loss_output": probe_info["loss_output"], "act": None if p.act_params is None else
            [acts.bits, acts.symmetric, acts.method, acts.percentile],
            "hutchinson": opts.allocation.hutchinson_samples if allocator == "hawq" else None,
            "rounding": [p.rounding, p.roundings.max_bits],
            "hessian_rows": r.hessian_rows if p.rounding == "major-axis" else None,
            "clip": opts.weights.clip, "grid": opts.weights.grid, "numerics": opts.allocation.probe_numerics,
            "probes": opts.allocation.probes if allocator == "cet" else None,
            "fast_scheme": FAST_SCHEME if allocator == "cet" and opts.allocation.probes == "fast" else None,
            "weights": [w.name for w in cand.weights], "available": cand.available.tolist(),
            "act_mode": p.act_mode, "version": __version__,
            "integer_kernel": [w.name for w in cand.weights if w.integer_kernel]}   # their 8-bit codes are ±63


def sensitivities(p: Prepared, opts: QuantizeOptions, session: ProbeSession, cand: Candidates,
                  allocator: str, probe_info: dict[str, Any]) -> Sensitivity:
    """Probe results for ``allocator``, from the cache when the same model, data and settings were probed."""
    a = opts.allocation
    cache_dir = Path(a.cache_dir) if a.cache_dir else probe_cache.default_dir()
    key = probe_cache.cache_key(p.model, session.batches, _cache_settings(p, opts, cand, allocator, probe_info),
                                session.labels)
    if a.use_cache:
        entry = probe_cache.load(cache_dir, key)
        if entry is not None and np.shape(entry.get("costs")) == cand.sizes.shape:
            return Sensitivity(allocator, np.array(entry["costs"], dtype=np.float64), entry["details"],
                               0, 0.0)
    if allocator == "hawq":   # one Hutchinson estimate per weight from one random stream: serial
        sens = measure_hawq(session, cand, a.hutchinson_samples, opts.run.seed)
    else:
        with parallel.probe_pool(p, a, session) as pool:   # None: serial (--workers 1, no --ray)
            if allocator == "cet" and a.probes == "fast":
                sens = measure_cet_fast(session, cand, probe_info["probes_extrapolated"], pool)
            else:
                sens = (measure_cet if allocator == "cet" else measure_sqnr)(session, cand, pool)
    if a.use_cache:
        probe_cache.store(cache_dir, key, {"costs": sens.costs.tolist(), "details": sens.details})
    return sens


def sensitivity_table(cand: Candidates, sens: Sensitivity) -> list[dict[str, Any]]:
    """Per weight: every available format's predicted loss change and bytes (plus probe details)."""
    rows = []
    for i, w in enumerate(cand.weights):
        per = {}
        for j, f in enumerate(cand.formats):
            if not cand.available[i, j]:
                continue
            d = dict(sens.details[i].get(f.label, {})) if sens.allocator == "cet" else {}
            d["predicted"] = float(sens.costs[i, j])
            d["bytes"] = int(cand.sizes[i, j])
            per[f.label] = d
        row = {"name": w.name, "op": w.op_type, "shape": list(w.shape), "params": w.size, "formats": per}
        if sens.allocator == "hawq":
            row.update(sens.details[i])
        rows.append(row)
    return rows


def _throughput(runs: int, seconds: float) -> dict[str, Any]:
    return {"probe_runs": runs, "probe_seconds": round(seconds, 3),
            "forward_passes_per_second": round(runs / seconds, 2) if seconds > 0 else None}


def sensitivity_report(p: Prepared, opts: QuantizeOptions, allocators: tuple[str, ...],
                       header: dict[str, Any], activations: dict[str, Any] | None = None) -> dict[str, Any]:
    """``header``, then per weight and format the probe terms and predicted ΔL of each allocator, and fidelity;
    with ``activations`` (:func:`~cet_onnx.allocation.activation_probes.activation_sensitivities`' result), the
    fidelity of weights and activations quantized together too (:mod:`.joint_fidelity`)."""
    with p.timer.stage("probe"):
        session, info = probe_session(p, opts)
    with p.timer.stage("candidates"):
        cand = candidates(p, opts, quadratic=info["probes_extrapolated"] and "cet" in allocators)
    try:
        with p.timer.stage("probe"):
            result: dict[str, Any] = {**header, **info, "formats": [f.label for f in cand.formats]}
            runs0 = session.runs
            tp = time.perf_counter()
            for allocator in allocators:
                sens = sensitivities(p, opts, session, cand, allocator, info)
                result[allocator] = sensitivity_table(cand, sens)
                if allocator == "cet":
                    cet_sens = sens
            result.update(_throughput(session.runs - runs0, time.perf_counter() - tp))
        samples = opts.allocation.fidelity_samples
        if "cet" in allocators and samples:
            with p.timer.stage("fidelity"):
                result["fidelity"] = fidelity(session, cet_sens, cand, samples, opts.run.seed)
            if activations is not None and samples:
                with p.timer.stage("joint fidelity"):
                    result["joint_fidelity"] = _joint(p, opts, session, cet_sens, cand, activations)
    finally:
        cand.close()
    return result


def _joint(p: Prepared, opts: QuantizeOptions, session: ProbeSession, sens: Sensitivity, cand: Candidates,
           activations: dict[str, Any]) -> dict[str, Any]:
    """Joint fidelity over the 8-bit activation points probed with ``--calib-method``."""
    from cet_onnx.allocation.joint_fidelity import joint_fidelity
    from cet_onnx.quant.quantizer import activation_params
    rows = [r for r in activations["points"] if r["precision"] == "int8 static"
            and r["method"] == activations["calib_method"]]
    params = {r["tensor"]: activation_params(*r["range"], 8, opts.activations.symmetric) for r in rows}
    return joint_fidelity(p, session, sens.costs, cand, params, {r["tensor"]: r["delta_loss"] for r in rows},
                          opts.allocation.fidelity_samples, opts.run.seed)


def allocate(p: Prepared, opts: QuantizeOptions, budget: Budget, timer: Timer
             ) -> tuple[dict[str, WeightFormat], dict[str, QuantizedWeight] | None, dict[str, Any], ProbeSession]:
    """Mixed-precision stages: candidate formats, then probes, exact solve, closed loop, Pareto front, fidelity.

    Returns (format per weight, the quantized weights to emit, the report, the probe session).
    The weights are the candidates' own codes; None where the emitted ones must be quantized
    afresh (``--sequential`` rounding, or the ``uniform`` allocator, which quantizes no candidates).
    Weights the solver keeps float (an option under a latency budget, :mod:`.float_option`) are in
    neither: they stay as they are.
    """
    a = opts.allocation
    with timer.stage("allocate"):
        session, info = probe_session(p, opts)
    probed = a.allocator != "uniform"
    with timer.stage("candidates"):
        cand = candidates(p, opts, quadratic=probed and info["probes_extrapolated"], prepare=probed)
    try:
        lb = None
        if a.max_latency_ms is not None or a.max_latency_ratio is not None:
            with timer.stage("latency costs"):
                lb = LatencyBudget(p, opts, cand)
        with timer.stage("allocate"):
            formats, report = _allocate(p, opts, budget, session, info, cand, lb)
        reuse = probed and not opts.weight_rounding.sequential
        qweights = {w.name: cand.quantize(i, cand.formats.index(formats[w.name]))
                    for i, w in enumerate(p.weights) if w.name in formats} if reuse else None
        return formats, qweights, report, session
    finally:
        cand.close()


def _allocate(p: Prepared, opts: QuantizeOptions, budget: Budget, session: ProbeSession, info: dict[str, Any],
              cand: Candidates, lb: LatencyBudget | None) -> tuple[dict[str, WeightFormat], dict[str, Any]]:
    """(format per quantized weight, the report): weights kept float are left out of the formats."""
    a = opts.allocation
    runs0, t0 = session.runs, time.perf_counter()
    sens = None if a.allocator == "uniform" else sensitivities(p, opts, session, cand, a.allocator, info)
    probe_seconds = time.perf_counter() - t0
    solved: Candidates | WithFloat = cand
    if lb is not None and sens is not None:   # float is a format too: the fastest form of some layers
        solved = lb.cand
        sens = solved.sensitivity(sens)
    report: dict[str, Any] = {"allocator": a.allocator, "budget": budget.describe(), **info,
                              "formats": [f.label for f in solved.formats],
                              "unexercised_weights": dict(p.unexercised)}
    total_params = sum(w.size for w in p.weights)

    def choose(limits: list[Limit]) -> tuple[Solution, list, np.ndarray | None]:
        if budget.max_loss is not None and sens is not None:
            return (*closed_loop_loss_budget(session, sens, solved, budget, limits=limits), None)
        if a.allocator == "cet" and sens is not None and a.refine_rounds > 0:
            solve(sens, solved, budget, session.base_loss, limits)  # a clear error when the budget is infeasible
            return refine_size_budget(session, sens, solved, budget.size_bytes(total_params), a.refine_rounds,
                                      limits=limits)
        return solve(sens, solved, budget, session.base_loss, limits), [], None

    sol, history, corrected = lb.closed_loop(choose) if lb is not None else choose([])
    limits = [lb.limit] if lb is not None else []
    report.update({
        "predicted_loss": None if sens is None else session.base_loss + sol.cost,
        "predicted_bytes": sol.size,
        "closed_loop": history,
        "probe_runs": session.runs - runs0,
        "sensitivity_runs": None if sens is None else sens.runs,   # of probe_runs: the sensitivities alone
        "probe_seconds": round(probe_seconds, 3),
        "forward_passes_per_second": round((session.runs - runs0) / (time.perf_counter() - t0), 2),
    })
    if lb is not None:
        report["latency_budget"] = lb.finish(sol)
    if sens is not None:
        report["per_weight_predicted"] = {w.name: float(sens.costs[i, sol.choice[i]]) for i, w in enumerate(p.weights)}
        def point(s: Solution) -> dict[str, Any]:
            return {"bytes": s.size, "predicted_loss": session.base_loss + s.cost, "avg_bits": 8 * s.size / total_params,
                    **({"predicted_latency_ms": lb.predict(s.choice)} if lb is not None else {})}

        report["pareto_front"] = [point(s) for s in pareto_front(sens.costs, solved.sizes, a.pareto_points, limits)]
        if lb is not None:   # the latency axis: the front without the latency row, each point's predicted ms
            report["pareto_front_without_latency_budget"] = [point(s) for s in pareto_front(sens.costs, solved.sizes,
                                                                                           a.pareto_points)]
        if a.fidelity_samples:
            report["fidelity"] = fidelity(session, sens, solved, a.fidelity_samples, opts.run.seed, corrected)
    formats = {w.name: solved.formats[int(sol.choice[i])] for i, w in enumerate(p.weights)}
    report["kept_float"] = {name: WHY_FLOAT for name, f in formats.items() if is_float(f)}
    return {name: f for name, f in formats.items() if not is_float(f)}, report


def measured_loss(session: ProbeSession, qweights: dict[str, QuantizedWeight]) -> float:
    """The loss of exactly the weights that are emitted (sequential rounding included)."""
    return session.assignment_loss(qweights)
