"""Small graphs for the pass tests: built with ``onnx.helper``, handed over as ``ir.Model``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper


def tensor_info(name: str, shape=None, elem=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, value_info=()) -> ir.Model:
    """An ``ir.Model`` of the given nodes; ``initializers`` maps names to numpy arrays."""
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in dict(initializers).items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits, value_info=list(value_info))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.serde.deserialize_model(proto)


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def node_named(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def run(model: ir.Model, feed: dict) -> list[np.ndarray]:
    """Outputs of ``model`` in onnxruntime (CPU, no graph optimisation)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]).run(None, feed)


W_THEN = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
W_ELSE = np.arange(12, dtype=np.float32).reshape(4, 3)[::-1].copy() / 7 - 0.8


def if_model(then_weight=W_THEN, else_weight=W_ELSE, opset: int = 17) -> ir.Model:
    """``y = If(Equal(mode, 1), x @ W1 → Relu, x @ W2)``: inputs ``x [N, 4]`` and a scalar ``mode: int64``, each
    branch's weight a ``Constant`` node inside it (``then_w`` / ``else_w``)."""
    def branch(tag: str, weight: np.ndarray, relu: bool) -> onnx.GraphProto:
        nodes = [helper.make_node("Constant", [], [f"{tag}_w"], value=numpy_helper.from_array(weight)),
                 helper.make_node("MatMul", ["x", f"{tag}_w"], [f"{tag}_mm" if relu else f"{tag}_y"],
                                  name=f"{tag}_MatMul")]
        if relu:
            nodes.append(helper.make_node("Relu", [f"{tag}_mm"], [f"{tag}_y"]))
        return helper.make_graph(nodes, tag, [], [tensor_info(f"{tag}_y", None)])

    nodes = [helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, np.int64))),
             helper.make_node("Equal", ["mode", "one"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", then_weight, True),
                              else_branch=branch("else", else_weight, False), name="If_mode")]
    return make_model(nodes, [tensor_info("x", ["N", 4]), tensor_info("mode", [], TensorProto.INT64)],
                      [tensor_info("y", ["N", 3])], opset=opset)
