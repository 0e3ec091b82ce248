import numpy as np
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, node_named, ops, run, tensor_info
from cet_onnx.graph.passes.split_hardswish import SplitHardSwishPass


def _model(name="hs", extra=()):
    nodes = [helper.make_node("HardSwish", ["x"], ["y"], name=name), *extra]
    return make_model(nodes, [tensor_info("x", [2, 8])], [tensor_info("y", [2, 8])])


def test_hardswish_becomes_hardsigmoid_and_mul_with_the_same_values():
    m = _model()
    x = np.linspace(-5, 5, 16, dtype=np.float32).reshape(2, 8)
    ref = run(m, {"x": x})[0]
    p = SplitHardSwishPass()
    assert p(m).modified and p.count == 1
    assert ops(m) == ["HardSigmoid", "Mul"]
    hs = node_named(m, "hs_HardSigmoid")
    assert hs.outputs[0].name == "y_hardsigmoid"
    assert abs(hs.attributes["alpha"].as_float() - 1 / 6) < 1e-7 and hs.attributes["beta"].as_float() == 0.5
    mul = node_named(m, "hs_Mul")
    assert [v.name for v in mul.inputs] == ["x", "y_hardsigmoid"] and m.graph.outputs[0] is mul.outputs[0]
    assert mul.outputs[0].name == "y"
    np.testing.assert_allclose(run(m, {"x": x})[0], ref, rtol=1e-6, atol=1e-6)


def test_unnamed_node_is_named_after_its_output():
    m = _model(name="")
    SplitHardSwishPass()(m)
    assert [n.name for n in m.graph] == ["y_HardSigmoid", "y_Mul"]


def test_names_already_taken_get_a_suffix():
    taken = [helper.make_node("Relu", ["x"], ["y_hardsigmoid"], name="hs_Mul")]
    nodes = [*taken, helper.make_node("HardSwish", ["x"], ["y"], name="hs")]
    m = make_model(nodes, [tensor_info("x", [2, 8])], [tensor_info("y"), tensor_info("y_hardsigmoid")])
    SplitHardSwishPass()(m)
    assert [n.name for n in m.graph] == ["hs_Mul", "hs_HardSigmoid", "hs_Mul_1"]
    assert node_named(m, "hs_HardSigmoid").outputs[0].name == "y_hardsigmoid_1"


def test_nothing_to_split():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", [2])], [tensor_info("y")])
    p = SplitHardSwishPass()
    assert not p(m).modified and p.count == 0
