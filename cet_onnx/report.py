"""The quantize report: assembly, verification gates, the Pareto plot beside it, and its JSON form."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

from cet_onnx import __version__
from cet_onnx.calibration.data import run_reason
from cet_onnx.errors import RuntimeFailure
from cet_onnx.graph.rewriter import ACTIVATION_OPS
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.io.sizes import model_file_bytes
from cet_onnx.options import QuantizeOptions
from cet_onnx.plot import pareto_path, pareto_png
from cet_onnx.prepared import Prepared
from cet_onnx.quant.quantizer import QuantizedWeight
from cet_onnx.tensor_errors import array_sqnr_db, quantizers

#: fields that depend on the wall clock or on the probe cache (left out with ``--reproducible``)
WALL_CLOCK_KEYS = frozenset({"timings_s", "probe_seconds", "forward_passes_per_second", "seconds", "file_bytes",
                             "file_bytes_fp32", "probe_runs", "sensitivity_runs", "peak_rss_mb", "latency"})


def report_path(out: str | os.PathLike) -> Path:
    """``model.onnx`` → ``model.report.json`` beside it."""
    out = Path(out)
    stem = out.name[:-5] if out.name.endswith(".onnx") else out.name
    return out.with_name(stem + ".report.json")


def weight_rows(weights: list[WeightInfo], qweights: dict[str, QuantizedWeight],
                allocation: dict[str, Any] | None, values: Mapping[str, np.ndarray] | None = None
                ) -> list[dict[str, Any]]:
    """One row per weight: shape, format, bytes, SQNR of the dequantized weight against ``values`` (the
    float weights, when given) and the allocator's predicted ΔL. A weight absent from ``qweights`` was
    kept float (by the solver, under a latency budget): its row says ``float`` and counts its float bytes."""
    predicted = (allocation or {}).get("per_weight_predicted")
    return [{"name": w.name, "op": w.op_type, "shape": list(w.shape), "params": w.size,
             **(_quantized_row(w, qweights[w.name], values) if w.name in qweights else _float_row(w, values)),
             **({"predicted_delta_loss": predicted[w.name]} if predicted is not None else {})}
            for w in weights]


def _quantized_row(w: WeightInfo, qw: QuantizedWeight, values: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    return {"bits": qw.fmt.bits, "format": qw.fmt.label, "bytes_fp32": 4 * w.size, "bytes": qw.nbytes(),
            **({"integer_kernel": True} if w.integer_kernel else {}),   # read by a u8 x s8 kernel: codes within ±63
            **({"sqnr_db": _weight_sqnr(values[w.name], qw)} if values is not None else {})}


def _float_row(w: WeightInfo, values: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    itemsize = np.asarray(values[w.name]).dtype.itemsize if values is not None else 4
    return {"bits": 8 * itemsize, "format": "float", "bytes_fp32": 4 * w.size, "bytes": itemsize * w.size}


def _weight_sqnr(weight: np.ndarray, qw: QuantizedWeight) -> float:
    return array_sqnr_db(weight, qw.dequantize())


def options_view(opts: QuantizeOptions) -> dict[str, Any]:
    """The report's ``options``: every flat option but the image preprocessing."""
    return {k: v for k, v in opts.flat().items() if k != "image"}


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total_params = int(sum(row["params"] for row in rows))
    fp32_bytes = 4 * total_params
    q_bytes = int(sum(row["bytes"] for row in rows))
    return {
        "weight_params": total_params,
        "weight_bytes_fp32": fp32_bytes,
        "weight_bytes": q_bytes,
        "weight_compression": round(fp32_bytes / q_bytes, 4) if q_bytes else None,
        "avg_bits": round(8 * q_bytes / total_params, 4),
    }


def build_report(model_path: str | os.PathLike, out_path: Path, calib: str | None, opts: QuantizeOptions,
                 p: Prepared, rewritten: Any, qmodel: ir.Model, rows: list[dict[str, Any]],
                 verification: dict[str, Any], allocation: dict[str, Any] | None,
                 hessian_seconds: float) -> dict[str, Any]:
    """The report of one quantize run (``rewritten``: the rewrite's result, for opset and biases)."""
    report: dict[str, Any] = {
        "tool": f"cet-onnx {__version__}",
        "model": str(model_path),
        "output": str(out_path),
        "options": options_view(opts),
        "calibration": {"source": calib or "random", "calib_samples": len(p.calib_samples),
                        "verify_samples": len(p.verify_samples), "batch_size": p.batch_size,
                        "disjoint": p.disjoint, "feeds_are_runs": run_reason(p.inputs)},
        "fixed_inputs": {name: {"value": value.tolist(), "kept_in_signature": opts.run.keep_fixed_inputs}
                         for name, (_inp, value) in p.fixed_inputs.items()},
        "opset": rewritten.opset,
        "weights": rows,
        "skipped_weights": p.skipped,
        "rounding": {"method": p.rounding, "up_to_bits": p.roundings.max_bits,
                     "sequential": bool(opts.weight_rounding.sequential and p.rounding == "major-axis"),
                     "round_to_nearest_fallback": p.rtn_fallback,
                     "seconds": hessian_seconds},
        "quantized_biases": rewritten.quantized_biases,
        "activation_mode": {"mode": p.act_mode, "why": p.act_mode_why,
                            "dynamic_matmuls": len(rewritten.dynamic_matmuls)},
        "activation_tensors": sum(1 for kind, _ in quantizers(qmodel).values() if kind.endswith("static")),
        "activations_left_float": dict(p.float_activations),
        "float_ops": float_ops(qmodel),
        "totals": _totals(rows),
        "verification": verification,
    }
    if allocation is not None:
        report["allocation"] = allocation
    return report


def check_gates(report: dict[str, Any], min_sqnr: float | None, min_agreement: float | None,
                max_latency_ratio: float | None = None) -> None:
    """Mark ``verification.passed``; RuntimeFailure (nothing is written) when a gate fails."""
    verification = report["verification"]
    gate_errors = []
    worst_sqnr = verification["min_sqnr_db"]
    if min_sqnr is not None and (worst_sqnr is None or worst_sqnr < min_sqnr):
        gate_errors.append(f"SQNR {worst_sqnr:.2f} dB < --verify-min-sqnr {min_sqnr}")
    agree = verification["min_top1_agreement"]
    if min_agreement is not None and (agree is None or agree < min_agreement):
        gate_errors.append(f"top-1 agreement {agree} < --verify-min-agreement {min_agreement}")
    ratio = (report.get("latency") or {}).get("ratio")
    if max_latency_ratio is not None and (ratio is None or ratio > max_latency_ratio):
        measured = (f"{ratio:.2f}x the float model's latency" if ratio is not None
                    else f"latency {report.get('latency', {}).get('skipped', 'not measured')}")
        gate_errors.append(f"{measured} > --verify-max-latency-ratio {max_latency_ratio}")
    verification["passed"] = not gate_errors
    if gate_errors:
        raise RuntimeFailure("verification failed: " + "; ".join(gate_errors) + " (nothing written)")


def pareto_files(report: dict[str, Any], model_path: str | os.PathLike, out_path: Path) -> dict[str, bytes]:
    """The Pareto-front plot to write beside the model (noted in the report's allocation), if any."""
    allocation = report.get("allocation")
    if allocation is None or not allocation.get("pareto_front"):
        return {}
    chosen = {"avg_bits": report["totals"]["avg_bits"], "predicted_loss": allocation["predicted_loss"],
              "measured_loss": allocation["measured_loss"]}
    png = pareto_png(allocation["pareto_front"], chosen, f"{Path(model_path).name}: {allocation['allocator']}, "
                                                       f"{allocation['budget']}",
                     allocation.get("pareto_front_without_latency_budget"))
    if png is None:
        allocation["pareto_png"] = "not drawn: matplotlib is not installed (pip install 'cet-onnx[plot]')"
        return {}
    allocation["pareto_png"] = pareto_path(out_path).name
    return {pareto_path(out_path).name: png}


def report_bytes(report: dict[str, Any], reproducible: bool) -> bytes:
    """The report file's contents (without wall-clock fields when ``reproducible``)."""
    return json.dumps(strict_json(without_wall_clock(report) if reproducible else report), indent=2).encode()


def add_file_sizes(report: dict[str, Any], model_path: str | os.PathLike, out_path: Path) -> None:
    """Bytes on disk of the input and the written model (known only after writing; not in the report file)."""
    report["totals"]["file_bytes_fp32"] = model_file_bytes(Path(model_path))
    report["totals"]["file_bytes"] = model_file_bytes(out_path)


def without_wall_clock(o: Any) -> Any:
    """The report without timings, throughput and work counts (which depend on the probe cache)."""
    if isinstance(o, dict):
        return {k: without_wall_clock(v) for k, v in o.items() if k not in WALL_CLOCK_KEYS}
    if isinstance(o, list):
        return [without_wall_clock(v) for v in o]
    return o


def float_ops(qmodel: ir.Model) -> dict[str, int]:
    """Op types of the emitted graph that run in float on dequantized data (not quantized by cet-onnx)."""
    counts: dict[str, int] = {}
    for n in qmodel.graph:
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
