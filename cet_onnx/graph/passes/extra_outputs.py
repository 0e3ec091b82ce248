"""Pass: expose intermediate tensors as extra graph outputs (calibration, layer Hessians).

Rule: each named tensor that is not yet a graph output is appended to the graph outputs, in
the order given. A node output keeps the type and shape its value_info gave it, or is declared
float32 of unknown shape when it has none; with ``typed=False`` it keeps only its element type
and leaves the shape (and an unknown type: a half-precision model's tensors are not float32) to
onnxruntime. A graph input keeps its own declaration.
"""

from __future__ import annotations

from typing import Iterable

import onnx_ir as ir

from cet_onnx.graph import boundary
from cet_onnx.graph.boundary import Model
from cet_onnx.graph.passes._graph import values_by_name


class ExposeOutputsPass(ir.passes.InPlacePass):
    """Makes ``names`` graph outputs as well."""

    def __init__(self, names: Iterable[str], typed: bool = True) -> None:
        super().__init__()
        self.names = list(names)
        self.typed = typed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = values_by_name(graph)
        added = False
        for name in self.names:
            value = values.get(name) or ir.Value(name=name)
            if value.is_graph_output():
                continue
            if value.producer() is not None and not self.typed:
                value.type, value.shape = (ir.TensorType(value.dtype) if value.dtype else None), None
            elif value.producer() is not None and value.type is None:
                value.type, value.shape = ir.TensorType(ir.DataType.FLOAT), None
            elif value.producer() is None and not value.is_graph_input():
                value.type = value.type or ir.TensorType(ir.DataType.FLOAT)
            graph.outputs.append(value)
            added = True
        return ir.passes.PassResult(model, modified=added)


def with_outputs(model: Model, names: Iterable[str], typed: bool = True) -> Model:
    """Copy of ``model`` whose graph also outputs the given intermediate tensors."""
    m = boundary.working_copy(model)
    ExposeOutputsPass(names, typed)(m)
    return boundary.like(m, model)
