"""The load stage: the prepared model and its inputs, then the quantizable weights and their float values."""

from __future__ import annotations

import os

import numpy as np
import onnx

from cet_onnx.calibration.data import ModelInput, model_inputs
from cet_onnx.errors import InputError
from cet_onnx.graph.split_hardswish import decompose_hardswish
from cet_onnx.graph.weights import WeightInfo, find_weights, subgraph_weights
from cet_onnx.io.external_data import LazyValues
from cet_onnx.io.model_files import data_dir as external_dir, initializer_map, prepare_model, to_array, warn


def load_graph(model_path: str | os.PathLike, simplify: bool,
               weight_only: bool) -> tuple[onnx.ModelProto, list[ModelInput]]:
    """Load and simplify; with quantized activations HardSwish is split so its parts can be quantized."""
    model = prepare_model(model_path, simplify)
    if not weight_only and decompose_hardswish(model):
        model = onnx.shape_inference.infer_shapes(model)
    return model, model_inputs(model)


def load_weights(model: onnx.ModelProto, model_path: str | os.PathLike
                 ) -> tuple[list[WeightInfo], dict[str, str], dict[str, np.ndarray], str | None]:
    """(weights, skipped weight → why, float values, external-data folder or None).

    Values of a model whose weights stay on disk are read lazily from there.
    """
    weights, skipped = find_weights(model)
    if not weights:
        raise InputError(f"{model_path}: no quantizable weights (Conv, ConvTranspose, Gemm or MatMul "
                         "with a float initializer weight)")
    for name in subgraph_weights(model):
        skipped[name] = "inside an If/Loop/Scan subgraph (only main-graph weights are quantized)"
    for name, why in skipped.items():
        warn(f"weight '{name}' left in float: {why}")
    inits = initializer_map(model)
    ddir = external_dir(model, model_path)
    if ddir is None:
        values = {w.name: to_array(inits[w.name]).astype(np.float32) for w in weights}
    else:
        values = LazyValues({w.name: inits[w.name] for w in weights}, ddir)
    return weights, skipped, values, ddir
