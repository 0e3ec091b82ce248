"""onnxruntime sessions for calibration, probes and evaluation: providers, loading, running batches.

One long-lived session per model and device (calibration itself is in
:mod:`cet_onnx.calibration.observe`).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from cet_onnx.errors import InputError, RuntimeFailure, first_line
from cet_onnx.io import external_data
from cet_onnx.io.save import temporary_copy
from cet_onnx.io.sizes import inline_nbytes
from cet_onnx.progress import track, warn

Feed = dict[str, np.ndarray]

#: ``--device`` choices
DEVICES = ("auto", "cpu", "cuda")


def select_providers(device: str) -> list[str]:
    """Execution providers for ``auto``, ``cpu`` or ``cuda``.

    A listed CUDA provider is not enough: with a CUDA or cuDNN library missing, onnxruntime
    falls back to the CPU without an error. ``cuda`` then fails (exit 2); ``auto`` warns and uses the CPU.
    """
    if device not in DEVICES:
        raise InputError(f"--device must be auto, cpu or cuda, got '{device}'")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    listed = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not listed:
        raise InputError("--device cuda: onnxruntime has no CUDA execution provider here "
                         "(install onnxruntime-gpu instead of onnxruntime; see README)")
    if listed and _cuda_starts():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise InputError("--device cuda: onnxruntime lists the CUDA execution provider but cannot start it "
                         "(CUDA or cuDNN libraries missing or not found?); see README 'GPU (CUDA)'")
    if listed:
        warn("onnxruntime lists CUDA but cannot start it (CUDA or cuDNN libraries missing?); using the CPU")
    return ["CPUExecutionProvider"]


@functools.lru_cache(maxsize=1)
def _cuda_starts() -> bool:
    """True when a session really gets the CUDA execution provider (checked once per process)."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "cuda_check", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        with warnings.catch_warnings():  # onnxruntime's own warning about the fallback; the caller says it
            warnings.simplefilter("ignore")
            sess = ort.InferenceSession(model.SerializeToString(), opts,
                                        providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:
        return False
    return sess.get_providers()[0] == "CUDAExecutionProvider"


#: An in-memory model with more tensor bytes than this reaches onnxruntime through a temporary
#: file whose tensors onnx-ir writes one by one, instead of as one serialized protobuf (which would
#: hold a second and a third copy of the weights while onnxruntime reads it).
VIA_FILE_BYTES = 2**28


def session_options(optimize: bool = True, threads: int = 0) -> ort.SessionOptions:
    """Every graph optimisation (or none), warnings off, ``threads`` intra-op threads (0: onnxruntime's default)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def make_session(model: ir.Model | onnx.ModelProto | str | os.PathLike, providers: Sequence[str],
                 optimize: bool = True, threads: int = 0) -> ort.InferenceSession:
    """An inference session for an in-memory model or a file.

    Weights an ``ir.Model`` still keeps on disk are read by onnxruntime itself from their
    folder (``session.model_external_initializers_file_folder_path``).
    """
    opts = session_options(optimize, threads)
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
