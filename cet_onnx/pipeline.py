"""The quantize pipeline: model → calibration → curvature → solver → rewrite → verify → save.

Each stage is a call into a module with one job; this module only wires them together,
times them and assembles the report. Nothing is written until every stage succeeded.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cet_onnx import __version__
from cet_onnx.allocation import cache as probe_cache
from cet_onnx.allocation.allocate import (ALLOCATORS, Budget, Candidates, Sensitivity, candidate_formats, closed_loop_loss_budget,
                       refine_size_budget,
                       fidelity, measure_cet, measure_hawq, measure_sqnr, solve)
from cet_onnx.calibration.data import ImageOptions, ModelInput, batched, load_samples, model_inputs
from cet_onnx.graph.split_hardswish import decompose_hardswish
from cet_onnx.errors import InputError, RuntimeFailure
from cet_onnx.allocation.losses import LOSSES, default_loss
from cet_onnx.io import external_data
from cet_onnx.io.external_data import LazyValues, external_nbytes, external_tensors, load_into
from cet_onnx.io.model_files import data_dir as external_dir, fits_protobuf, initializer_map, model_file_bytes, prepare_model, \
    save_model, to_array, warn
from cet_onnx.allocation.probes import ProbeSession
from cet_onnx.rounding.gptq import major_axis_rounding
from cet_onnx.rounding.hessian import collect_hessians, hessian_nbytes, layer_spec
from cet_onnx.plot import pareto_path, pareto_png
from cet_onnx.progress import track
from cet_onnx.allocation.probes import probe_model
from cet_onnx.quant.quantizer import (ActivationParams, QuantizedWeight, RoundingPlan, WeightFormat, activation_params, clip_for,
                        grid_symmetric, quantize_weight)
from cet_onnx.graph.rewriter import ACTIVATION_OPS, activation_tensors, rewrite
from cet_onnx.runner import collect_ranges, concat_outputs, make_session, run_batches, select_providers
from cet_onnx.allocation.solver import pareto_front
from cet_onnx.verify import accuracy, compare_outputs
from cet_onnx.graph.weights import WeightInfo, find_weights, subgraph_weights


@dataclass
class QuantizeOptions:
    """Every knob of ``cet-onnx quantize`` / ``analyze`` (the CLI maps its flags onto these)."""

    weight_bits: int = 8
    per_tensor: bool = False
    block_size: int | None = None
    act_bits: int = 8
    weight_only: bool = False
    act_symmetric: bool = False
    calib_method: str = "minmax"
    percentile: float = 99.999
    simplify: bool = True
    device: str = "auto"
    batch_size: int = 16
    calib_size: int | None = None
    verify_size: int = 64
    seed: int = 0
    image: ImageOptions | None = None
    weight_clip: str = "auto"
    weight_grid: str = "auto"
    rounding: str = "auto"          # auto | rtn | major-axis (auto: major-axis when --calib is given)
    sequential: bool = False
    hessian_rows: int = 8192
    # mixed precision (used when a budget is set)
    allocator: str = "cet"
    avg_bits: float | None = None
    max_size_mb: float | None = None
    max_loss: float | None = None
    bits: tuple[int, ...] = (2, 4, 8)
    candidate_block: int | None = 32
    loss: str | None = None
    loss_output: str | None = None
    labels: str | None = None
    probe_size: int = 128
    hutchinson_samples: int = 4
    fidelity_samples: int = 12
    pareto_points: int = 12
    cache_dir: str | None = None
    use_cache: bool = True
    refine_rounds: int = 3
    probe_numerics: str = "float"   # float | deployed: activations in the probes (see README "Probe numerics")
    reproducible: bool = False      # leave wall-clock fields out of the report (byte-identical reruns)

    @property
    def budget(self) -> Budget | None:
        set_ = [v is not None for v in (self.avg_bits, self.max_size_mb, self.max_loss)]
        if sum(set_) > 1:
            raise InputError("give only one of --avg-bits, --max-size and --max-loss")
        if not any(set_):
            return None
        return Budget(self.avg_bits, None if self.max_size_mb is None else self.max_size_mb * 1e6, self.max_loss)


class Timer:
    """Wall time of each named stage."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def stage(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.stages[name] = round(timer.stages.get(name, 0.0) + time.perf_counter() - self.t0, 4)
                return False
        return _Ctx()


def report_path(out: str | os.PathLike) -> Path:
    """``model.onnx`` → ``model.report.json`` beside it."""
    out = Path(out)
    stem = out.name[:-5] if out.name.endswith(".onnx") else out.name
    return out.with_name(stem + ".report.json")


def effective_batch_size(inputs: list[ModelInput], requested: int) -> int:
    """The requested batch size, unless an input fixes its first dimension."""
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


def choose_format(w: WeightInfo, opts: QuantizeOptions) -> WeightFormat:
    """The uniform format for one weight: per-tensor, per-channel, or block-wise where it fits."""
    sym = grid_symmetric(opts.weight_bits, opts.weight_grid)
    if opts.per_tensor:
        return WeightFormat(opts.weight_bits, "tensor", symmetric=sym)
    if opts.block_size and w.shape[w.reduction_axis] >= opts.block_size:
        return WeightFormat(opts.weight_bits, "block", opts.block_size, symmetric=sym)
    return WeightFormat(opts.weight_bits, "channel", symmetric=sym)


def quantize_weights(values: dict[str, np.ndarray], weights: list[WeightInfo], formats: dict[str, WeightFormat],
                     clip: str = "auto", roundings: RoundingPlan | None = None) -> dict[str, QuantizedWeight]:
    """Round every weight to its format (with the rounding ``roundings`` plans, else round-to-nearest)."""
    roundings = roundings or RoundingPlan()
    return {w.name: quantize_weight(values[w.name], formats[w.name], w.channel_axis, w.reduction_axis,
                                    rounding=roundings.get(w.name, formats[w.name]),
                                    clip_ratio=clip_for(formats[w.name], clip))
            for w in weights}


def load_labels(path: str, count: int, truncated: bool = False) -> np.ndarray:
    """Integer labels from ``.npy``, checked to line up with ``count`` samples.

    With ``truncated`` (the data was cut to its first ``count`` samples) the labels may be longer
    and are cut the same way.
    """
    try:
        labels = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"labels '{path}': cannot read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if labels.dtype.kind not in "iu" or labels.ndim < 1:
        raise InputError(f"labels '{path}': expected integer class labels, got dtype {labels.dtype} shape {list(labels.shape)}")
    if labels.shape[0] != count and not (truncated and labels.shape[0] > count):
        raise InputError(f"labels '{path}': {labels.shape[0]} labels for {count} samples")
    return labels[:count]


@dataclass
class Prepared:
    """Everything the stages after calibration need."""

    model: onnx.ModelProto
    inputs: list[ModelInput]
    weights: list[WeightInfo]
    skipped: dict[str, str]
    values: dict[str, np.ndarray]
    calib_samples: list
    verify_samples: list
    batch_size: int
    calib_batches: list
    verify_batches: list
    act_params: dict[str, ActivationParams] | None
    providers: list[str]
    labels: np.ndarray | None
    timer: Timer = field(default_factory=Timer)
    rounding: str = "rtn"
    roundings: RoundingPlan = field(default_factory=RoundingPlan)
    rtn_fallback: dict = field(default_factory=dict)     # weight → why it keeps round-to-nearest
    specs: dict = field(default_factory=dict)            # weight → LayerSpec
    data_dir: str | None = None                          # where the weights stay on disk (large models)
    hessians_deferred: bool = False                      # major-axis Hessians are collected while quantizing


def prepare(model_path: str | os.PathLike, calib: str | None, opts: QuantizeOptions, mixed: bool = False) -> Prepared:
    """Load, read data, find weights, calibrate activations and (for major-axis rounding) collect Hessians.

    ``mixed``: the formats will be chosen from ``opts.bits`` rather than ``opts.weight_bits``.
    """
    timer = Timer()
    providers = select_providers(opts.device)
    if opts.loss is not None and opts.loss not in LOSSES:
        raise InputError(f"--loss must be one of {', '.join(LOSSES)}, got '{opts.loss}'")
    if opts.loss == "ce" and not opts.labels:
        raise InputError("--loss ce needs --labels")
    if opts.allocator not in ALLOCATORS:
        raise InputError(f"--allocator must be one of {', '.join(ALLOCATORS)}, got '{opts.allocator}'")
    with timer.stage("load"):
        model = prepare_model(model_path, opts.simplify)
        if not opts.weight_only and decompose_hardswish(model):
            model = onnx.shape_inference.infer_shapes(model)
        inputs = model_inputs(model)
    with timer.stage("data"):
        limit = opts.calib_size + opts.verify_size if opts.calib_size else None
        samples = load_samples(calib, inputs, limit=limit, image=opts.image, seed=opts.seed)
        labels = load_labels(opts.labels, len(samples), truncated=limit is not None) if opts.labels else None
        calib_samples, verify_samples = split_samples(samples, opts.verify_size)
        bs = effective_batch_size(inputs, opts.batch_size)
        calib_batches = batched(calib_samples, bs, inputs=inputs)
        verify_batches = batched(verify_samples, bs, inputs=inputs)
    weights, skipped = find_weights(model)
    if not weights:
        raise InputError(f"{model_path}: no quantizable weights (Conv, ConvTranspose, Gemm or MatMul "
                         "with a float initializer weight)")
    for name in subgraph_weights(model):
        skipped[name] = "inside an If/Loop/Scan subgraph (only main-graph weights are quantized)"
    for name, why in skipped.items():
        warn(f"weight '{name}' left in float: {why}")
    inits = initializer_map(model)
    ddir = external_dir(model, model_path)
    if ddir is None:
        values = {w.name: to_array(inits[w.name]).astype(np.float32) for w in weights}
    else:
        values = LazyValues({w.name: inits[w.name] for w in weights}, ddir)
    act_params = None
    if not opts.weight_only:
        with timer.stage("calibrate"):
            tensors = activation_tensors(model, remove_relus=not opts.act_symmetric)
            ranges = collect_ranges(model, tensors, calib_batches, providers, opts.calib_method,
                                    symmetric=opts.act_symmetric, num_bits=opts.act_bits, percentile=opts.percentile,
                                    data_dir=ddir)
            act_params = {t: activation_params(lo, hi, opts.act_bits, opts.act_symmetric) for t, (lo, hi) in ranges.items()}
    p = Prepared(model, inputs, weights, skipped, values, calib_samples, verify_samples, bs, calib_batches,
                 verify_batches, act_params, providers, labels, timer, data_dir=ddir)
    low_bits = min(opts.bits) <= 4 if mixed else opts.weight_bits <= 4
    p.rounding, p.roundings.max_bits = resolve_rounding(opts.rounding, calib, low_bits)
    if p.rounding == "major-axis":
        with timer.stage("hessians"):
            layer_specs(p)
            # Probes need every layer's rounding at once; a uniform run can take the layers
            # chunk by chunk when their Hessians are large (quantize() then collects them).
            p.hessians_deferred = not mixed and (opts.sequential or sum(
                hessian_nbytes(w, p.specs[w.name]) for w in p.weights if w.name in p.specs) > hessian_budget(p.weights))
            if not p.hessians_deferred:
                prepare_major_axis(p, opts)
    return p


def resolve_rounding(rounding: str, calib: str | None, low_bits: bool) -> tuple[str, int]:
    """(method, widest bit-width it applies to).

    ``auto`` is major-axis rounding for formats of 4 bits and below when real calibration data
    is given and such formats can be chosen (at 8 bits it costs time and gains nothing
    measurable), round-to-nearest otherwise; an explicit ``major-axis`` applies to every width.
    """
    if rounding not in ("auto", "rtn", "major-axis"):
        raise InputError(f"--rounding must be auto, rtn or major-axis, got '{rounding}'")
    if rounding == "auto":
        return ("major-axis", 4) if calib and low_bits else ("rtn", 8)
    return rounding, 8


#: Major-axis rounding of a uniform format collects at most half the float32 weight bytes of layer
#: Hessians per pass over the calibration data, clamped to [HESSIAN_MIN_BYTES, HESSIAN_BYTES]
#: (and at least one layer); larger models take several passes.
HESSIAN_BYTES = 2**29
HESSIAN_MIN_BYTES = 2**28


def hessian_budget(weights: list[WeightInfo]) -> int:
    """Bytes of layer Hessians one pass may collect (see :data:`HESSIAN_BYTES`)."""
    return int(min(HESSIAN_BYTES, max(HESSIAN_MIN_BYTES, 2 * sum(w.size for w in weights))))


def layer_specs(p: Prepared) -> None:
    """Fill ``p.specs`` (how each weight meets its input) and ``p.rtn_fallback`` (why a weight has no Hessian)."""
    missing = [w for w in p.weights if w.name not in p.specs and w.name not in p.rtn_fallback]
    if not missing:
        return
    probe = probe_model(p.model, p.weights, p.act_params)
    for w in missing:
        spec, why = layer_spec(probe, w)
        if spec is None:
            p.rtn_fallback[w.name] = why
        else:
            p.specs[w.name] = spec


def prepare_major_axis(p: Prepared, opts: QuantizeOptions, weight_feeds: dict | None = None,
                       only: list[WeightInfo] | None = None) -> None:
    """Collect layer Hessians (deployed activation numerics) and build each weight's GPTQ rounding.

    ``weight_feeds`` replaces some weights (already quantized ones, for a sequential pass); the
    others stay initializers, which onnxruntime holds once (fed as inputs, they would be copied).
    """
    layer_specs(p)
    feeds = weight_feeds or {}
    probe = probe_model(p.model, [w for w in p.weights if w.name in feeds], p.act_params)
    specs = [p.specs[w.name] for w in (only or p.weights) if w.name in p.specs]
    desc = "layer Hessians"
    if only is not None and specs:
        desc = f"layer Hessians ({specs[0].name}{f' + {len(specs) - 1} more' if len(specs) > 1 else ''})"
    hess = collect_hessians(probe, specs, p.calib_batches, feeds, p.providers,
                            opts.hessian_rows, opts.seed, desc=desc, data_dir=p.data_dir)
    for w in only or p.weights:
        if w.name in hess:
            p.roundings.roundings[w.name] = major_axis_rounding(w, p.specs[w.name], hess[w.name])


def hessian_chunks(p: Prepared, budget: int) -> list[list[WeightInfo]]:
    """Consecutive weights whose Hessians together stay within ``budget`` bytes (at least one per chunk)."""
    chunks: list[list[WeightInfo]] = [[]]
    used = 0
    for w in p.weights:
        size = hessian_nbytes(w, p.specs[w.name]) if w.name in p.specs else 0
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(w)
        used += size
    return chunks


def chunked_quantize(p: Prepared, opts: QuantizeOptions, formats: dict[str, WeightFormat],
                     timer: Timer) -> dict[str, QuantizedWeight]:
    """Major-axis rounding in bounded memory: per chunk of layers one pass collects their Hessians,
    the chunk is quantized, and its Hessians are dropped before the next chunk."""
    out: dict[str, QuantizedWeight] = {}
    for chunk in track(hessian_chunks(p, hessian_budget(p.weights)), desc="major-axis rounding in chunks", unit="chunk"):
        with timer.stage("hessians"):
            prepare_major_axis(p, opts, only=chunk)
        with timer.stage("quantize_weights"):
            out.update(quantize_weights(p.values, chunk, formats, opts.weight_clip, p.roundings))
        for w in chunk:
            p.roundings.roundings.pop(w.name, None)
    return out


def sequential_quantize(p: Prepared, opts: QuantizeOptions, formats: dict[str, WeightFormat]) -> dict[str, QuantizedWeight]:
    """Quantize in graph order, each layer's Hessian taken with every earlier weight already quantized."""
    feeds: dict[str, np.ndarray] = {}
    out: dict[str, QuantizedWeight] = {}
    for w in p.weights:
        if w.name in p.specs:
            prepare_major_axis(p, opts, weight_feeds=feeds, only=[w])
        qw = quantize_weights(p.values, [w], {w.name: formats[w.name]}, opts.weight_clip, p.roundings)[w.name]
        out[w.name] = qw
        feeds[w.name] = qw.dequantize()
        p.roundings.roundings.pop(w.name, None)  # its Hessian factor is not needed again
    return out


def _loss_output(model: onnx.ModelProto, requested: str | None) -> str:
    outputs = [o.name for o in model.graph.output]
    if requested is not None:
        if requested not in outputs:
            raise InputError(f"--loss-output '{requested}' is not a model output (outputs: {', '.join(outputs)})")
        return requested
    floats = [o.name for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if not floats:
        raise InputError("the model has no float output to measure a loss on; choose one with --loss-output")
    return floats[0]


def probe_session(p: Prepared, opts: QuantizeOptions) -> tuple[ProbeSession, dict[str, Any]]:
    """The long-lived probe session on the first ``--probe-size`` calibration samples."""
    n = min(opts.probe_size, len(p.calib_samples))
    batches = batched(p.calib_samples[:n], p.batch_size, inputs=p.inputs)
    n = sum(next(iter(b.values())).shape[0] for b in batches)
    labels = p.labels[:n] if p.labels is not None else None
    out = _loss_output(p.model, opts.loss_output)
    ref_probe = make_session(p.model, p.providers, data_dir=p.data_dir)
    sample = ref_probe.run([out], batches[0])[0]
    del ref_probe
    loss = opts.loss or default_loss(sample, labels is not None)
    if loss == "ce" and labels is None:
        raise InputError("--loss ce needs --labels")
    if opts.probe_numerics not in ("float", "deployed"):
        raise InputError(f"--probe-numerics must be float or deployed, got '{opts.probe_numerics}'")
    acts = p.act_params if opts.probe_numerics == "deployed" else None
    session = ProbeSession(p.model, p.weights, p.values, acts, batches, p.providers, loss, out, labels,
                           data_dir=p.data_dir)
    info = {"loss": loss, "loss_output": out, "probe_samples": n, "base_loss": session.base_loss,
            "device": session.device, "probe_numerics": opts.probe_numerics}
    return session, info


def sensitivities(p: Prepared, opts: QuantizeOptions, session: ProbeSession, cand: Candidates,
                  allocator: str, probe_info: dict[str, Any]) -> Sensitivity:
    """Probe results for ``allocator``, from the cache when the same model, data and settings were probed."""
    settings = {"allocator": allocator, "formats": [f.label for f in cand.formats], "loss": probe_info["loss"],
                "loss_output": probe_info["loss_output"], "act": None if p.act_params is None else
                [opts.act_bits, opts.act_symmetric, opts.calib_method, opts.percentile],
                "hutchinson": opts.hutchinson_samples if allocator == "hawq" else None,
                "rounding": [p.rounding, p.roundings.max_bits],
                "hessian_rows": opts.hessian_rows if p.rounding == "major-axis" else None,
                "clip": opts.weight_clip, "grid": opts.weight_grid, "numerics": opts.probe_numerics,
                "version": __version__}
    cache_dir = Path(opts.cache_dir) if opts.cache_dir else probe_cache.default_dir()
    key = probe_cache.cache_key(p.model, session.batches, settings, session.labels, p.data_dir)
    if opts.use_cache:
        entry = probe_cache.load(cache_dir, key)
        if entry is not None:
            return Sensitivity(allocator, np.array(entry["costs"], dtype=np.float64), entry["details"],
                               0, 0.0)
    if allocator == "cet":
        sens = measure_cet(session, cand)
    elif allocator == "hawq":
        sens = measure_hawq(session, cand, opts.hutchinson_samples, opts.seed)
    else:
        sens = measure_sqnr(session, cand)
    if opts.use_cache:
        probe_cache.store(cache_dir, key, {"costs": sens.costs.tolist(), "details": sens.details})
    return sens


def _sensitivity_table(cand: Candidates, sens: Sensitivity) -> list[dict[str, Any]]:
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


def analyze(model_path: str | os.PathLike, calib: str | None, opts: QuantizeOptions,
            allocators: tuple[str, ...] = ("cet",)) -> dict[str, Any]:
    """Run the probes only: per weight and format, first-order and curvature terms and predicted ΔL."""
    t0 = time.perf_counter()
    p = prepare(model_path, calib, opts, mixed=True)
    with p.timer.stage("probe"):
        session, info = probe_session(p, opts)
        cand = Candidates(p.weights, candidate_formats(opts.bits, opts.candidate_block, opts.weight_grid), p.values,
                      opts.weight_clip, p.roundings)
        result: dict[str, Any] = {"tool": f"cet-onnx {__version__}", "model": str(model_path), **info,
                                  "formats": [f.label for f in cand.formats]}
        runs0 = session.runs
        tp = time.perf_counter()
        for allocator in allocators:
            sens = sensitivities(p, opts, session, cand, allocator, info)
            result[allocator] = _sensitivity_table(cand, sens)
            if allocator == "cet":
                cet_sens = sens
        elapsed = time.perf_counter() - tp
        result["probe_runs"] = session.runs - runs0
        result["probe_seconds"] = round(elapsed, 3)
        result["forward_passes_per_second"] = round((session.runs - runs0) / elapsed, 2) if elapsed > 0 else None
    if "cet" in allocators and opts.fidelity_samples:
        with p.timer.stage("fidelity"):
            result["fidelity"] = fidelity(session, cet_sens, cand, opts.fidelity_samples, opts.seed)
    result["timings_s"] = {**p.timer.stages, "total": round(time.perf_counter() - t0, 3)}
    return result


def _allocate(p: Prepared, opts: QuantizeOptions,
              budget: Budget) -> tuple[dict[str, WeightFormat], dict[str, Any], ProbeSession]:
    """Mixed-precision stage: probes, exact solve, closed loop, Pareto front and fidelity."""
    session, info = probe_session(p, opts)
    cand = Candidates(p.weights, candidate_formats(opts.bits, opts.candidate_block, opts.weight_grid), p.values,
                      opts.weight_clip, p.roundings)
    runs0, t0 = session.runs, time.perf_counter()
    sens = None if opts.allocator == "uniform" else sensitivities(p, opts, session, cand, opts.allocator, info)
    probe_seconds = time.perf_counter() - t0
    report: dict[str, Any] = {"allocator": opts.allocator, "budget": budget.describe(), **info,
                              "formats": [f.label for f in cand.formats]}
    history: list = []
    if budget.max_loss is not None and sens is not None:
        sol, history = closed_loop_loss_budget(session, sens, cand, budget)
    elif opts.allocator == "cet" and sens is not None and opts.refine_rounds > 0:
        solve(sens, cand, budget, session.base_loss)  # a clear error when the budget is infeasible
        sol, history = refine_size_budget(session, sens, cand, budget.size_bytes(sum(w.size for w in p.weights)),
                                          opts.refine_rounds)
    else:
        sol = solve(sens, cand, budget, session.base_loss)
    report.update({
        "predicted_loss": None if sens is None else session.base_loss + sol.cost,
        "predicted_bytes": sol.size,
        "closed_loop": history,
        "probe_runs": session.runs - runs0,
        "probe_seconds": round(probe_seconds, 3),
        "forward_passes_per_second": round((session.runs - runs0) / (time.perf_counter() - t0), 2),
    })
    if sens is not None:
        report["per_weight_predicted"] = {w.name: float(sens.costs[i, sol.choice[i]]) for i, w in enumerate(p.weights)}
        front = pareto_front(sens.costs, cand.sizes, opts.pareto_points)
        report["pareto_front"] = [{"bytes": s.size, "predicted_loss": session.base_loss + s.cost,
                                   "avg_bits": 8 * s.size / sum(w.size for w in p.weights)} for s in front]
        if opts.fidelity_samples:
            report["fidelity"] = fidelity(session, sens, cand, opts.fidelity_samples, opts.seed)
    formats = {w.name: cand.formats[int(sol.choice[i])] for i, w in enumerate(p.weights)}
    return formats, report, session


def quantize(model_path: str | os.PathLike, out_path: str | os.PathLike, calib: str | None,
             opts: QuantizeOptions, min_sqnr: float | None = None,
             min_agreement: float | None = None, prepared: Prepared | None = None) -> dict[str, Any]:
    """Quantize ``model_path`` into ``out_path`` and return the report (also saved beside it).

    ``prepared`` (from :func:`prepare` with the same model, data and activation / rounding
    options) skips loading, calibration and Hessians — for benchmarks that try many budgets.
    """
    t_start = time.perf_counter()
    out_path = Path(out_path)
    if Path(model_path).resolve() == out_path.resolve():
        raise InputError(f"{out_path}: the output would overwrite the input model")
    if not out_path.parent.exists() and str(out_path.parent):
        raise InputError(f"{out_path}: output folder '{out_path.parent}' does not exist")
    budget = opts.budget
    p = prepared or prepare(model_path, calib, opts, mixed=budget is not None)
    timer = p.timer if prepared is None else Timer()
    allocation = None
    if budget is not None and p.hessians_deferred:  # ``prepared`` was made for a uniform run
        with timer.stage("hessians"):
            prepare_major_axis(p, opts)
        p.hessians_deferred = False
    if budget is not None:
        with timer.stage("allocate"):
            formats, allocation, session = _allocate(p, opts, budget)
    else:
        formats = {w.name: choose_format(w, opts) for w in p.weights}
    if p.rounding == "major-axis" and p.hessians_deferred and not opts.sequential:
        qweights = chunked_quantize(p, opts, formats, timer)
    else:
        with timer.stage("quantize_weights"):
            if opts.sequential and p.rounding == "major-axis":
                qweights = sequential_quantize(p, opts, formats)
            else:
                qweights = quantize_weights(p.values, p.weights, formats, opts.weight_clip, p.roundings)
    if allocation is not None:
        with timer.stage("measure"):
            # the loss of exactly the weights that are emitted (sequential rounding included)
            allocation["measured_loss"] = session.loss({n: q.dequantize() for n, q in qweights.items()})
        del session  # its onnxruntime session holds the float weights
    with timer.stage("rewrite"):
        result = rewrite(p.model, p.weights, qweights, p.act_params, source=str(model_path), data_dir=p.data_dir)
        qmodel = result.model
        # Unchanged initializers left on disk: small ones are copied into the output; large ones
        # (embedding tables, say) keep pointing at the input's files and are streamed into OUT.data.
        stream_from = None
        if p.data_dir is not None:
            if external_nbytes(external_tensors(qmodel)) >= external_data.STREAM_BYTES:
                stream_from = p.data_dir
            else:
                load_into(qmodel, p.data_dir)
        large_output = stream_from is not None or not fits_protobuf(qmodel)
        if not large_output:  # larger ones are checked from the written file, before it is renamed into place
            try:
                onnx.checker.check_model(qmodel, full_check=True)
            except Exception as exc:
                raise RuntimeFailure(f"the quantized model fails onnx.checker: {str(exc).strip().splitlines()[0]}") from None
    weight_rows = [
        {"name": w.name, "op": w.op_type, "shape": list(w.shape), "params": w.size,
         "bits": qweights[w.name].fmt.bits, "format": qweights[w.name].fmt.label,
         "bytes_fp32": 4 * w.size, "bytes": qweights[w.name].nbytes(),
         **({"predicted_delta_loss": allocation["per_weight_predicted"][w.name]}
            if allocation and "per_weight_predicted" in allocation else {})}
        for w in p.weights]
    del qweights  # the codes now live in qmodel; keep one copy while verifying
    with timer.stage("verify"):
        vlabels = p.labels[len(p.labels) - len(p.verify_samples):] if p.labels is not None and \
            p.verify_samples is not p.calib_samples else None
        verification = verify(p.model, qmodel, p.verify_batches, p.providers, vlabels, data_dir=p.data_dir,
                              q_data_dir=stream_from)

    total_params = int(sum(w.size for w in p.weights))
    fp32_bytes = 4 * total_params
    q_bytes = int(sum(row["bytes"] for row in weight_rows))
    report: dict[str, Any] = {
        "tool": f"cet-onnx {__version__}",
        "model": str(model_path),
        "output": str(out_path),
        "options": {k: v for k, v in asdict(opts).items() if k != "image"},
        "calibration": {"source": calib or "random", "calib_samples": len(p.calib_samples),
                        "verify_samples": len(p.verify_samples), "batch_size": p.batch_size,
                        "disjoint": p.verify_samples is not p.calib_samples},
        "opset": result.opset,
        "weights": weight_rows,
        "skipped_weights": p.skipped,
        "rounding": {"method": p.rounding, "up_to_bits": p.roundings.max_bits,
                     "sequential": bool(opts.sequential and p.rounding == "major-axis"),
                     "round_to_nearest_fallback": p.rtn_fallback,
                     "seconds": timer.stages.get("hessians", 0.0)},
        "quantized_biases": result.quantized_biases,
        "activation_tensors": len(p.act_params or {}),
        "float_ops": float_ops(qmodel),
        "totals": {
            "weight_params": total_params,
            "weight_bytes_fp32": fp32_bytes,
            "weight_bytes": q_bytes,
            "weight_compression": round(fp32_bytes / q_bytes, 4) if q_bytes else None,
            "avg_bits": round(8 * q_bytes / total_params, 4),
        },
        "verification": verification,
    }
    if allocation is not None:
        report["allocation"] = allocation
    gate_errors = []
    worst_sqnr = verification["min_sqnr_db"]
    if min_sqnr is not None and (worst_sqnr is None or worst_sqnr < min_sqnr):
        gate_errors.append(f"SQNR {worst_sqnr:.2f} dB < --verify-min-sqnr {min_sqnr}")
    agree = verification["min_top1_agreement"]
    if min_agreement is not None and (agree is None or agree < min_agreement):
        gate_errors.append(f"top-1 agreement {agree} < --verify-min-agreement {min_agreement}")
    report["verification"]["passed"] = not gate_errors
    if gate_errors:
        raise RuntimeFailure("verification failed: " + "; ".join(gate_errors) + " (nothing written)")
    extra: dict[str, bytes] = {}
    if allocation is not None and allocation.get("pareto_front"):
        chosen = {"avg_bits": report["totals"]["avg_bits"], "predicted_loss": allocation["predicted_loss"],
                  "measured_loss": allocation["measured_loss"]}
        png = pareto_png(allocation["pareto_front"], chosen, f"{Path(model_path).name}: {allocation['allocator']}, "
                                                           f"{allocation['budget']}")
        if png is None:
            allocation["pareto_png"] = "not drawn: matplotlib is not installed (pip install 'cet-onnx[plot]')"
        else:
            allocation["pareto_png"] = pareto_path(out_path).name
            extra[pareto_path(out_path).name] = png
    report["timings_s"] = {**timer.stages, "total": round(time.perf_counter() - t_start, 4)}
    text = json.dumps(strict_json(without_wall_clock(report) if opts.reproducible else report), indent=2)
    extra[report_path(out_path).name] = text.encode()
    save_model(qmodel, out_path, extra_files=extra, check=large_output, external_from=stream_from)
    report["totals"]["file_bytes_fp32"] = model_file_bytes(Path(model_path))
    report["totals"]["file_bytes"] = model_file_bytes(out_path)
    return report


def verify(model: onnx.ModelProto, qmodel: onnx.ModelProto, batches: list, providers,
           labels: np.ndarray | None = None, data_dir: str | None = None,
           q_data_dir: str | None = None) -> dict[str, Any]:
    """Run both models on held-out batches and compare every output.

    One session at a time, so a large model's float and quantized weights are never both
    held by onnxruntime. ``data_dir`` / ``q_data_dir``: where each model's external data is.
    """
    if not batches:
        return {"samples": 0, "outputs": [], "min_sqnr_db": None, "min_top1_agreement": None}
    ref_sess = make_session(model, providers, data_dir=data_dir)
    names = [o.name for o in ref_sess.get_outputs()]
    ref = concat_outputs(run_batches(ref_sess, batches, "verify: float model"))
    del ref_sess
    q_sess = make_session(qmodel, providers, data_dir=q_data_dir)
    test = concat_outputs(run_batches(q_sess, batches, "verify: quantized model", names))
    del q_sess
    metrics = compare_outputs(names, ref, test)
    sqnrs = [m.sqnr_db for m in metrics if not np.isnan(m.sqnr_db)]
    agrees = [m.top1_agreement for m in metrics if m.top1_agreement is not None]
    out: dict[str, Any] = {
        "samples": int(sum(next(iter(b.values())).shape[0] for b in batches)),
        "outputs": [m.as_dict() for m in metrics],
        "min_sqnr_db": min(sqnrs) if sqnrs else None,
        "min_top1_agreement": min(agrees) if agrees else None,
    }
    if labels is not None and ref and ref[0].shape[0] == len(labels):
        out["accuracy"] = {"fp32": accuracy(ref[0], labels), "quantized": accuracy(test[0], labels)}
    return out


WALL_CLOCK_KEYS = frozenset({"timings_s", "probe_seconds", "forward_passes_per_second", "seconds", "file_bytes",
                             "file_bytes_fp32", "probe_runs"})


def without_wall_clock(o: Any) -> Any:
    """The report without timings, throughput and work counts (which depend on the probe cache)."""
    if isinstance(o, dict):
        return {k: without_wall_clock(v) for k, v in o.items() if k not in WALL_CLOCK_KEYS}
    if isinstance(o, list):
        return [without_wall_clock(v) for v in o]
    return o


def float_ops(qmodel: onnx.ModelProto) -> dict[str, int]:
    """Op types of the emitted graph that run in float on dequantized data (not quantized by cet-onnx)."""
    counts: dict[str, int] = {}
    for n in qmodel.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type in ACTIVATION_OPS:
            continue
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def strict_json(o: Any) -> Any:
    """Plain JSON types; non-finite floats become strings."""
    if isinstance(o, dict):
        return {str(k): strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [strict_json(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        f = float(o)
        return f if np.isfinite(f) else ("inf" if f > 0 else "-inf" if f < 0 else "nan")
    if isinstance(o, Path):
        return str(o)
    return o
