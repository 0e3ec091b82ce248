"""Pass: fold a Relu into the QuantizeLinear that follows it (unsigned activations only).

Rule: a default-domain ``Relu`` whose input ``x`` is produced by a Conv / ConvTranspose / Gemm /
MatMul / Add, read by nothing else and not a graph output, is removed; ``x``'s producer then
writes the Relu's output tensor directly (its name, type and graph-output place). The
QuantizeLinear that the activation pass puts on that tensor, with zero point 0, clamps negatives
exactly as Relu did — which is what lets onnxruntime fuse Conv+Relu into one QLinearConv. The
composition runs this pass only when every activation is unsigned, keeps the Relus after
MatMuls fused into ``MatMulNBits`` (``keep_after``: their output gets no QuantizeLinear), and
with ``planned`` folds only the Relus whose output is one of those tensors (a Relu whose output
stays float must stay: nothing else would clamp it). With ``activation_ops`` (the ops whose inputs
the activation pass reads dequantized) a planned Relu output must also keep its pair: the
activation pass drops a pair nothing reads dequantized, so a Relu whose every reader is a
``keep_after`` node (``MatMul + Add + Relu → MatMulNBits`` chains: the next MatMul reads float)
or outside ``activation_ops`` stays, unless its producer is a weight op (whose output every reader
takes dequantized) — and a Relu whose output is a graph output stays too (graph outputs stay float).
"""

from __future__ import annotations

from typing import Collection

import onnx_ir as ir

from cet_onnx.graph.passes._graph import is_onnx, remove_node, uses_in

RELU_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"})
#: ops whose first output the activation pass hands dequantized to every reader
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def foldable_relus(graph: ir.Graph, keep_after: Collection[str] = (),
                   planned: Collection[str] | None = None,
                   activation_ops: Collection[str] | None = None) -> list[ir.Node]:
    """The Relu nodes the rule removes, in graph order; not those after a node named in ``keep_after``,
    with ``planned`` only those whose output is in it, and with ``activation_ops`` only those whose
    output keeps its Q/DQ pair (module docstring)."""
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
        if activation_ops is not None and not _read_dequantized(node.outputs[0], p, keep_after, activation_ops):
            continue
        found.append(node)
    return found


def _read_dequantized(y: ir.Value, producer: ir.Node, float_readers: Collection[str],
                      activation_ops: Collection[str]) -> bool:
    """Whether the activation pass keeps the pair on ``y`` once ``producer`` writes it: some reader outside
    ``float_readers`` takes the dequantized value, and ``y`` is no graph output."""
    if y.is_graph_output():
        return False
    readers = [n for n, _ in y.uses() if n.name not in float_readers]
    if producer.op_type in WEIGHT_OPS:
        return bool(readers)
    return any(n.op_type in activation_ops and is_onnx(n) for n in readers)


class FoldReluPass(ir.passes.InPlacePass):
    """Removes the Relus of :func:`foldable_relus`; ``folded`` counts them."""

    def __init__(self, keep_after: Collection[str] = (), planned: Collection[str] | None = None,
                 activation_ops: Collection[str] | None = None) -> None:
        super().__init__()
        self.folded = 0
        self.keep_after = keep_after
        self.planned = None if planned is None else frozenset(planned)
        self.activation_ops = activation_ops

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        relus = foldable_relus(graph, self.keep_after, self.planned, self.activation_ops)
        for relu in relus:
            x, y = relu.inputs[0], relu.outputs[0]
            remove_node(graph, relu)
            name = y.name
            y.replace_all_uses_with(x, replace_graph_outputs=True)
            y.name = None
            x.name, x.type, x.shape, x.doc_string = name, y.type, y.shape, y.doc_string
        self.folded = len(relus)
        return ir.passes.PassResult(model, modified=bool(relus))
