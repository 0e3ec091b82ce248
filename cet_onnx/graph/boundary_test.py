import onnx
from onnx import helper

from cet_onnx.graph import boundary
from cet_onnx.graph.passes._testing import tensor_info


def _proto():
    g = helper.make_graph([helper.make_node("Neg", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])], "g",
                          [tensor_info("x", [2])], [tensor_info("y")], value_info=[tensor_info("h", [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="")
    onnx.helper.set_model_props(m, {"b": "1", "a": "2"})
    return m


def test_unchanged_model_comes_back_byte_identical():
    m = _proto()
    assert boundary.to_proto(boundary.to_ir(m), m).SerializeToString() == m.SerializeToString()


def test_value_info_of_untyped_values_is_dropped():
    m = _proto()
    model = boundary.to_ir(m)
    model.graph.node(0).outputs[0].shape = None
    model.graph.node(0).outputs[0].type = None
    assert not boundary.to_proto(model, m).graph.value_info


def test_like_gives_back_the_kind_it_got():
    m = _proto()
    model = boundary.to_ir(m)
    assert boundary.like(model, model) is model and isinstance(boundary.like(model, m), onnx.ModelProto)
