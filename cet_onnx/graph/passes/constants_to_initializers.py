"""Pass: move the main graph's tensor-valued ``Constant`` nodes into initializers.

Paddle exports keep weights in Constant nodes; once they are initializers they are found and
quantized like any other weight.

Rule: a ``Constant`` node of the default domain whose only attribute is ``value`` is removed
and its tensor becomes an initializer with the node's output name (appended after the existing
initializers, in node order). Everything its output fed, graph outputs included, then reads
the initializer.

onnx-ir's ``LiftConstantsToInitializersPass`` is not used because it cannot be configured to
do exactly this: it also lifts Constants inside If / Loop / Scan bodies, leaves a Constant that
is a graph output in place, and its domain check accepts ``onnx.ai`` rather than ``ai.onnx``.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from cet_onnx.graph import boundary
from cet_onnx.graph.passes._graph import initializer, is_onnx, remove_node


class ConstantsToInitializersPass(ir.passes.InPlacePass):
    """Tensor-valued main-graph Constants become initializers; ``moved`` counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.moved = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.moved = 0
        for node in list(graph):
            if node.op_type != "Constant" or not is_onnx(node) or list(node.attributes) != ["value"]:
                continue
            out = node.outputs[0]
            name = out.name
            remove_node(graph, node)
            out.name = None
            value = initializer(graph, name, node.attributes["value"].as_tensor())
            out.replace_all_uses_with(value, replace_graph_outputs=True)
            self.moved += 1
        return ir.passes.PassResult(model, modified=bool(self.moved))


def constants_to_initializers(model: onnx.ModelProto | ir.Model) -> int:
    """Run the pass on ``model`` in place (a proto too); returns how many Constants were moved."""
    p = ConstantsToInitializersPass()
    boundary.apply_in_place(model, lambda m: p(m).modified)
    return p.moved
