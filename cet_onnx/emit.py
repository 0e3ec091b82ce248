"""The rewrite and save stages: the quantized graph, where its unchanged on-disk weights go, the atomic save."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from cet_onnx.errors import InputError, RuntimeFailure, first_line
from cet_onnx.graph.rewriter import rewrite
from cet_onnx.io import external_data
from cet_onnx.io.external_data import external_nbytes, external_tensors, load_into
from cet_onnx.io.model_files import fits_protobuf, save_model
from cet_onnx.prepared import Prepared
from cet_onnx.quant.quantizer import QuantizedWeight


@dataclass
class Emitted:
    """The quantized model, ready to verify and save."""

    model: onnx.ModelProto
    rewritten: Any                 # the rewrite's result (opset, quantized biases)
    stream_from: str | None        # large unchanged initializers are streamed from here into OUT.data
    large: bool                    # checked from the written file (too large to check in memory)


def check_output_path(model_path: str | os.PathLike, out_path: Path) -> None:
    """InputError when the output would overwrite the input or its folder does not exist."""
    if Path(model_path).resolve() == out_path.resolve():
        raise InputError(f"{out_path}: the output would overwrite the input model")
    if not out_path.parent.exists() and str(out_path.parent):
        raise InputError(f"{out_path}: output folder '{out_path.parent}' does not exist")


def emit(p: Prepared, qweights: dict[str, QuantizedWeight], model_path: str | os.PathLike) -> Emitted:
    """Rewrite the graph with Q/DQ and the quantized weights, and check it with ``onnx.checker``.

    Unchanged initializers left on disk: small ones are copied into the output; large ones
    (embedding tables, say) keep pointing at the input's files and are streamed into OUT.data.
    """
    result = rewrite(p.model, p.weights, qweights, p.act_params, source=str(model_path), data_dir=p.data_dir)
    qmodel = result.model
    stream_from = None
    if p.data_dir is not None:
        if external_nbytes(external_tensors(qmodel)) >= external_data.STREAM_BYTES:
            stream_from = p.data_dir
        else:
            load_into(qmodel, p.data_dir)
    large = stream_from is not None or not fits_protobuf(qmodel)
    if not large:  # larger ones are checked from the written file, before it is renamed into place
        try:
            onnx.checker.check_model(qmodel, full_check=True)
        except Exception as exc:
            raise RuntimeFailure(f"the quantized model fails onnx.checker: {first_line(exc)}") from None
    return Emitted(qmodel, result, stream_from, large)


def save(emitted: Emitted, out_path: Path, extra_files: dict[str, bytes]) -> None:
    """Write the model and ``extra_files`` (report, plot) atomically."""
    save_model(emitted.model, out_path, extra_files=extra_files, check=emitted.large,
               external_from=emitted.stream_from)
