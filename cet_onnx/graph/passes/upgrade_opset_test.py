import onnx
import pytest
from onnx import helper

from cet_onnx.errors import RuntimeFailure
from cet_onnx.graph.passes._testing import make_model, tensor_info
from cet_onnx.graph.passes.upgrade_opset import UpgradeOpsetPass, opset_version


def _model(opset=13):
    return make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", [2])], [tensor_info("y")], opset=opset)


def test_opset_and_ir_version_are_raised():
    m = _model()
    m.ir_version = 7
    assert UpgradeOpsetPass(21)(m).modified
    assert opset_version(m) == 21 and m.ir_version == helper.find_min_ir_version_for([helper.make_opsetid("", 21)])


def test_higher_opset_is_kept():
    m = _model(21)
    m.ir_version = 10
    assert not UpgradeOpsetPass(13)(m).modified and opset_version(m) == 21


def test_failure_names_the_blocking_op():
    m = make_model([helper.make_node("Crop", ["x"], ["y"])], [tensor_info("x")], [tensor_info("y")], opset=6)
    with pytest.raises(RuntimeFailure, match="cannot convert opset 6 to 21.*op 'Crop' blocked it"):
        UpgradeOpsetPass(21, "m.onnx")(m)


def test_proto_opset_version():
    assert opset_version(onnx.ModelProto()) == 1
