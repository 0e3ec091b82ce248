import numpy as np
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, ops, tensor_info
from cet_onnx.graph.passes.fold_relu import FoldReluPass, foldable_relus

W = np.ones((4, 4), np.float32)


def _model(producer="MatMul", outputs=("y",), extra=()):
    nodes = [helper.make_node(producer, ["x", "w"], ["h"], name="p"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Neg", ["r"], ["y"]), *extra]
    return make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info(o) for o in outputs], {"w": W},
                      value_info=[tensor_info("r", [1, 4])])


def test_relu_after_a_weight_op_or_add_is_folded_into_its_producer():
    for producer in ("MatMul", "Add", "Gemm"):
        m = _model(producer)
        assert len(foldable_relus(m.graph)) == 1
        p = FoldReluPass()
        assert p(m).modified and p.folded == 1
        assert ops(m) == [producer, "Neg"]
        out = m.graph.node(0).outputs[0]
        assert out.name == "r" and out.shape == [1, 4] and m.graph.node(1).inputs[0] is out


def test_relu_after_another_op_stays():
    nodes = [helper.make_node("Sigmoid", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    m = make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info("y")])
    assert not FoldReluPass()(m).modified and ops(m) == ["Sigmoid", "Relu"]


def test_relu_stays_when_its_input_has_another_reader_or_is_a_graph_output():
    assert not foldable_relus(_model(extra=[helper.make_node("Neg", ["h"], ["z"])], outputs=("y", "z")).graph)
    assert not foldable_relus(_model(outputs=("y", "h")).graph)


def test_relu_output_that_is_a_graph_output_keeps_its_place():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    m = make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info("y", [1, 4])], {"w": W})
    FoldReluPass()(m)
    assert ops(m) == ["MatMul"] and m.graph.outputs[0].name == "y" and m.graph.outputs[0].producer() is m.graph.node(0)


def test_with_a_plan_only_relus_whose_output_is_planned_fold():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Neg", ["r2"], ["y"])]
    m = make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info("y")], {"w": W})
    p = FoldReluPass(planned={"r2"})
    p(m)
    assert p.folded == 1 and ops(m) == ["MatMul", "Relu", "MatMul", "Neg"]
    assert m.graph.node(1).outputs[0].name == "r1"


def test_with_activation_ops_a_relu_stays_where_its_quantizer_would_be_dropped():
    """MatMul → Add → Relu → MatMul with both MatMuls fused into MatMulNBits (``keep_after``): the activation
    pass drops the pair on the Relu output (its only reader takes float), so the Relu must stay."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="m1"), helper.make_node("Add", ["h", "w"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "w"], ["y"], name="m2")]
    ops_ = {"MatMul", "Add", "Relu"}

    def relus(keep):
        m = make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info("y")], {"w": W})
        return foldable_relus(m.graph, keep, planned={"r"}, activation_ops=ops_)

    assert relus({"m1", "m2"}) == []                   # its only reader reads float: nothing would clamp it
    assert len(relus({"m1"})) == 1                      # the second MatMul reads it dequantized: folded
    m = make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info("y")], {"w": W})
    assert len(foldable_relus(m.graph, {"m1", "m2"}, planned={"r"})) == 1   # without activation_ops: the old rule


def test_with_activation_ops_a_relu_after_a_weight_op_folds_when_any_reader_is_not_float():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="m1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Neg", ["r"], ["y"], name="neg")]
    m = make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info("y")], {"w": W})
    assert len(foldable_relus(m.graph, (), planned={"r"}, activation_ops={"MatMul"})) == 1   # Neg reads it dequantized
    m = make_model(nodes[:2], [tensor_info("x", [1, 4])], [tensor_info("r", [1, 4])], {"w": W})
    assert foldable_relus(m.graph, (), planned={"r"}, activation_ops={"MatMul"}) == []       # a graph output stays float
