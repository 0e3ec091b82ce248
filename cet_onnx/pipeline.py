"""The quantize pipeline: options → load → data → calibrate → rounding → allocate → quantize → rewrite → verify → report → save.

Each stage is a call into the module that owns it; this module only calls them in order and
times them. Options are validated before any work, and nothing is written until every stage
succeeded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cet_onnx import __version__
from cet_onnx.allocation.activation_plan import plan_activations
from cet_onnx.allocation import static_trial
from cet_onnx.allocation.activation_probes import activation_sensitivities
from cet_onnx.allocation.stage import allocate, measured_loss, probe_session, sensitivity_report
from cet_onnx.calibration.data import samples_split
from cet_onnx.calibration.branches import unexercised_weights
from cet_onnx.calibration.observe import calibrate
from cet_onnx.calibration.samples import read_samples
from cet_onnx.graph.act_mode import choose_act_mode
from cet_onnx.graph.rewriter import transformer_rules
from cet_onnx.kernels import inspect_kernels
from cet_onnx.latency import compare_latency
from cet_onnx.emit import check, check_output_path, declare_inputs, emit, save
from cet_onnx.load import load_graph, load_weights
from cet_onnx.options import QuantizeOptions, validate
from cet_onnx.prepared import Prepared
from cet_onnx.report import add_file_sizes, build_report, check_gates, pareto_files, report_bytes, report_path, \
    weight_rows
from cet_onnx.graph.integer_kernels import integer_kernel_weights
from cet_onnx.rounding.plan import choose_format, ensure_hessians, plan_rounding, quantize_all
from cet_onnx.runner import select_providers
from cet_onnx.tensor_errors import activation_errors, weight_errors
from cet_onnx.timer import Timer
from cet_onnx.verify import verify

__all__ = ["Prepared", "QuantizeOptions", "analyze", "prepare", "quantize", "report_path"]


def prepare(model_path: str | os.PathLike, calib: str | None, opts: QuantizeOptions, mixed: bool = False) -> Prepared:
    """Load, read data, find weights, calibrate activations and (for major-axis rounding) collect Hessians.

    ``mixed``: the formats will be chosen from ``opts.allocation.bits`` rather than ``opts.weights.bits``.
    """
    validate(opts)
    timer = Timer()
    providers = select_providers(opts.run.device)
    with timer.stage("load"):
        model, inputs, fixed = load_graph(model_path, opts.run.simplify, opts.activations.requested_mode == "none",
                                          dict(opts.run.fix_inputs))
    act_mode, act_mode_why = choose_act_mode(opts.activations.requested_mode, model.graph)
    if act_mode == "static" and transformer_rules(model.graph):
        act_mode_why += ("; a transformer graph: only weight MatMul / Gemm inputs are quantized, LayerNorm, "
                         "Softmax, GELU and residual Add inputs stay float")
    with timer.stage("data"):
        data = read_samples(calib, inputs, opts.data, opts.run.seed, fixed)
    weights, skipped, values = load_weights(model, model_path)
    act_params, left_float = None, {}
    if act_mode == "static":
        with timer.stage("calibrate"):
            act_params, left_float = calibrate(model, opts.activations, data.calib_batches, providers)
    if not opts.weights.int8_full_range:
        integer = integer_kernel_weights(model.graph, weights, act_mode, act_params or {})
        for w in weights:
            w.integer_kernel = w.name in integer
    p = Prepared(model, inputs, weights, skipped, values, data.calib_samples, data.verify_samples, data.batch_size,
                 data.calib_batches, data.verify_batches, act_params, providers, data.labels, timer,
                 float_activations=left_float, act_mode=act_mode, act_mode_why=act_mode_why, fixed_inputs=fixed)
    if mixed:
        p.unexercised = unexercised_weights(model, weights, data.calib_batches, providers)
    plan_rounding(p, opts, calib, mixed)
    return p


def add_speed(report: dict[str, Any], p: Prepared, emitted: Any, opts: QuantizeOptions, timer: Timer) -> None:
    """The kernels onnxruntime runs for the emitted model and its latency against the float model
    (``--latency-batch``; both skipped for a model whose weights stay on disk, which would be held twice)."""
    if emitted.large:
        why = "not measured: the model is too large to hold twice (its weights stay on disk)"
        report["kernels"] = report["latency"] = {"skipped": why}
        return
    with timer.stage("kernels"):
        report["kernels"] = inspect_kernels(emitted.model, p.providers).as_dict()
    batches = p.verify_batches or p.calib_batches
    if opts.run.latency_batch and batches:
        with timer.stage("latency"):
            report["latency"] = compare_latency(p.model, emitted.model, batches, p.providers,
                                                opts.run.latency_batch, opts.run.latency_threads, p.inputs)
    else:
        report["latency"] = {"skipped": "--latency-batch 0" if batches else "no data to run on"}


def add_tensor_errors(report: dict[str, Any], p: Prepared, emitted: Any, timer: Timer) -> None:
    """Per-tensor SQNR against the float model (:mod:`cet_onnx.tensor_errors`) on the held-out batches
    (the calibration batches without any); activations skipped for a model whose weights stay on disk."""
    weights = weight_errors(report["weights"])
    if emitted.large:
        report["tensor_errors"] = {"activations": "not measured: the model is too large to hold twice",
                                   "tensors": weights}
        return
    batches = p.verify_batches or p.calib_batches
    with timer.stage("tensor errors"):
        acts = activation_errors(p.model, emitted.model, p.weights, batches, p.providers,
                                 splittable=samples_split(p.inputs))
    report["tensor_errors"] = {"batches": "verify" if p.verify_batches else "calibration",
                               "tensors": acts + weights}


def analyze(model_path: str | os.PathLike, calib: str | None, opts: QuantizeOptions,
            allocators: tuple[str, ...] = ("cet",), activations: bool = False,
            compare_methods: tuple[str, ...] = (), joint: bool = False) -> dict[str, Any]:
    """Run the probes only: per weight and format, first-order and curvature terms and predicted ΔL;
    with ``activations``, per activation quantizer and precision instead (:mod:`.allocation.activation_probes`);
    with ``joint`` too, both, and the fidelity of their sum on random assignments of both kinds
    (:mod:`.allocation.joint_fidelity`)."""
    t0 = time.perf_counter()
    p = prepare(model_path, calib, opts, mixed=True)
    header = {"tool": f"cet-onnx {__version__}", "model": str(model_path)}
    if activations:
        with p.timer.stage("activation probes"):
            session, info = probe_session(p, opts)
            runs0, t1 = session.runs, time.perf_counter()
            acts = activation_sensitivities(p, session, opts.activations.method, opts.activations.symmetric,
                                            fidelity_samples=opts.allocation.fidelity_samples, seed=opts.run.seed,
                                            compare=compare_methods)
        result = {**header, **info, "activations": acts, "probe_runs": session.runs - runs0,
                  "probe_seconds": round(time.perf_counter() - t1, 3)}
        if joint:
            weights = sensitivity_report(p, opts, ("cet",), {}, activations=acts)
            result["joint_fidelity"] = weights.pop("joint_fidelity", None)
            result["weights"] = weights
    else:
        result = sensitivity_report(p, opts, allocators, header)
    result["timings_s"] = {**p.timer.stages, "total": round(time.perf_counter() - t0, 3)}
    return result


def quantize(model_path: str | os.PathLike, out_path: str | os.PathLike, calib: str | None,
             opts: QuantizeOptions, min_sqnr: float | None = None,
             min_agreement: float | None = None, prepared: Prepared | None = None,
             max_latency_ratio: float | None = None) -> dict[str, Any]:
    """Quantize ``model_path`` into ``out_path`` and return the report (also saved beside it).

    ``prepared`` (from :func:`prepare` with the same model, data and activation / rounding
    options) skips loading, calibration and Hessians — for benchmarks that try many budgets.
    """
    t_start = time.perf_counter()
    out_path = Path(out_path)
    check_output_path(model_path, out_path)
    validate(opts)
    budget = opts.budget
    p = prepared or prepare(model_path, calib, opts, mixed=budget is not None)
    timer = p.timer if prepared is None else Timer()
    allocation = qweights = None
    if budget is not None:
        ensure_hessians(p, opts, timer)  # a ``prepared`` made for a uniform run defers them
        formats, qweights, allocation, session = allocate(p, opts, budget, timer)
    else:
        formats = {w.name: choose_format(w, opts.weights) for w in p.weights}
        if static_trial.applies(p, opts):
            qweights = static_trial.try_static(p, opts, formats, timer)
    if qweights is None:
        qweights = quantize_all(p, opts, formats, timer)
    if allocation is not None:
        with timer.stage("measure"):
            allocation["measured_loss"] = measured_loss(session, qweights)
        del session  # its onnxruntime session holds the float weights
    with timer.stage("activation plan"):
        act_plan = plan_activations(p, opts, qweights)
        qweights.update(act_plan.full_range)
        for w in p.weights:
            w.integer_kernel = w.integer_kernel and w.name not in act_plan.full_range
    with timer.stage("rewrite"):
        emitted = emit(p, qweights, model_path, opts.run.emit_contrib, act_plan.params, opts.run.widen_low_bit)
        rows = weight_rows(p.weights, qweights, allocation, p.values)
        del qweights  # the codes now live in the emitted model; keep one copy while checking and verifying
        check(emitted)
    with timer.stage("verify"):
        verification = verify(p.model, emitted.model, p.verify_batches, p.providers, p.verify_labels())
    report = build_report(model_path, out_path, calib, opts, p, emitted.rewritten, emitted.model, rows,
                          verification, allocation, timer.stages.get("hessians", 0.0))
    report["activation_precision"] = act_plan.report
    report["activations_left_float"].update(act_plan.left_float)
    add_tensor_errors(report, p, emitted, timer)
    add_speed(report, p, emitted, opts, timer)
    check_gates(report, min_sqnr, min_agreement, max_latency_ratio)
    extra = pareto_files(report, model_path, out_path)
    report["timings_s"] = {**timer.stages, "total": round(time.perf_counter() - t_start, 4)}
    report["peak_rss_mb"] = dict(timer.peak_mb)
    extra[report_path(out_path).name] = report_bytes(report, opts.run.reproducible)
    if opts.run.keep_fixed_inputs:
        declare_inputs(emitted.model, [inp for inp, _ in p.fixed_inputs.values()])
    save(emitted, out_path, extra)
    add_file_sizes(report, model_path, out_path)
    return report
