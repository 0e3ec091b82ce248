"""Pass: expose intermediate tensors as extra graph outputs (calibration, layer Hessians).

Rule: each named tensor that is not yet a graph output is appended to the graph outputs, in
the order given. A node output keeps the type and shape its value_info gave it, or is declared
float32 of unknown shape when it has none; with ``typed=False`` it keeps only its element type
and leaves the shape (and an unknown type: a half-precision model's tensors are not float32) to
onnxruntime. A graph input keeps its own declaration.

A tensor inside subgraphs is carried out level by level, and the main-graph output takes its name
(the inner value is renamed):

* out of an ``If`` branch: it becomes an extra output of its branch, the other branch outputs an
  empty tensor of its type in the same place, and the If gets an extra output. A run whose If takes
  the other branch returns an empty array for it;
* out of a ``Loop`` or ``Scan`` body: an ``Identity`` of it becomes an extra (last) body output, so a
  new scan output, and the node gets an extra output (a Scan's ``scan_output_axes`` /
  ``scan_output_directions`` get a 0). The result stacks the value of every iteration on a new
  axis 0 (:func:`stack_depth` says how many such axes); a Loop that runs no iteration returns an
  empty array, and onnxruntime refuses a Loop whose iterations give the value different shapes.

Other ops with subgraphs are not looked into; :func:`exposable` tells which tensors can be carried.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx_ir as ir

from cet_onnx.graph import boundary
from cet_onnx.graph.boundary import Model
from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import SUBGRAPH_OPS, is_onnx, values_by_name


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


def home_of(value: ir.Value) -> ir.Graph | None:
    """The graph ``value`` is defined in."""
    node = value.producer()
    return node.graph if node is not None else value.graph


#: ops whose bodies stack a carried-out tensor over their iterations
STACKING = ("Loop", "Scan")


def _chain(main: ir.Graph, graph: ir.Graph | None, owners: dict[ir.Graph, tuple[ir.Node, str]]) -> list[ir.Node] | None:
    """The nodes holding ``graph``, innermost first, up to the main graph; None if one is not an If / Loop / Scan."""
    chain = []
    while graph is not None and graph is not main:
        node, _ = owners.get(graph, (None, None))
        if node is None or node.op_type not in SUBGRAPH_OPS or not is_onnx(node):
            return None
        chain.append(node)
        graph = node.graph
    return chain if graph is main else None


def exposable(main: ir.Graph, value: ir.Value, owners: dict[ir.Graph, tuple[ir.Node, str]] | None = None) -> bool:
    """Whether ``value`` is in the main graph or inside If / Loop / Scan bodies only (so it can be made a graph output)."""
    owners = branch_owners(main) if owners is None else owners
    return _chain(main, home_of(value), owners) is not None


def stack_depth(main: ir.Graph, graph: ir.Graph | None, owners: dict[ir.Graph, tuple[ir.Node, str]] | None = None) -> int:
    """How many Loop / Scan bodies enclose ``graph``: the leading iteration axes a carried-out tensor of it has."""
    owners = branch_owners(main) if owners is None else owners
    return sum(node.op_type in STACKING for node in _chain(main, graph, owners) or ())


def per_iteration(x: np.ndarray, depth: int) -> list[np.ndarray]:
    """The values a node saw, one per iteration, from a carried-out tensor with ``depth`` iteration axes."""
    return [x] if depth == 0 else list(x.reshape(-1, *x.shape[depth:]))


def _carry_out(main: ir.Graph, value: ir.Value, owners: dict[ir.Graph, tuple[ir.Node, str]],
               names: UniqueNames) -> ir.Value | None:
    """A main-graph output carrying ``value`` out of its subgraphs (module docstring), or None."""
    chain = _chain(main, home_of(value), owners)
    if not chain:
        return None
    inner, name = value, value.name
    dtype = value.dtype or ir.DataType.FLOAT
    graph = home_of(value)
    for node in chain:
        if node.op_type == "If":
            attr = owners[graph][1]
            other = node.attributes["else_branch" if attr == "then_branch" else "then_branch"].as_graph()
            empty = ir.node("Constant", [], {"value": ir.tensor(np.zeros(0, dtype.numpy()))},
                            name=names.node(f"{name}_empty"))
            other.append(empty)
            graph.outputs.append(value)
            other.outputs.append(empty.outputs[0])
        else:
            copy = ir.node("Identity", [value], outputs=[ir.Value(name=names.value(f"{name}_iteration"),
                                                                 type=ir.TensorType(dtype))],
                           name=names.node(f"{name}_iteration"))
            graph.append(copy)
            graph.outputs.append(copy.outputs[0])
            for attr in ("scan_output_axes", "scan_output_directions"):
                if node.op_type == "Scan" and attr in node.attributes:
                    node.attributes[attr] = ir.AttrInt64s(attr, [*node.attributes[attr].as_ints(), 0])
        node.resize_outputs(len(node.outputs) + 1)
        value = node.outputs[-1]
        value.name, value.type = names.value(f"{name}_carried"), ir.TensorType(dtype)
        graph = node.graph
    inner.name = names.value(f"{name}_inner")
    value.name = name
    return value


def with_outputs(model: Model, names: Iterable[str], typed: bool = True) -> Model:
    """Copy of ``model`` whose graph also outputs the given intermediate tensors."""
    m = boundary.working_copy(model)
    ExposeOutputsPass(names, typed)(m)
    return boundary.like(m, model)
