"""Small float models built with onnx.helper for the tests (real ONNX, real onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(rng, name, shape, scale=0.3):
    return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)


def small_cnn(seed: int = 0, constant_weights: bool = False, opset: int = 17) -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu + residual Add, depthwise Conv, GlobalAveragePool, Flatten, Gemm.

    Input ``x`` [N, 3, 8, 8], output ``logits`` [N, 10]. With ``constant_weights`` the Conv
    weights live in Constant nodes, as Paddle exports keep them.
    """
    rng = np.random.default_rng(seed)
    inits = [
        _init(rng, "c1.w", (8, 3, 3, 3)), _init(rng, "c1.b", (8,), 0.1),
        _init(rng, "c2.w", (8, 8, 3, 3), 0.2), _init(rng, "c2.b", (8,), 0.1),
        _init(rng, "dw.w", (8, 1, 3, 3)), _init(rng, "dw.b", (8,), 0.1),
        _init(rng, "fc.w", (10, 8), 0.5), _init(rng, "fc.b", (10,), 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["res"], name="add"),
        helper.make_node("Relu", ["res"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "dw.w", "dw.b"], ["dw"], name="dwconv", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["dw"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    if constant_weights:
        consts = [helper.make_node("Constant", [], [t.name], value=t) for t in inits if t.name.endswith(".w")]
        inits = [t for t in inits if not t.name.endswith(".w")]
        nodes = consts + nodes
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def small_mlp(seed: int = 0) -> onnx.ModelProto:
    """MatMul-Add-Relu-MatMul on ``x`` [N, 16] → ``y`` [N, 4] (weights as MatMul B operands)."""
    rng = np.random.default_rng(seed)
    inits = [_init(rng, "w1", (16, 64)), _init(rng, "b1", (64,), 0.1), _init(rng, "w2", (64, 4))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(nodes, "small_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
