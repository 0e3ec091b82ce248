"""Pass: turn the chosen weights into graph inputs and expose their layers' outputs.

The finite-difference probes and the Hessian collection rebind weights without rebuilding the
session, so the weights they perturb must be graph inputs.

Rules, for the weights named in ``weights``:

* the first output of every node that reads one of them becomes a graph output (float32, shape
  left to onnxruntime), in node order, unless it already is one — the per-layer SQNR reads it;
* each of them stops being an initializer and becomes a graph input of its tensor's type and
  shape (in initializer order), unless it already is one.
"""

from __future__ import annotations

from typing import Collection

import onnx_ir as ir


class ProbeGraphPass(ir.passes.InPlacePass):
    """Weights → graph inputs, layer outputs → graph outputs (module docstring)."""

    def __init__(self, weights: Collection[str]) -> None:
        super().__init__()
        self.weights = set(weights)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layer_outputs: list[ir.Value] = []
        for node in graph:
            if any(v is not None and v.name in self.weights for v in node.inputs) and node.outputs[0] not in layer_outputs:
                layer_outputs.append(node.outputs[0])
        for value in layer_outputs:
            if not value.is_graph_output():
                value.type, value.shape = ir.TensorType(ir.DataType.FLOAT), None
                graph.outputs.append(value)
        moved = [name for name in graph.initializers if name in self.weights]
        for name in moved:
            value = graph.initializers.pop(name)
            tensor = value.const_value
            value.const_value = None
            value.type, value.shape = ir.TensorType(tensor.dtype), ir.Shape(tensor.shape)
            if value not in graph.inputs:
                graph.inputs.append(value)
        return ir.passes.PassResult(model, modified=bool(layer_outputs or moved))
