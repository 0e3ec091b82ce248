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
