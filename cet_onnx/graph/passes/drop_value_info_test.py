from onnx import helper

from cet_onnx.graph.passes._testing import make_model, tensor_info
from cet_onnx.graph.passes.drop_value_info import DropValueInfoPass


def test_intermediate_types_are_dropped_graph_outputs_keep_theirs():
    nodes = [helper.make_node("Neg", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])]
    m = make_model(nodes, [tensor_info("x", [2])], [tensor_info("y", [2])], value_info=[tensor_info("h", [2])])
    assert DropValueInfoPass()(m).modified
    h, y = m.graph.node(0).outputs[0], m.graph.node(1).outputs[0]
    assert h.type is None and h.shape is None and y.shape == [2]
    assert not DropValueInfoPass()(m).modified
