"""Pass: turn the chosen weights into graph inputs and expose their layers' outputs.

The finite-difference probes and the Hessian collection rebind weights without rebuilding the
session, so the weights they perturb must be graph inputs.

Rules, for the weights named in ``weights``:

* the first output of every node that reads one of them becomes a graph output (its own type,
  or none when unknown; shape left to onnxruntime), in node order, unless it already is one —
  the per-layer SQNR reads it;
* each of them stops being an initializer and becomes a graph input of its tensor's type and
  shape (in initializer order), unless it already is one. A float16 / bfloat16 weight becomes a
  float32 input ``W`` and a ``Cast`` (``W_Cast``, at the front) to its type feeds its readers, so
  that the probes feed every weight as float32.
"""

from __future__ import annotations

from typing import Collection

import onnx_ir as ir

from cet_onnx.graph.passes._graph import insert_front


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
                value.type, value.shape = (ir.TensorType(value.dtype) if value.dtype else None), None
                graph.outputs.append(value)
        moved = [name for name in graph.initializers if name in self.weights]
        for name in moved:
            value = graph.initializers.pop(name)
            tensor = value.const_value
            value.const_value = None
            value.type, value.shape = ir.TensorType(tensor.dtype), ir.Shape(tensor.shape)
            if tensor.dtype in _HALF:
                value = _float32_input(graph, value)
            if value not in graph.inputs:
                graph.inputs.append(value)
        return ir.passes.PassResult(model, modified=bool(layer_outputs or moved))


_HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _float32_input(graph: ir.Graph, half: ir.Value) -> ir.Value:
    """A float32 value named like ``half``, cast to ``half``'s type for every reader of ``half``."""
    name = half.name
    fed = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=half.shape)
    cast = ir.node("Cast", [fed], {"to": half.dtype}, name=f"{name}_Cast")
    half.replace_all_uses_with(cast.outputs[0])
    half.name = f"{name}_half"
    cast.outputs[0].name, cast.outputs[0].type = half.name, half.type
    insert_front(graph, [cast])
    return fed
