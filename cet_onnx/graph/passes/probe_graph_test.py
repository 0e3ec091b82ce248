import numpy as np
import onnx
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, tensor_info
from cet_onnx.graph.passes.probe_graph import ProbeGraphPass


def _model():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    return make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info("y")],
                      {"w1": np.ones((4, 4), np.float32), "w2": np.ones((4, 2), np.float32)})


def test_weights_become_inputs_and_layer_outputs_become_outputs():
    m = _model()
    assert ProbeGraphPass(["w1", "w2"])(m).modified
    assert [v.name for v in m.graph.inputs] == ["x", "w1", "w2"] and not m.graph.initializers
    assert m.graph.inputs[1].shape == [4, 4] and m.graph.inputs[1].type.dtype == onnx.TensorProto.FLOAT
    assert [v.name for v in m.graph.outputs] == ["y", "h"]
    assert m.graph.outputs[1].shape is None


def test_other_weights_stay_initializers():
    m = _model()
    ProbeGraphPass(["w2"])(m)
    assert list(m.graph.initializers) == ["w1"] and [v.name for v in m.graph.inputs] == ["x", "w2"]
    assert [v.name for v in m.graph.outputs] == ["y"]
