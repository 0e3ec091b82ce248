"""Pass: keep only the part of the graph after some weights — a suffix model for downstream-only probes.

Rules:

* a node is *downstream* when it reads one of the named weight initializers, or a tensor a
  downstream node writes; of those, only the nodes that the named ``output`` depends on are kept;
* every tensor a kept node reads that no kept node writes and that is not an initializer is the
  **cut**: it becomes a graph input (the model's own inputs stay inputs where a kept node reads
  them), in the order the kept nodes first read it; its type and shape are kept;
* ``output`` is the only graph output; the other nodes and the initializers no kept node reads go;
* a graph with If / Loop / Scan nodes, a name that is not an initializer, and an ``output`` that
  none of the weights reaches are errors (:class:`NotDownstream`): the caller runs the whole model.

A probe perturbs one weight; everything before that weight's layer computes what it always
computes. With the cut tensors of the probe batches computed once, the probe runs only the suffix:
on a CNN about half the model on average. The cut tensors come from the whole model, the suffix
computes the rest, so its loss is compared with the suffix's own unperturbed loss (onnxruntime may
fuse the two differently).
"""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir

from cet_onnx.graph.passes._graph import SUBGRAPH_OPS


class NotDownstream(ValueError):
    """The graph has no suffix model for these weights (see the module docstring)."""


def downstream_cut(graph: ir.Graph, weights: Sequence[str], output: str) -> tuple[list[ir.Node], list[ir.Value]]:
    """(the kept nodes in graph order, the cut values) for ``weights`` and ``output`` (module docstring)."""
    if any(n.op_type in SUBGRAPH_OPS or any(a.type == ir.AttributeType.GRAPH for a in n.attributes.values())
           for n in graph):
        raise NotDownstream("the graph has subgraphs")
    inits = graph.initializers
    missing = [w for w in weights if w not in inits]
    if missing:
        raise NotDownstream(f"'{missing[0]}' is not an initializer")
    reached = {id(inits[w]) for w in weights}
    below = []
    for node in graph:
        if any(v is not None and id(v) in reached for v in node.inputs):
            below.append(node)
            reached.update(id(v) for v in node.outputs)
    target = next((v for n in below for v in n.outputs if v.name == output), None)
    if target is None:
        raise NotDownstream(f"'{output}' does not depend on {', '.join(weights)}")
    needed, wanted = [], {id(target)}
    for node in reversed(below):
        if any(id(v) in wanted for v in node.outputs):
            needed.append(node)
            wanted.update(id(v) for v in node.inputs if v is not None)
    needed.reverse()
    written = {id(v) for n in needed for v in n.outputs}
    cut, seen = [], set()
    for node in needed:
        for v in node.inputs:
            if v is not None and id(v) not in written and not v.is_initializer() and id(v) not in seen:
                seen.add(id(v))
                cut.append(v)
    return needed, cut


class DownstreamPass(ir.passes.InPlacePass):
    """Cuts the graph down to what ``output`` computes after ``weights`` (see the module docstring).

    After the call, :attr:`cut` holds the names of the new graph inputs.
    """

    def __init__(self, weights: Sequence[str], output: str) -> None:
        super().__init__()
        self.weights = list(weights)
        self.output = output
        self.cut: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        needed, cut = downstream_cut(graph, self.weights, self.output)
        kept = {id(n) for n in needed}
        fresh = {}   # a cut tensor some removed node writes → the new graph input that takes its place
        for old in cut:
            if not old.is_graph_input():
                fresh[id(old)] = new = ir.Value(type=old.type, shape=old.shape)
                for node, index in list(old.uses()):
                    if id(node) in kept:
                        node.replace_input_with(index, new)
        target = next(v for n in needed for v in n.outputs if v.name == self.output)
        graph.outputs.clear()
        graph.outputs.append(target)
        graph.remove([n for n in graph if id(n) not in kept], safe=False)
        graph.inputs.clear()
        for old in cut:
            value = fresh.get(id(old), old)
            value.name = old.name   # free now that its writer is gone
            graph.inputs.append(value)
        used = {id(v) for n in needed for v in n.inputs if v is not None}
        for name in [n for n, v in graph.initializers.items() if id(v) not in used]:
            graph.initializers.pop(name)
        self.cut = [v.name for v in graph.inputs]
        return ir.passes.PassResult(model, modified=True)
