import numpy as np
from onnx import helper

from cet_onnx.graph import boundary
from cet_onnx.graph.passes._testing import make_model, tensor_info
from cet_onnx.graph.weights import find_weights, subgraph_weights


def test_find_weights_reads_an_ir_model_like_a_proto():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1, name="fc"), helper.make_node("Add", ["h", "w2"], ["y"])]
    m = make_model(nodes, [tensor_info("x", [1, 3])], [tensor_info("y")],
                   {"w": np.ones((4, 3), np.float32), "w2": np.ones(4, np.float32)})
    weights, skipped = find_weights(m)
    assert [(w.name, w.shape, w.channel_axis, w.reduction_axis, w.consumers) for w in weights] == [
        ("w", (4, 3), 0, 1, ["fc"])] and not skipped
    proto = boundary.to_proto(m, helper.make_model(helper.make_graph([], "g", [], [])))
    assert repr(find_weights(proto)) == repr((weights, skipped))
    assert subgraph_weights(m) == []
