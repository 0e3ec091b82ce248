import numpy as np
from onnx import TensorProto, helper, numpy_helper

from cet_onnx.graph.passes._testing import if_model, make_model, ops, run, tensor_info
from cet_onnx.graph.passes.fix_inputs import FixInputsPass
from cet_onnx.graph.passes.fold_constant_if import FoldConstantIfPass, known_value

X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)


def test_an_if_on_a_fixed_input_becomes_its_taken_branch_with_its_names():
    for mode, taken, expect_ops in ((1, "then", ["Constant", "Equal", "Constant", "MatMul", "Relu"]),
                                    (0, "else", ["Constant", "Equal", "Constant", "MatMul"])):
        m = if_model()
        FixInputsPass({"mode": str(mode)})(m)
        p = FoldConstantIfPass()
        assert p(m).modified and p.folded == [("If_mode", taken)]
        assert ops(m) == expect_ops
        assert m.graph.outputs[0].name == "y" and m.graph.node(3).name == f"{taken}_MatMul"
        expected = run(if_model(), {"x": X, "mode": np.array(mode, np.int64)})[0]
        np.testing.assert_array_equal(run(m, {"x": X})[0], expected)


def test_an_if_on_a_run_time_value_stays():
    m = if_model()
    assert not FoldConstantIfPass()(m).modified and "If" in ops(m)


def test_a_branch_returning_an_outer_value_gets_an_identity():
    then = helper.make_graph([], "then", [], [tensor_info("x")])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["n"])], "else", [], [tensor_info("n")])
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="If_c")]
    m = make_model(nodes, [tensor_info("x", [2, 4])], [tensor_info("y")])
    FoldConstantIfPass()(m)
    assert ops(m) == ["Constant", "Identity"]
    np.testing.assert_array_equal(run(m, {"x": X})[0], X)


def test_known_values_are_evaluated_through_pure_ops():
    nodes = [helper.make_node("Constant", [], ["a"], value=numpy_helper.from_array(np.array([3], np.int64))),
             helper.make_node("Greater", ["a", "b"], ["g"]), helper.make_node("Not", ["g"], ["n"]),
             helper.make_node("Greater", ["a", "x_len"], ["dyn"])]
    m = make_model(nodes, [tensor_info("x_len", [1], TensorProto.INT64)], [tensor_info("n"), tensor_info("dyn")],
                   {"b": np.array([2], np.int64)})
    values = {v.name: v for node in m.graph for v in node.outputs}
    assert known_value(values["n"]).tolist() == [False]
    assert known_value(values["dyn"]) is None
