"""``cet-onnx evaluate``: a float model and its quantized copy side by side on the same data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


from cet_onnx.calibration.data import ImageOptions, batched, load_samples, model_inputs
from cet_onnx.errors import InputError
from cet_onnx.io.model_files import data_dir, load_model, model_file_bytes
from cet_onnx.pipeline import effective_batch_size, load_labels
from cet_onnx.runner import concat_outputs, make_session, run_batches, select_providers
from cet_onnx.verify import accuracy, compare_outputs, median_latency_ms


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
    ref_sess = make_session(fp32, providers, data_dir=data_dir(fp32, fp32_path))
    q_sess = make_session(quant, providers, data_dir=data_dir(quant, quant_path))
    names = [o.name for o in ref_sess.get_outputs()]
    ref = concat_outputs(run_batches(ref_sess, batches, "float model"))
    test = concat_outputs(run_batches(q_sess, batches, "quantized model", names))
    result: dict[str, Any] = {
        "samples": len(samples),
        "outputs": [m.as_dict() for m in compare_outputs(names, ref, test)],
        "file_bytes": {"fp32": model_file_bytes(Path(fp32_path)), "quantized": model_file_bytes(Path(quant_path))},
    }
    if label_arr is not None:
        result["accuracy"] = {"fp32": accuracy(ref[0], label_arr), "quantized": accuracy(test[0], label_arr)}
    feed = batches[0]
    result["latency_ms"] = {"batch": int(next(iter(feed.values())).shape[0]),
                            "fp32": median_latency_ms(ref_sess, feed, repeats),
                            "quantized": median_latency_ms(q_sess, feed, repeats)}
    return result
