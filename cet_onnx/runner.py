"""onnxruntime sessions for calibration, probes and evaluation: providers, loading, running batches.

One long-lived session per model and device (calibration itself is in
:mod:`cet_onnx.calibration.observe`).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from cet_onnx.errors import InputError, RuntimeFailure, first_line
from cet_onnx.io import external_data
from cet_onnx.io.save import temporary_copy
from cet_onnx.io.sizes import inline_nbytes
from cet_onnx.progress import track

Feed = dict[str, np.ndarray]

#: ``--device`` choices
DEVICES = ("auto", "cpu", "cuda")


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


#: An in-memory model with more tensor bytes than this reaches onnxruntime through a temporary
#: file whose tensors onnx-ir writes one by one, instead of as one serialized protobuf (which would
#: hold a second and a third copy of the weights while onnxruntime reads it).
VIA_FILE_BYTES = 2**28


def make_session(model: ir.Model | onnx.ModelProto | str | os.PathLike, providers: Sequence[str],
                 optimize: bool = True, threads: int = 0) -> ort.InferenceSession:
    """An inference session for an in-memory model or a file.

    Weights an ``ir.Model`` still keeps on disk are read by onnxruntime itself from their
    folder (``session.model_external_initializers_file_folder_path``).
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        if isinstance(model, (str, os.PathLike)):
            return ort.InferenceSession(str(model), opts, providers=list(providers))
        if isinstance(model, onnx.ModelProto):
            return ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers))
        folder = external_data.data_dir(model)
        if folder is None and inline_nbytes(model) >= VIA_FILE_BYTES:
            return _session_via_file(model, opts, providers)
        if folder is not None:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=list(providers))
    except Exception as exc:
        raise RuntimeFailure(f"onnxruntime cannot load the model: {first_line(exc)}") from None


def _session_via_file(model: ir.Model, opts: ort.SessionOptions, providers: Sequence[str]) -> ort.InferenceSession:
    with temporary_copy(model) as path:
        return ort.InferenceSession(str(path), opts, providers=list(providers))


def run_batches(session: ort.InferenceSession, batches: Sequence[Feed], desc: str = "",
                output_names: Sequence[str] | None = None) -> list[list[np.ndarray]]:
    """Outputs of every batch (list over batches of lists over outputs)."""
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    results = []
    for feed in track(batches, desc=desc or "running", unit="batch"):
        try:
            results.append(session.run(names, feed))
        except Exception as exc:
            first = first_line(exc)
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
