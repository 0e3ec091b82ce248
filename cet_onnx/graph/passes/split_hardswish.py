"""Pass: split HardSwish into HardSigmoid and Mul before activation quantization.

Rule: ``y = HardSwish(x)`` (default domain, main graph) becomes
``{y}_hardsigmoid = HardSigmoid(x, alpha=1/6, beta=0.5)`` (node ``{base}_HardSigmoid``) and
``y = Mul(x, {y}_hardsigmoid)`` (node ``{base}_Mul``), where ``base`` is the HardSwish's name
or else ``y``; names already taken get a numeric suffix. This is the definition of HardSwish in
the ONNX spec, so the float model computes the same values. With activations quantized, the Mul
then gets Q/DQ on both inputs and onnxruntime runs it as QLinearMul (as onnxruntime's own
quantizer arranges it), instead of a float HardSwish between a DequantizeLinear and a
QuantizeLinear.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from cet_onnx.graph import boundary
from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import is_onnx, remove_node, take_over


class SplitHardSwishPass(ir.passes.InPlacePass):
    """Every main-graph HardSwish becomes HardSigmoid → Mul; ``count`` says how many."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = UniqueNames(graph)
        self.count = 0
        for node in list(graph):
            if node.op_type != "HardSwish" or not is_onnx(node):
                continue
            x, y = node.inputs[0], node.outputs[0]
            base = node.name or y.name
            h = ir.Value(name=names.value(f"{y.name}_hardsigmoid"))
            hsig = ir.node("HardSigmoid", [x], {"alpha": 1.0 / 6, "beta": 0.5}, outputs=[h],
                           name=names.node(f"{base}_HardSigmoid"))
            mul = ir.node("Mul", [x, h], name=names.node(f"{base}_Mul"))
            graph.insert_before(node, [hsig, mul])
            remove_node(graph, node)
            out = mul.outputs[0]
            out.type, out.shape, out.doc_string = y.type, y.shape, y.doc_string
            take_over(y, out, graph)
            self.count += 1
        return ir.passes.PassResult(model, modified=bool(self.count))


def decompose_hardswish(model: onnx.ModelProto | ir.Model) -> int:
    """Split every main-graph HardSwish of ``model`` in place (a proto too); returns how many."""
    p = SplitHardSwishPass()
    boundary.apply_in_place(model, lambda m: p(m).modified)
    return p.count
