import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, tensor_info
from cet_onnx.graph.passes.weight_placeholders import PLACEHOLDER, WeightPlaceholdersPass


def _model():
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.array([1.0, -1.0], np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    return make_model(nodes, [tensor_info("x", [1, 3])], [tensor_info("y", [1, 2])], {"w": w, "b": b}), w, b


def test_the_weight_comes_from_the_caller_the_rest_from_the_model():
    m, w, b = _model()
    assert WeightPlaceholdersPass(["w"])(m).modified
    t = m.graph.initializers["w"].const_value
    assert isinstance(t, ir.ExternalTensor) and t.location == PLACEHOLDER and t.shape == [3, 2]
    assert [v.name for v in m.graph.inputs] == ["x"]                # still an initializer, not an input
    other = 2 * w
    so = ort.SessionOptions()
    so.add_external_initializers(["w"], [ort.OrtValue.ortvalue_from_numpy(other)])
    sess = ort.InferenceSession(ir.to_proto(m).SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ other + b)


def test_an_unknown_name_is_an_error():
    m, _, _ = _model()
    with pytest.raises(ValueError, match="'v' is not an initializer"):
        WeightPlaceholdersPass(["v"])(m)
