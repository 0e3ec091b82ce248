"""The load stage: the prepared model and its inputs, then the quantizable weights and their float values."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import onnx_ir as ir

from cet_onnx.calibration.data import ModelInput, model_input, model_inputs
from cet_onnx.errors import InputError
from cet_onnx.graph.passes.fix_inputs import FixInputsPass
from cet_onnx.graph.passes.split_hardswish import SplitHardSwishPass
from cet_onnx.graph.prepare import infer_shapes, prepare_model
from cet_onnx.progress import warn
from cet_onnx.graph.weights import WeightInfo, find_weights, subgraph_weights
from cet_onnx.io import external_data
from cet_onnx.io.external_data import LazyValues

#: inputs frozen by ``--fix-input``: name → (the input as the model declared it, its value)
FixedInputs = dict[str, tuple[ModelInput, np.ndarray]]


def load_graph(model_path: str | os.PathLike, simplify: bool, weight_only: bool,
               fix_inputs: Mapping[str, str] | None = None) -> tuple[ir.Model, list[ModelInput], FixedInputs]:
    """Load, fix the inputs in ``fix_inputs`` (name → value text, ``--fix-input``) and simplify; with quantized
    activations HardSwish is split so its parts can be quantized. Also the fixed inputs: name → (their
    declaration, value)."""
    fix = FixInputsPass(fix_inputs) if fix_inputs else None
    model = prepare_model(model_path, simplify, fix)
    if not weight_only and SplitHardSwishPass()(model).modified:
        model = infer_shapes(model, str(model_path))
    fixed = {name: (model_input(value), array) for name, (value, array) in fix.fixed.items()} if fix else {}
    return model, model_inputs(model), fixed


def load_weights(model: ir.Model, model_path: str | os.PathLike
                 ) -> tuple[list[WeightInfo], dict[str, str], dict[str, np.ndarray]]:
    """(weights, skipped weight → why, float values).

    Values of a model whose weights stay on disk are read lazily from there.
    """
    weights, skipped = find_weights(model)
    if not weights:
        raise InputError(f"{model_path}: no quantizable weights (Conv, ConvTranspose, Gemm or MatMul "
                         "with a float initializer weight, or a Gather over a float table)")
    for name in subgraph_weights(model):
        skipped[name] = "inside an If/Loop/Scan subgraph (only main-graph weights are quantized)"
    for name, why in skipped.items():
        warn(f"weight '{name}' left in float: {why}")
    tensors = {w.name: model.graph.initializers[w.name].const_value for w in weights}
    if external_data.data_dir(model) is None:
        values = {name: t.numpy().astype(np.float32) for name, t in tensors.items()}
    else:
        values = LazyValues(tensors)
    return weights, skipped, values
