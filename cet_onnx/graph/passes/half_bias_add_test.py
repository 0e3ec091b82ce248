import numpy as np
from onnx import TensorProto, helper

from cet_onnx.graph.passes._testing import make_model, ops, run, tensor_info
from cet_onnx.graph.passes.half_bias_add import HalfBiasAddPass
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight

HALF = TensorProto.FLOAT16


def _conv(bias_dtype=np.float16):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float16)
    b = (100 * rng.normal(size=4)).astype(bias_dtype)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return make_model(nodes, [tensor_info("x", [1, 3, 5, 5], HALF)], [tensor_info("y", [1, 4, 5, 5], HALF)],
                      {"w": w, "b": b}), w, b


def _quantized(w):
    return {"w": quantize_weight(w.astype(np.float32), WeightFormat(8, "channel"))}


def test_the_bias_is_added_after_the_conv_and_the_output_keeps_its_name():
    m, w, _ = _conv()
    x = np.random.default_rng(1).normal(size=(1, 3, 5, 5)).astype(np.float16)
    (before,) = run(m, {"x": x})
    assert HalfBiasAddPass(_quantized(w), {"x"})(m).modified
    assert ops(m) == ["Conv", "Add"]
    conv, add = list(m.graph)
    assert len(conv.inputs) == 2 and add.outputs[0].name == "y" and add.outputs[0].is_graph_output()
    assert m.graph.initializers["b_broadcast"].const_value.shape == [4, 1, 1]
    np.testing.assert_allclose(run(m, {"x": x})[0].astype(np.float32), before.astype(np.float32), rtol=1e-2, atol=0.5)


def test_float32_biases_and_unquantized_convs_are_left_alone():
    m32, w, _ = _conv(np.float32)
    assert not HalfBiasAddPass(_quantized(w), {"x"})(m32).modified
    m, w, _ = _conv()
    assert not HalfBiasAddPass(_quantized(w), set())(m).modified      # input without activation Q/DQ
    assert not HalfBiasAddPass({}, {"x"})(m).modified                 # float weight
    assert ops(m) == ["Conv"]


def test_a_1d_conv_bias_broadcasts_over_its_one_spatial_axis():
    w = np.ones((4, 3, 3), np.float16)
    m = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1])],
                   [tensor_info("x", [1, 3, 5], HALF)], [tensor_info("y", [1, 4, 5], HALF)],
                   {"w": w, "b": np.arange(4, dtype=np.float16)})
    x = np.ones((1, 3, 5), np.float16)
    (before,) = run(m, {"x": x})
    HalfBiasAddPass(_quantized(w), {"x"})(m)
    assert m.graph.initializers["b_broadcast"].const_value.shape == [4, 1]
    np.testing.assert_array_equal(run(m, {"x": x})[0], before)
