"""Pass: forget the shapes and types of intermediate tensors (the graph's value_info).

Rule: every node output that is not a graph output loses its type and shape. The rewriter's
passes change what many tensors hold (a weight is now DequantizeLinear's float32 output, a
Relu's output is written by the op before it), so stale value_info could contradict the
graph; onnxruntime infers the shapes it needs. The rewriter has always done this.
"""

from __future__ import annotations

import onnx_ir as ir


class DropValueInfoPass(ir.passes.InPlacePass):
    """Clears the type and shape of every main-graph node output that is not a graph output."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            for value in node.outputs:
                if not value.is_graph_output() and (value.type is not None or value.shape is not None):
                    value.type, value.shape = None, None
                    modified = True
        return ir.passes.PassResult(model, modified=modified)
