import numpy as np
import pytest
from onnx import TensorProto, helper

from cet_onnx.errors import InputError
from cet_onnx.graph.passes._testing import if_model, make_model, run, tensor_info
from cet_onnx.graph.passes.fix_inputs import FixInputsPass


def test_a_scalar_input_becomes_an_initializer_and_leaves_the_inputs():
    m = if_model()
    p = FixInputsPass({"mode": "1"})
    assert p(m).modified
    assert [v.name for v in m.graph.inputs] == ["x"]
    value = m.graph.initializers["mode_fixed"].const_value.numpy()
    assert value.dtype == np.int64 and value.shape == () and int(value) == 1
    assert p.fixed["mode"][0].name == "mode" and int(p.fixed["mode"][1]) == 1
    x = np.ones((2, 4), np.float32)
    expected = run(if_model(), {"x": x, "mode": np.array(1, np.int64)})[0]
    np.testing.assert_array_equal(run(m, {"x": x})[0], expected)


def test_fixed_shape_inputs_take_every_value_and_bools_their_words():
    nodes = [helper.make_node("Add", ["x", "b"], ["y"]), helper.make_node("Not", ["f"], ["g"])]
    m = make_model(nodes, [tensor_info("x", [2]), tensor_info("b", [2]), tensor_info("f", [], TensorProto.BOOL)],
                   [tensor_info("y"), tensor_info("g")])
    p = FixInputsPass({"b": "0.5, -1", "f": "true"})
    p(m)
    np.testing.assert_array_equal(p.fixed["b"][1], np.array([0.5, -1], np.float32))
    assert p.fixed["f"][1].dtype == bool and bool(p.fixed["f"][1])


@pytest.mark.parametrize("spec, message", [
    ({"nope": "1"}, "has no input 'nope' (inputs: x, mode)"),
    ({"x": "1"}, "dynamic dimensions"),
    ({"mode": "1.5"}, "expected int64 value(s) for input 'mode'"),
    ({"mode": "1,2"}, "has shape [] (1 value(s)), got 2"),
    ({"mode": "99999999999999999999"}, "expected int64"),
])
def test_wrong_requests_are_input_errors_naming_the_input(spec, message):
    with pytest.raises(InputError, match=None) as err:
        FixInputsPass(spec)(if_model())
    assert message in str(err.value) and "--fix-input" in str(err.value)
