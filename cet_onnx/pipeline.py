"""The quantize pipeline: model → calibration → weights → rewrite → verify → save.

Each stage is a call into a module with one job; this module only wires them together,
times them and assembles the report. Nothing is written until every stage succeeded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import __version__
from .calib_data import ImageOptions, ModelInput, batched, load_samples, model_inputs
from .errors import InputError, RuntimeFailure
from .model_io import initializer_map, model_file_bytes, prepare_model, save_model, to_array, warn
from .quantizer import QuantizedWeight, WeightFormat, activation_params, quantize_weight
from .rewriter import activation_tensors, rewrite
from .runner import collect_ranges, concat_outputs, make_session, run_batches, select_providers
from .verify import compare_outputs
from .weights import WeightInfo, find_weights


@dataclass
class QuantizeOptions:
    """Every knob of ``cet-onnx quantize`` (the CLI maps its flags onto these)."""

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


@dataclass
class Timer:
    stages: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.stages[name] = round(time.perf_counter() - self.t0, 4)
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
    if opts.per_tensor:
        return WeightFormat(opts.weight_bits, "tensor")
    if opts.block_size and w.shape[w.reduction_axis] >= opts.block_size:
        return WeightFormat(opts.weight_bits, "block", opts.block_size)
    return WeightFormat(opts.weight_bits, "channel")


def quantize_weights(model: onnx.ModelProto, weights: list[WeightInfo],
                     formats: dict[str, WeightFormat]) -> dict[str, QuantizedWeight]:
    """Round every weight to its format (round-to-nearest for now)."""
    inits = initializer_map(model)
    return {w.name: quantize_weight(to_array(inits[w.name]), formats[w.name], w.channel_axis, w.reduction_axis)
            for w in weights}


def quantize(model_path: str | os.PathLike, out_path: str | os.PathLike, calib: str | None,
             opts: QuantizeOptions, min_sqnr: float | None = None,
             min_agreement: float | None = None) -> dict[str, Any]:
    """Quantize ``model_path`` into ``out_path`` and return the report (also saved beside it)."""
    timer = Timer()
    t_start = time.perf_counter()
    out_path = Path(out_path)
    if Path(model_path).resolve() == out_path.resolve():
        raise InputError(f"{out_path}: the output would overwrite the input model")
    if not out_path.parent.exists() and str(out_path.parent):
        raise InputError(f"{out_path}: output folder '{out_path.parent}' does not exist")
    providers = select_providers(opts.device)

    with timer.stage("load"):
        model = prepare_model(model_path, opts.simplify)
        inputs = model_inputs(model)
    with timer.stage("data"):
        limit = opts.calib_size + opts.verify_size if opts.calib_size else None
        samples = load_samples(calib, inputs, limit=limit, image=opts.image, seed=opts.seed)
        calib_samples, verify_samples = split_samples(samples, opts.verify_size)
        bs = effective_batch_size(inputs, opts.batch_size)
        calib_batches = batched(calib_samples, bs, inputs=inputs)
        verify_batches = batched(verify_samples, bs, inputs=inputs)

    weights, skipped = find_weights(model)
    if not weights:
        raise InputError(f"{model_path}: no quantizable weights (Conv, ConvTranspose, Gemm or MatMul "
                         "with a float initializer weight)")
    for name, why in skipped.items():
        warn(f"weight '{name}' left in float: {why}")

    act_params = None
    if not opts.weight_only:
        with timer.stage("calibrate"):
            tensors = activation_tensors(model, remove_relus=not opts.act_symmetric)
            ranges = collect_ranges(model, tensors, calib_batches, providers, opts.calib_method,
                                    symmetric=opts.act_symmetric, num_bits=opts.act_bits, percentile=opts.percentile)
            act_params = {t: activation_params(lo, hi, opts.act_bits, opts.act_symmetric) for t, (lo, hi) in ranges.items()}

    with timer.stage("quantize_weights"):
        formats = {w.name: choose_format(w, opts) for w in weights}
        qweights = quantize_weights(model, weights, formats)
    with timer.stage("rewrite"):
        result = rewrite(model, weights, qweights, act_params, source=str(model_path))
        qmodel = result.model
        try:
            onnx.checker.check_model(qmodel, full_check=True)
        except Exception as exc:
            raise RuntimeFailure(f"the quantized model fails onnx.checker: {str(exc).strip().splitlines()[0]}") from None

    with timer.stage("verify"):
        verification = verify(model, qmodel, verify_batches, providers)

    fp32_bytes = int(sum(4 * w.size for w in weights))
    q_bytes = int(sum(qw.nbytes() for qw in qweights.values()))
    report: dict[str, Any] = {
        "tool": f"cet-onnx {__version__}",
        "model": str(model_path),
        "output": str(out_path),
        "options": {k: v for k, v in asdict(opts).items() if k != "image"},
        "calibration": {"source": calib or "random", "calib_samples": len(calib_samples),
                        "verify_samples": len(verify_samples), "batch_size": bs,
                        "disjoint": verify_samples is not calib_samples},
        "opset": result.opset,
        "weights": [
            {"name": w.name, "op": w.op_type, "shape": list(w.shape), "params": w.size,
             "bits": qweights[w.name].fmt.bits, "format": qweights[w.name].fmt.label,
             "bytes_fp32": 4 * w.size, "bytes": qweights[w.name].nbytes()}
            for w in weights],
        "skipped_weights": skipped,
        "quantized_biases": result.quantized_biases,
        "activation_tensors": len(act_params or {}),
        "totals": {
            "weight_params": int(sum(w.size for w in weights)),
            "weight_bytes_fp32": fp32_bytes,
            "weight_bytes": q_bytes,
            "weight_compression": round(fp32_bytes / q_bytes, 4) if q_bytes else None,
            "avg_bits": round(8 * q_bytes / sum(w.size for w in weights), 4),
        },
        "verification": verification,
    }
    gate_errors = []
    worst_sqnr = verification["min_sqnr_db"]
    if min_sqnr is not None and (worst_sqnr is None or worst_sqnr < min_sqnr):
        gate_errors.append(f"SQNR {worst_sqnr:.2f} dB < --verify-min-sqnr {min_sqnr}")
    agree = verification["min_top1_agreement"]
    if min_agreement is not None and (agree is None or agree < min_agreement):
        gate_errors.append(f"top-1 agreement {agree} < --verify-min-agreement {min_agreement}")
    report["verification"]["passed"] = not gate_errors

    with timer.stage("save"):
        report["timings_s"] = timer.stages
        report["timings_s"]["total"] = round(time.perf_counter() - t_start, 4)
        if gate_errors:
            raise RuntimeFailure("verification failed: " + "; ".join(gate_errors) + " (nothing written)")
        text = json.dumps(report, indent=2, default=_json_default)
        save_model(qmodel, out_path, extra_files={report_path(out_path).name: text.encode()})
    report["totals"]["file_bytes_fp32"] = model_file_bytes(Path(model_path))
    report["totals"]["file_bytes"] = model_file_bytes(out_path)
    return report


def verify(model: onnx.ModelProto, qmodel: onnx.ModelProto, batches: list, providers) -> dict[str, Any]:
    """Run both models on held-out batches and compare every output."""
    if not batches:
        return {"samples": 0, "outputs": [], "min_sqnr_db": None, "min_top1_agreement": None}
    ref_sess = make_session(model, providers)
    q_sess = make_session(qmodel, providers)
    names = [o.name for o in ref_sess.get_outputs()]
    ref = concat_outputs(run_batches(ref_sess, batches, "verify: float model"))
    test = concat_outputs(run_batches(q_sess, batches, "verify: quantized model", names))
    metrics = compare_outputs(names, ref, test)
    sqnrs = [m.sqnr_db for m in metrics if np.isfinite(m.sqnr_db) or m.sqnr_db == float("inf")]
    agrees = [m.top1_agreement for m in metrics if m.top1_agreement is not None]
    return {
        "samples": int(sum(next(iter(b.values())).shape[0] for b in batches)),
        "outputs": [m.as_dict() for m in metrics],
        "min_sqnr_db": min(sqnrs) if sqnrs else None,
        "min_top1_agreement": min(agrees) if agrees else None,
    }


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
