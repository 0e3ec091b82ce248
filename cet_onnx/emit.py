"""The rewrite and save stages: the quantized graph, where its unchanged on-disk weights go, the atomic save."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from cet_onnx.calibration.data import ModelInput
from cet_onnx.errors import InputError, RuntimeFailure, first_line
from cet_onnx.graph.rewriter import rewrite
from cet_onnx.io import external_data
from cet_onnx.io.save import save_model, temporary_copy
from cet_onnx.io.sizes import fits_protobuf, inline_nbytes
from cet_onnx.prepared import Prepared
from cet_onnx.quant.quantizer import ActivationParams, QuantizedWeight
from cet_onnx.runner import VIA_FILE_BYTES


@dataclass
class Emitted:
    """The quantized model, ready to verify and save."""

    model: ir.Model
    rewritten: Any                 # the rewrite's result (opset, quantized biases)
    large: bool                    # saved with OUT.data and checked from the written file


def check_output_path(model_path: str | os.PathLike, out_path: Path) -> None:
    """InputError when the output would overwrite the input or its folder does not exist."""
    if Path(model_path).resolve() == out_path.resolve():
        raise InputError(f"{out_path}: the output would overwrite the input model")
    if not out_path.parent.exists() and str(out_path.parent):
        raise InputError(f"{out_path}: output folder '{out_path.parent}' does not exist")


def emit(p: Prepared, qweights: dict[str, QuantizedWeight], model_path: str | os.PathLike,
         contrib_level: int | None = None, act_params: dict[str, ActivationParams] | None = None,
         widen: bool = True) -> Emitted:
    """Rewrite the graph with Q/DQ and the quantized weights (``contrib_level``: MatMul weights in the
    ``MatMulNBits`` form as ``com.microsoft.MatMulNBits`` with that ``accuracy_level``, ``--emit-contrib``).
    ``act_params``: the activation precisions to write (the activation plan's), instead of ``p.act_params``.
    ``widen``: per-channel low-bit weights widened for onnxruntime's INT8 kernels (``--no-widen-low-bit``: not).

    Unchanged initializers left on disk: small ones are read into the output; large ones
    (embedding tables, say) keep pointing at the input's files and are streamed into OUT.data.
    """
    result = rewrite(p.model, p.weights, qweights, p.act_params if act_params is None else act_params, source=str(model_path),
                     dynamic=p.act_mode == "dynamic", contrib_level=contrib_level, widen=widen)
    qmodel = result.model
    if external_data.external_nbytes(qmodel) < external_data.STREAM_BYTES:
        external_data.load_into(qmodel)
    large = bool(external_data.external_tensors(qmodel)) or not fits_protobuf(qmodel)
    return Emitted(qmodel, result, large)


def declare_inputs(model: ir.Model, inputs: list[ModelInput]) -> None:
    """Declare ``inputs`` (fixed by ``--fix-input``, read by nothing any more) as graph inputs again, so that
    the model keeps its signature (``--keep-fixed-inputs``); whatever is fed to them is ignored."""
    for inp in inputs:
        shape = ir.Shape([d for d in inp.shape]) if inp.rank_known else None
        model.graph.inputs.append(ir.Value(name=inp.name, type=ir.TensorType(ir.DataType.from_numpy(inp.dtype)),
                                           shape=shape))


def check(emitted: Emitted) -> None:
    """``onnx.checker`` on the emitted model (a large one is checked from the written file instead).

    Run it once the quantized codes are dropped: the checker serializes the whole model (a model of
    :data:`~cet_onnx.runner.VIA_FILE_BYTES` or more is checked from a temporary copy on disk instead).
    """
    if emitted.large:
        return
    try:
        if inline_nbytes(emitted.model) >= VIA_FILE_BYTES:
            with temporary_copy(emitted.model) as path:
                onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(ir.to_proto(emitted.model), full_check=True)
    except Exception as exc:
        raise RuntimeFailure(f"the quantized model fails onnx.checker: {first_line(exc)}") from None


def save(emitted: Emitted, out_path: Path, extra_files: dict[str, bytes]) -> None:
    """Write the model and ``extra_files`` (report, plot) atomically."""
    save_model(emitted.model, out_path, extra_files=extra_files, external=emitted.large)
