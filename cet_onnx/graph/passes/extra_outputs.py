"""Pass: expose intermediate tensors as extra graph outputs (calibration, layer Hessians).

Rule: each named tensor that is not yet a graph output is appended to the graph outputs, in
the order given. A node output keeps the type and shape its value_info gave it, or is declared
float32 of unknown shape when it has none; with ``typed=False`` it keeps only its element type
and leaves the shape (and an unknown type: a half-precision model's tensors are not float32) to
onnxruntime. A graph input keeps its own declaration.

A tensor inside an ``If`` branch (at any depth of Ifs) is carried out: it becomes an extra output
of its branch, the other branch outputs an empty tensor of its type in the same place, and the If
gets an extra output, which takes the tensor's name (the branch's own value is renamed). A run
whose If takes the other branch returns an empty array for it. Tensors inside Loop / Scan bodies
cannot be carried out this way; :func:`exposable` tells which can.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx_ir as ir

from cet_onnx.graph import boundary
from cet_onnx.graph.boundary import Model
from cet_onnx.graph.names import UniqueNames
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
        inner = values_by_name(graph, subgraphs=True)
        owners = branch_owners(graph)
        names = UniqueNames(graph)
        added = False
        for name in self.names:
            value = values.get(name)
            if value is None and name in inner:
                value = _carry_out(graph, inner[name], owners, names)
            value = value or ir.Value(name=name)
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


def branch_owners(graph: ir.Graph) -> dict[ir.Graph, tuple[ir.Node, str]]:
    """Each subgraph of ``graph`` (any depth) → the node holding it and the attribute's name."""
    owners = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                owners[attr.as_graph()] = (node, attr.name)
    return owners


def _home(value: ir.Value) -> ir.Graph | None:
    node = value.producer()
    return node.graph if node is not None else value.graph


def exposable(main: ir.Graph, value: ir.Value, owners: dict[ir.Graph, tuple[ir.Node, str]] | None = None) -> bool:
    """Whether ``value`` is in the main graph or inside If branches only (so it can be made a graph output)."""
    owners = branch_owners(main) if owners is None else owners
    graph = _home(value)
    while graph is not None and graph is not main:
        node, _ = owners.get(graph, (None, None))
        if node is None or node.op_type != "If":
            return False
        graph = node.graph
    return graph is main


def _carry_out(main: ir.Graph, value: ir.Value, owners: dict[ir.Graph, tuple[ir.Node, str]],
               names: UniqueNames) -> ir.Value | None:
    """A main-graph output of the If chain carrying ``value`` out of its branch (module docstring), or None."""
    if not exposable(main, value, owners):
        return None
    name = value.name
    dtype = value.dtype or ir.DataType.FLOAT
    graph = _home(value)
    while graph is not main:
        node, attr = owners[graph]
        other = node.attributes["else_branch" if attr == "then_branch" else "then_branch"].as_graph()
        empty = ir.node("Constant", [], {"value": ir.tensor(np.zeros(0, dtype.numpy()))},
                        name=names.node(f"{name}_empty"))
        other.append(empty)
        graph.outputs.append(value)
        other.outputs.append(empty.outputs[0])
        node.resize_outputs(len(node.outputs) + 1)
        value = node.outputs[-1]
        value.name, value.type = names.value(f"{name}_carried"), ir.TensorType(dtype)
        graph = node.graph
    _rename_inner(main, name, names)
    value.name = name
    return value


def _rename_inner(main: ir.Graph, name: str, names: UniqueNames) -> None:
    """Give the subgraph value called ``name`` a fresh name, so that a main-graph output can take it."""
    for graph in main.subgraphs():
        for node in graph:
            for v in node.outputs:
                if v.name == name:
                    v.name = names.value(f"{name}_inner")
                    return


def with_outputs(model: Model, names: Iterable[str], typed: bool = True) -> Model:
    """Copy of ``model`` whose graph also outputs the given intermediate tensors."""
    m = boundary.working_copy(model)
    ExposeOutputsPass(names, typed)(m)
    return boundary.like(m, model)
