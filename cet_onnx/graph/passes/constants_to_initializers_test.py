import numpy as np
import onnx
from onnx import helper, numpy_helper

from cet_onnx.graph.passes._testing import make_model, ops, tensor_info
from cet_onnx.graph.passes.constants_to_initializers import ConstantsToInitializersPass, constants_to_initializers

W = np.arange(6, dtype=np.float32).reshape(2, 3)


def _const(name, value=W, **attrs):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value), **attrs)


def test_tensor_constant_becomes_initializer_after_existing_ones():
    m = make_model([_const("w"), helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor_info("x", [1, 2])],
                   [tensor_info("y")], {"b": np.zeros(3, np.float32)})
    p = ConstantsToInitializersPass()
    assert p(m).modified and p.moved == 1
    assert ops(m) == ["MatMul"] and list(m.graph.initializers) == ["b", "w"]
    np.testing.assert_array_equal(m.graph.initializers["w"].const_value.numpy(), W)
    assert m.graph.node(0).inputs[1] is m.graph.initializers["w"]


def test_non_tensor_constants_and_other_domains_stay():
    nodes = [helper.make_node("Constant", [], ["s"], value_ints=[1, 2]),
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(W), domain="custom"),
             helper.make_node("Concat", ["s", "c"], ["y"], axis=0)]
    m = make_model(nodes, [], [tensor_info("y")])
    assert not ConstantsToInitializersPass()(m).modified
    assert ops(m) == ["Constant", "Constant", "Concat"]


def test_constant_that_is_a_graph_output_moves_too():
    m = make_model([_const("y")], [], [tensor_info("y", [2, 3])])
    assert constants_to_initializers(m) == 1
    assert m.graph.outputs[0] is m.graph.initializers["y"] and not len(m.graph)


def test_proto_is_edited_in_place():
    proto = helper.make_model(helper.make_graph([_const("w"), helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                                [tensor_info("x", [1, 2])], [tensor_info("y", [1, 3])]),
                              opset_imports=[helper.make_opsetid("", 17)])
    assert constants_to_initializers(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["MatMul"]
    assert [t.name for t in proto.graph.initializer] == ["w"]
    onnx.checker.check_model(proto)
