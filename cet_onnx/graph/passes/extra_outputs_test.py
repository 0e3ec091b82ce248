import onnx
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, tensor_info
from cet_onnx.graph.passes.extra_outputs import ExposeOutputsPass, with_outputs


def _model():
    nodes = [helper.make_node("Neg", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["g"]),
             helper.make_node("Neg", ["g"], ["y"])]
    return make_model(nodes, [tensor_info("x", [2])], [tensor_info("y")], value_info=[tensor_info("h", [2])])


def test_named_tensors_become_outputs_with_their_value_info_or_as_float():
    m = _model()
    assert ExposeOutputsPass(["h", "g", "y", "h"])(m).modified
    assert [v.name for v in m.graph.outputs] == ["y", "h", "g"]
    assert m.graph.outputs[1].shape == [2] and m.graph.outputs[2].shape is None
    assert m.graph.outputs[2].type.dtype == onnx.TensorProto.FLOAT


def test_untyped_keeps_only_a_known_element_type():
    m = _model()
    ExposeOutputsPass(["h", "g"], typed=False)(m)
    h, g = m.graph.outputs[1:]
    assert h.shape is None and h.type.dtype == onnx.TensorProto.FLOAT and g.type is None


def test_proto_gives_a_proto_copy():
    proto = onnx.helper.make_model(onnx.helper.make_graph([helper.make_node("Neg", ["x"], ["h"]),
                                                           helper.make_node("Neg", ["h"], ["y"])], "g",
                                                          [tensor_info("x", [2])], [tensor_info("y")]))
    out = with_outputs(proto, ["h"])
    assert [o.name for o in out.graph.output] == ["y", "h"] and [o.name for o in proto.graph.output] == ["y"]
