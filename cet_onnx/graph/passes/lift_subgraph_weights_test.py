import numpy as np
from onnx import helper, numpy_helper

from cet_onnx.graph.passes._testing import W_ELSE, W_THEN, if_model, make_model, run, tensor_info
from cet_onnx.graph.passes.lift_subgraph_weights import LiftSubgraphWeightsPass

X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)


def _branches(m):
    node = next(n for n in m.graph if n.op_type == "If")
    return node.attributes["then_branch"].as_graph(), node.attributes["else_branch"].as_graph()


def test_constant_weights_of_both_branches_become_main_initializers_with_their_names():
    m = if_model()
    before = [run(m, {"x": X, "mode": np.array(k, np.int64)})[0] for k in (0, 1)]
    p = LiftSubgraphWeightsPass()
    assert p(m).modified and p.lifted == {"then_w": "then_w", "else_w": "else_w"}
    np.testing.assert_array_equal(m.graph.initializers["then_w"].const_value.numpy(), W_THEN)
    then, other = _branches(m)
    assert [n.op_type for n in then] == ["MatMul", "Relu"] and [n.op_type for n in other] == ["MatMul"]
    assert then.node(0).inputs[1] is m.graph.initializers["then_w"]
    after = [run(m, {"x": X, "mode": np.array(k, np.int64)})[0] for k in (0, 1)]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_subgraph_initializer_is_lifted_and_a_name_taken_elsewhere_gets_a_suffix():
    body = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y_then"])], "then", [],
                             [tensor_info("y_then")], [numpy_helper.from_array(W_THEN, "w")])
    other = helper.make_graph([helper.make_node("Neg", ["w"], ["y_else"])], "else", [], [tensor_info("y_else")])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other)]
    m = make_model(nodes, [tensor_info("x", [2, 4]), tensor_info("c", [], 9)], [tensor_info("y")],
                   {"w": np.zeros((4, 3), np.float32)})
    p = LiftSubgraphWeightsPass()
    p(m)
    assert p.lifted == {"w_1": "w"} and "w_1" in m.graph.initializers
    np.testing.assert_allclose(run(m, {"x": X, "c": np.array(True)})[0], X @ W_THEN, rtol=1e-6)


def test_non_float_constants_branch_outputs_and_non_weight_inputs_stay():
    shape = helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([3, 4], np.int64)))
    then = helper.make_graph([helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(W_THEN)),
                              helper.make_node("Add", ["x", "x"], ["y_then"])], "then", [],
                             [tensor_info("y_then"), tensor_info("t")])
    other = helper.make_graph([shape, helper.make_node("Reshape", ["x", "s"], ["r"]),
                               helper.make_node("Transpose", ["r"], ["y_else"]),
                               helper.make_node("Identity", ["x"], ["t2"])], "else", [],
                              [tensor_info("y_else"), tensor_info("t2")])
    m = make_model([helper.make_node("If", ["c"], ["y", "t_out"], then_branch=then, else_branch=other)],
                   [tensor_info("x", [3, 4]), tensor_info("c", [], 9)], [tensor_info("y"), tensor_info("t_out")])
    assert not LiftSubgraphWeightsPass()(m).modified
