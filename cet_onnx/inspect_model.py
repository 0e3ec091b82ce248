"""What ``cet-onnx inspect`` reports: inputs, outputs, opset and quantizable weights."""

from __future__ import annotations

import os
from typing import Any

import onnx

from cet_onnx.io.model_files import constants_to_initializers, load_model, opset_version
from cet_onnx.graph.weights import find_weights


def _io(vi: onnx.ValueInfoProto) -> dict[str, Any]:
    t = vi.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "unknown"
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return {"name": vi.name, "dtype": dtype, "shape": shape}


def inspect_model(path: str | os.PathLike) -> dict[str, Any]:
    """Describe the model at ``path`` (no simplification, so names match the file)."""
    model = load_model(path)
    constants_to_initializers(model)
    inits = {t.name for t in model.graph.initializer}
    weights, skipped = find_weights(model)
    return {
        "model": str(path),
        "opset": opset_version(model),
        "ir_version": model.ir_version,
        "nodes": len(model.graph.node),
        "inputs": [_io(i) for i in model.graph.input if i.name not in inits],
        "outputs": [_io(o) for o in model.graph.output],
        "weights": [{"name": w.name, "op": w.op_type, "shape": list(w.shape), "params": w.size,
                     "bytes": 4 * w.size} for w in weights],
        "weight_params": sum(w.size for w in weights),
        "weight_bytes": sum(4 * w.size for w in weights),
        "skipped_weights": skipped,
    }
