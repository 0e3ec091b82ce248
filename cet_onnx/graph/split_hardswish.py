"""Graph pass: split HardSwish into HardSigmoid and Mul before activation quantization.

Rule: ``y = HardSwish(x)`` becomes ``h = HardSigmoid(x, alpha=1/6, beta=0.5)`` and
``y = Mul(x, h)`` — the definition of HardSwish in the ONNX spec, so the float model computes
the same values. With activations quantized, the Mul then gets Q/DQ on both inputs and
onnxruntime runs it as QLinearMul (as onnxruntime's own quantizer arranges it), instead of a
float HardSwish between a DequantizeLinear and a QuantizeLinear.
"""

from __future__ import annotations

import onnx
from onnx import helper


def decompose_hardswish(model: onnx.ModelProto) -> int:
    """Rewrite every main-graph HardSwish in place; returns how many were split."""
    nodes, count = [], 0
    for node in model.graph.node:
        if node.op_type == "HardSwish" and node.domain in ("", "ai.onnx"):
            x, y = node.input[0], node.output[0]
            base = node.name or y
            h = f"{y}_hardsigmoid"
            nodes.append(helper.make_node("HardSigmoid", [x], [h], name=f"{base}_HardSigmoid", alpha=1.0 / 6, beta=0.5))
            nodes.append(helper.make_node("Mul", [x, h], [y], name=f"{base}_Mul"))
            count += 1
        else:
            nodes.append(node)
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return count
