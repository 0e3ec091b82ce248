"""Pass: fold a Relu into the QuantizeLinear that follows it (unsigned activations only).

Rule: a default-domain ``Relu`` whose input ``x`` is produced by a Conv / ConvTranspose / Gemm /
MatMul / Add, read by nothing else and not a graph output, is removed; ``x``'s producer then
writes the Relu's output tensor directly (its name, type and graph-output place). The
QuantizeLinear that the activation pass puts on that tensor, with zero point 0, clamps negatives
exactly as Relu did — which is what lets onnxruntime fuse Conv+Relu into one QLinearConv. The
composition runs this pass only when every activation is unsigned, keeps the Relus after
MatMuls fused into ``MatMulNBits`` (``keep_after``: their output gets no QuantizeLinear), and
with ``planned`` folds only the Relus whose output is one of those tensors (a Relu whose output
stays float must stay: nothing else would clamp it).
"""

from __future__ import annotations

from typing import Collection

import onnx_ir as ir

from cet_onnx.graph.passes._graph import is_onnx, remove_node, uses_in

RELU_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"})


def foldable_relus(graph: ir.Graph, keep_after: Collection[str] = (),
                   planned: Collection[str] | None = None) -> list[ir.Node]:
    """The Relu nodes the rule removes, in graph order; not those after a node named in ``keep_after``,
    and with ``planned`` only those whose output is in it."""
    found = []
    for node in graph:
        if node.op_type != "Relu" or not is_onnx(node):
            continue
        if planned is not None and node.outputs[0].name not in planned:
            continue
        x = node.inputs[0]
        p = x.producer() if x is not None else None
        if p is None or p.graph is not graph or p.op_type not in RELU_PRODUCERS or p.name in keep_after:
            continue
        if x.is_graph_output() or uses_in(graph, x) != 1:
            continue
        found.append(node)
    return found


class FoldReluPass(ir.passes.InPlacePass):
    """Removes the Relus of :func:`foldable_relus`; ``folded`` counts them."""

    def __init__(self, keep_after: Collection[str] = (), planned: Collection[str] | None = None) -> None:
        super().__init__()
        self.folded = 0
        self.keep_after = keep_after
        self.planned = None if planned is None else frozenset(planned)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        relus = foldable_relus(graph, self.keep_after, self.planned)
        for relu in relus:
            x, y = relu.inputs[0], relu.outputs[0]
            remove_node(graph, relu)
            name = y.name
            y.replace_all_uses_with(x, replace_graph_outputs=True)
            y.name = None
            x.name, x.type, x.shape, x.doc_string = name, y.type, y.shape, y.doc_string
        self.folded = len(relus)
        return ir.passes.PassResult(model, modified=bool(relus))
