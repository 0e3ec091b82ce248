"""What ``cet-onnx inspect`` reports: inputs, outputs, opset and quantizable weights."""

from __future__ import annotations

import os
from typing import Any

import onnx_ir as ir

from cet_onnx.graph.prepare import inline_weight_functions, lift_weights
from cet_onnx.graph.weights import find_weights
from cet_onnx.io.load import load_model


def _io(v: ir.Value) -> dict[str, Any]:
    dtype = v.dtype.numpy().name if v.dtype is not None and v.dtype != ir.DataType.UNDEFINED else "unknown"
    shape = [] if v.shape is None else [d if isinstance(d, int) else (d.value or "?") for d in v.shape]
    return {"name": v.name, "dtype": dtype, "shape": shape}


def inspect_model(path: str | os.PathLike) -> dict[str, Any]:
    """Describe the model at ``path`` (no simplification, so names match the file; weights found as
    ``quantize`` finds them, inside If / Loop / Scan bodies and local functions too)."""
    model = load_model(path)
    inline_weight_functions(model)
    lift_weights(model)
    weights, skipped = find_weights(model)
    return {
        "model": str(path),
        "opset": model.opset_imports.get("", 1),
        "ir_version": model.ir_version,
        "nodes": len(model.graph),
        "subgraph_nodes": sum(len(g) for g in model.graph.subgraphs()),
        "inputs": [_io(v) for v in model.graph.inputs if v.name not in model.graph.initializers],
        "outputs": [_io(v) for v in model.graph.outputs],
        "weights": [{"name": w.name, "op": w.op_type, "shape": list(w.shape), "params": w.size,
                     "bytes": 4 * w.size} for w in weights],
        "weight_params": sum(w.size for w in weights),
        "weight_bytes": sum(4 * w.size for w in weights),
        "skipped_weights": skipped,
    }
