#!/usr/bin/env python
"""onnxruntime's quantizers as a command, for timing them in a fresh process (``tools/bench.py``, ``tools/transformer_bench.py``).

``--mode static`` (the default) is described below. ``--mode dynamic``: ``quantize_dynamic`` with
its default arguments (INT8 weights per tensor, every op type it supports, Gather included) on
the model as given, as onnxruntime's docs show it for transformers. ``--mode nbits``:
``MatMulNBitsQuantizer`` with its defaults (4 bits, blocks of 128, asymmetric, round-to-nearest;
``com.microsoft.MatMulNBits``), then ``save`` as its docs show.


Same recipe as ``tools/baseline_ort.py``: ``quant_pre_process`` with its default arguments
(symbolic shape inference + onnxruntime graph optimisation, as onnxruntime's docs recommend
before static quantization; when symbolic shape inference fails, as on PP-OCRv4 rec, it is
retried with ``skip_symbolic_shape=True`` and the JSON says so), then ``quantize_static`` with
``QuantFormat.QDQ``, ``per_channel=True``, activations ``QUInt8``, weights ``QInt8``, the chosen
``CalibrationMethod`` (MinMax or Entropy, onnxruntime's defaults for each: Entropy uses 128
histogram bins and 128 quantized bins), calibration on the CPU provider, fed by
``ArrayReader`` over the samples of one ``.npz`` (one array per model input, keyed by its name) in
batches of ``--batch-size``. It runs inside the output's folder: onnxruntime's symbolic shape
inference dumps ``sym_shape_infer_temp.onnx`` into the current folder when it fails.
``--max-intermediate-outputs N`` sets ``CalibMaxIntermediateOutputs`` (onnxruntime keeps every
calibration batch's activations in memory until the end unless it is set; unset by default).

A model below opset 13 is first converted to opset 13 with ``onnx.version_converter`` (per-channel
``DequantizeLinear`` needs it; ``quantize_static`` would otherwise write an invalid model).

Prints one JSON object (timings of both steps) on stdout.

    python tools/ort_quantize.py MODEL -o OUT --calib CALIB.npz [--method minmax|entropy] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

METHODS = ("minmax", "entropy")


class ArrayReader(CalibrationDataReader):
    """onnxruntime CalibrationDataReader over in-memory arrays (one per model input), in fixed-size batches."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int):
        n = len(next(iter(arrays.values())))
        self.batches = [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self):
        self.i = 0


def quantize(model: Path, out: Path, calib: Path, method: str = "minmax", batch_size: int = 16,
             max_intermediate_outputs: int | None = None, op_types: list[str] | None = None) -> dict:
    """``quantize_static`` (QDQ, per-channel) after ``quant_pre_process``; ``op_types``: its
    ``op_types_to_quantize`` (default: every op it can quantize)."""
    if method not in METHODS:
        raise SystemExit(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    model, out, calib = Path(model).resolve(), Path(out).resolve(), Path(calib).resolve()
    # onnxruntime's symbolic shape inference dumps "sym_shape_infer_temp.onnx" into the current folder when it
    # fails: keep that out of the caller's folder (the repository root)
    cwd = os.getcwd()
    os.chdir(out.parent)
    try:
        return _quantize(model, out, calib, method, batch_size, max_intermediate_outputs, op_types)
    finally:
        os.chdir(cwd)


def _quantize(model: Path, out: Path, calib: Path, method: str, batch_size: int,
              max_intermediate_outputs: int | None, op_types: list[str] | None) -> dict:
    import importlib

    import onnx
    import onnx.version_converter
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    data = np.load(calib, allow_pickle=False)
    arrays = {k: data[k] for k in data.files}
    pre = out.with_name(out.stem + ".preprocessed.onnx")
    t_up = time.perf_counter()
    m = onnx.load(str(model))
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    upgraded_from = None
    if opset is not None and opset < 13:
        # per-channel DequantizeLinear (its axis attribute) needs opset 13; quantize_static does not raise the
        # opset itself and writes an invalid model (PP-OCRv4 rec is opset 12)
        up = out.with_name(out.stem + ".opset13.onnx")
        onnx.save(onnx.version_converter.convert_version(m, 13), str(up))
        model, upgraded_from = up, opset
    del m
    t_up = time.perf_counter() - t_up
    try:
        importlib.import_module("sympy")  # onnxruntime's symbolic shape inference needs it
        pre_args = {}
    except ImportError:
        pre_args = {"skip_symbolic_shape": True}
    t0 = time.perf_counter()
    fallback = None
    try:
        quant_pre_process(str(model), str(pre), **pre_args)
    except Exception as exc:  # e.g. "Incomplete symbolic shape inference" (PP-OCRv4 rec)
        if pre_args:
            raise
        fallback = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        print(f"quant_pre_process failed ({fallback}); retrying with skip_symbolic_shape=True", file=sys.stderr)
        pre_args = {"skip_symbolic_shape": True}
        quant_pre_process(str(model), str(pre), **pre_args)
    t1 = time.perf_counter()
    extra = {} if max_intermediate_outputs is None else {"CalibMaxIntermediateOutputs": max_intermediate_outputs}
    quantize_static(str(pre), str(out), ArrayReader(arrays, batch_size), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}[method],
                    calibration_providers=["CPUExecutionProvider"], extra_options=extra, op_types_to_quantize=op_types)
    t2 = time.perf_counter()
    pre.unlink(missing_ok=True)
    if upgraded_from is not None:
        Path(model).unlink(missing_ok=True)
    return {"method": method, "calib_samples": int(len(next(iter(arrays.values())))), "batch_size": batch_size,
            "quant_pre_process_s": round(t1 - t0, 3), "quantize_static_s": round(t2 - t1, 3),
            "total_s": round(t2 - t0 + t_up, 3), "opset_upgraded_from": upgraded_from,
            "opset_upgrade_s": round(t_up, 3), "preprocess_args": pre_args,
            "preprocess_fallback_reason": fallback, "extra_options": extra, "op_types": op_types}


def quantize_dynamic(model: Path, out: Path) -> dict:
    """``quantize_dynamic`` with its defaults."""
    from onnxruntime.quantization import quantize_dynamic as ort_dynamic
    t0 = time.perf_counter()
    ort_dynamic(str(model), str(out))
    return {"mode": "dynamic", "total_s": round(time.perf_counter() - t0, 3)}


def quantize_nbits(model: Path, out: Path) -> dict:
    """``MatMulNBitsQuantizer`` with its defaults."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    t0 = time.perf_counter()
    q = MatMulNBitsQuantizer(onnx.load(str(model)))
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    return {"mode": "nbits", "bits": q.bits, "block_size": q.block_size,
            "total_s": round(time.perf_counter() - t0, 3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--calib", type=Path, help=".npz with one array per model input, keyed by its name (static)")
    ap.add_argument("--mode", default="static", choices=("static", "dynamic", "nbits"))
    ap.add_argument("--method", default="minmax", choices=METHODS)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-intermediate-outputs", type=int, default=None)
    args = ap.parse_args(argv)
    if args.mode == "dynamic":
        print(json.dumps(quantize_dynamic(args.model, args.output)))
        return
    if args.mode == "nbits":
        print(json.dumps(quantize_nbits(args.model, args.output)))
        return
    if args.calib is None:
        ap.error("--mode static needs --calib")
    print(json.dumps(quantize(args.model, args.output, args.calib, args.method, args.batch_size,
                              args.max_intermediate_outputs)))


if __name__ == "__main__":
    main()
