"""onnxruntime sessions for calibration and evaluation.

One long-lived session per model and device. Calibration exposes the planned activation
tensors as extra graph outputs and streams every batch through observers, so memory holds
one batch of activations at a time, never the whole calibration set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from cet_onnx.errors import InputError, RuntimeFailure
from cet_onnx.io.model_files import fits_protobuf
from cet_onnx.graph.passes.extra_outputs import with_outputs  # noqa: F401  (re-exported)
from cet_onnx.progress import track
from cet_onnx.calibration.ranges import make_observer

Feed = dict[str, np.ndarray]


def select_providers(device: str) -> list[str]:
    """Execution providers for ``auto``, ``cpu`` or ``cuda``."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise InputError("--device cuda: onnxruntime has no CUDA execution provider here "
                             "(install onnxruntime-gpu instead of onnxruntime; see README)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    raise InputError(f"--device must be auto, cpu or cuda, got '{device}'")


def make_session(model: onnx.ModelProto | str | os.PathLike, providers: Sequence[str],
                 optimize: bool = True, threads: int = 0, data_dir: str | None = None) -> ort.InferenceSession:
    """An inference session for an in-memory model or a file.

    ``data_dir``: the folder the model's external data paths are relative to (a model whose
    weights stay on disk); onnxruntime then reads the weights from there itself. Other
    in-memory models over 2 GB go through a temporary file.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        if isinstance(model, onnx.ModelProto):
            if data_dir is not None:
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_dir))
                return ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers))
            if fits_protobuf(model):
                return ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers))
            with tempfile.TemporaryDirectory(prefix="cet-onnx-") as tmp:
                path = Path(tmp) / "model.onnx"
                onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
                return ort.InferenceSession(str(path), opts, providers=list(providers))
        return ort.InferenceSession(str(model), opts, providers=list(providers))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeFailure(f"onnxruntime cannot load the model: {first}") from None


def run_batches(session: ort.InferenceSession, batches: Sequence[Feed], desc: str = "",
                output_names: Sequence[str] | None = None) -> list[list[np.ndarray]]:
    """Outputs of every batch (list over batches of lists over outputs)."""
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    results = []
    for feed in track(batches, desc=desc or "running", unit="batch"):
        try:
            results.append(session.run(names, feed))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeFailure(f"onnxruntime failed while running a batch: {first}") from None
    return results


def concat_outputs(per_batch: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Join per-batch outputs along the batch axis (scalars are stacked)."""
    if not per_batch:
        return []
    out = []
    for k in range(len(per_batch[0])):
        parts = [np.asarray(b[k]) for b in per_batch]
        out.append(np.concatenate(parts, axis=0) if parts[0].ndim else np.stack(parts))
    return out


def collect_ranges(model: onnx.ModelProto, tensors: Sequence[str], batches: Sequence[Feed], providers: Sequence[str],
                   method: str = "minmax", symmetric: bool = False, num_bits: int = 8,
                   percentile: float = 99.999, data_dir: str | None = None) -> dict[str, tuple[float, float]]:
    """Activation range of every tensor in ``tensors``, streamed over ``batches``."""
    if not tensors:
        return {}
    augmented = with_outputs(model, tensors)
    session = make_session(augmented, providers, optimize=False, data_dir=data_dir)
    observers = {t: make_observer(method, symmetric=symmetric, num_bits=num_bits, percentile=percentile)
                 for t in tensors}
    names = list(tensors)
    for feed in track(batches, desc=f"calibrating ({method})", unit="batch"):
        try:
            values = session.run(names, feed)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeFailure(f"onnxruntime failed during calibration: {first}") from None
        for name, value in zip(names, values):
            try:
                observers[name].update(np.asarray(value, dtype=np.float32))
            except ValueError as exc:
                raise RuntimeFailure(f"activation '{name}': {exc}") from None
    return {t: observers[t].range() for t in names}
