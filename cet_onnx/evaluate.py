"""``cet-onnx evaluate``: a float model and its quantized copy side by side on the same data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cet_onnx.calibration.data import ImageOptions, batched, load_samples, model_inputs
from cet_onnx.calibration.samples import effective_batch_size, load_labels
from cet_onnx.errors import InputError
from cet_onnx.io.load import load_model
from cet_onnx.io.sizes import model_file_bytes
from cet_onnx.kernels import inspect_kernels
from cet_onnx.runner import select_providers
from cet_onnx.verify import compare_models


def evaluate_models(fp32_path: str | os.PathLike, quant_path: str | os.PathLike, data: str | None, *,
                    calib_size: int | None = None, batch_size: int = 16, image: ImageOptions | None = None,
                    device: str = "auto", labels: str | None = None, repeats: int = 30) -> dict[str, Any]:
    """Outputs compared, optional accuracy, file sizes and median latency of both models."""
    providers = select_providers(device)
    fp32 = load_model(fp32_path)
    quant = load_model(quant_path)
    inputs = model_inputs(fp32)
    q_inputs = {i.name for i in model_inputs(quant)}
    if {i.name for i in inputs} != q_inputs:
        raise InputError(f"{quant_path}: inputs {sorted(q_inputs)} differ from {fp32_path}'s "
                         f"{sorted(i.name for i in inputs)}")
    samples = load_samples(data, inputs, limit=calib_size, image=image)
    label_arr = load_labels(labels, len(samples), truncated=calib_size is not None) if labels else None
    batches = batched(samples, effective_batch_size(inputs, batch_size), inputs=inputs)
    c = compare_models(fp32, quant, batches, providers, latency_repeats=repeats)
    result: dict[str, Any] = {
        "samples": len(samples),
        "outputs": [{**m.as_dict(), "positions": c.positions.get(m.name)} for m in c.metrics],
        "file_bytes": {"fp32": model_file_bytes(Path(fp32_path)), "quantized": model_file_bytes(Path(quant_path))},
    }
    if label_arr is not None:
        result["accuracy"] = c.accuracy(label_arr)
    result["latency_ms"] = c.latency_ms
    result["kernels"] = inspect_kernels(quant_path, providers).as_dict()
    return result
