"""Small helpers the passes share: node placement, value lookup, taking over a value's place."""

from __future__ import annotations

from typing import Iterable

import onnx_ir as ir

#: ``node.meta`` key of the nodes a pass put in the graph's front block (not serialized)
FRONT = "cet_onnx.front"


def is_onnx(node: ir.Node) -> bool:
    """Whether ``node`` is an op of the default ONNX domain."""
    return node.domain in ("", "ai.onnx")


def insert_front(graph: ir.Graph, nodes: Iterable[ir.Node]) -> None:
    """Insert ``nodes`` before every node of the original graph, after those earlier calls inserted.

    The Q/DQ nodes of weights, biases and graph inputs read only initializers and graph
    inputs, so they can all come first, in the order the passes create them (the order the
    rewriter always emitted). The block is remembered in ``node.meta``.
    """
    nodes = list(nodes)
    for node in nodes:
        node.meta[FRONT] = True
    last = None
    for node in graph:
        if not node.meta.get(FRONT):
            break
        last = node
    if last is not None:
        graph.insert_after(last, nodes)
    elif len(graph):
        graph.insert_before(graph.node(0), nodes)
    else:
        graph.extend(nodes)


def is_constant(value: ir.Value) -> bool:
    """An initializer, or a Transpose / Cast of one (such as a tied LM head's ``Transpose(E)``):
    a weight, never an activation."""
    if value.is_initializer():
        return True
    node = value.producer()
    return (node is not None and node.op_type in ("Transpose", "Cast") and is_onnx(node) and bool(node.inputs)
            and node.inputs[0] is not None and node.inputs[0].is_initializer())


def values_by_name(graph: ir.Graph, subgraphs: bool = False) -> dict[str, ir.Value]:
    """Every named value of the main graph: inputs, initializers and node outputs (with ``subgraphs``,
    those of If / Loop / Scan bodies too, after the main graph's)."""
    found: dict[str, ir.Value] = {}
    for g in (graph, *(graph.subgraphs() if subgraphs else ())):
        for v in g.inputs:
            found.setdefault(v.name, v)
        for name, v in g.initializers.items():
            found.setdefault(name, v)
        for node in g:
            for v in node.outputs:
                if v.name:
                    found.setdefault(v.name, v)
    return found


def all_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The nodes of ``graph`` and, after each node, those of its subgraphs (at any depth)."""
    return list(ir.traversal.RecursiveGraphIterator(graph))


#: ops whose subgraphs the stages look into: If branches, Loop / Scan bodies (their tensors can be carried out
#: of the subgraph for observation, :mod:`.extra_outputs`)
SUBGRAPH_OPS = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}


def branch_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The nodes of ``graph`` and, after each If / Loop / Scan, those of its branches or body (at any depth)."""
    nodes = []
    for node in graph:
        nodes.append(node)
        if node.op_type in SUBGRAPH_OPS and is_onnx(node):
            for attr in SUBGRAPH_OPS[node.op_type]:
                if attr in node.attributes:
                    nodes.extend(branch_nodes(node.attributes[attr].as_graph()))
    return nodes


def home_graph(main: ir.Graph, value: ir.Value) -> ir.Graph:
    """The one subgraph all readers of ``value`` are in, else ``main``: where the DequantizeLinear of a weight
    (or bias) goes, since onnxruntime's QDQ fusions look for it in the graph of the node that reads it."""
    graphs = {use.node.graph for use in value.uses()}
    return graphs.pop() if len(graphs) == 1 and None not in graphs else main


def uses_in(graph: ir.Graph, value: ir.Value) -> int:
    """How many inputs of ``graph``'s own nodes read ``value`` (a node reading it twice counts twice)."""
    return sum(1 for use in value.uses() if use.node.graph is graph)


def take_over(old: ir.Value, new: ir.Value, graph: ir.Graph) -> None:
    """Let ``new`` stand where ``old`` was: every use and graph output, and ``old``'s name.

    ``old`` stops being an initializer or graph input; its name moves to ``new``. ``old`` keeps
    its name: renaming it would rename its tensor, which may be shared with a caller's proto.
    """
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if old.is_initializer():
        graph.initializers.pop(name)
    while old in graph.inputs:
        graph.inputs.remove(old)
    new.name = name


def initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    """Register ``tensor`` as a new initializer called ``name``."""
    value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def remove_node(graph: ir.Graph, node: ir.Node) -> None:
    """Take ``node`` out of ``graph``; it stops being a use of its inputs."""
    for i in range(len(node.inputs)):
        node.replace_input_with(i, None)
    graph.remove(node)


def replace_node(graph: ir.Graph, node: ir.Node, nodes: list[ir.Node]) -> None:
    """Put ``nodes`` before ``node`` and remove ``node``: the last one's first output takes over
    ``node``'s first output (its uses, graph-output place, name, type and shape)."""
    graph.insert_before(node, nodes)
    y, out = node.outputs[0], nodes[-1].outputs[0]
    y.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name, out.type, out.shape = y.name, y.type, y.shape


def remove_if_unread(graph: ir.Graph, node: ir.Node) -> bool:
    """Remove ``node`` when no node reads its first output and it is no graph output; whether it was."""
    if node.outputs[0].uses() or node.outputs[0].is_graph_output():
        return False
    graph.remove(node, safe=True)
    return True
