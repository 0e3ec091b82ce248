import numpy as np
import onnx
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, node_named, ops, run, tensor_info
from cet_onnx.graph.passes.weight_qdq import WeightQDQPass
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight

RNG = np.random.default_rng(0)


def _conv(w_shape=(4, 3, 3, 3), extra_inits=None, inputs=None):
    w = RNG.normal(size=w_shape).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    m = make_model(nodes, inputs or [tensor_info("x", [1, 3, 5, 5])], [tensor_info("y")], {"W": w, **(extra_inits or {})},
                   opset=25)
    return m, w


def _quantized(m, w, fmt):
    qw = quantize_weight(w, fmt, 0, 1)
    x = RNG.normal(size=(1, 3, 5, 5)).astype(np.float32)
    fake = make_model([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], [tensor_info("x", [1, 3, 5, 5])],
                      [tensor_info("y")], {"W": qw.dequantize()})
    WeightQDQPass({"W": qw})(m)
    np.testing.assert_allclose(run(m, {"x": x})[0], run(fake, {"x": x})[0], rtol=1e-5, atol=1e-5)
    return qw


def test_per_channel_int8_weight_becomes_packed_codes_and_dequantize():
    m, w = _conv()
    _quantized(m, w, WeightFormat(8))
    assert ops(m) == ["DequantizeLinear", "Conv"]
    dq = node_named(m, "W_DequantizeLinear")
    assert [v.name for v in dq.inputs] == ["W_quantized", "W_scale", "W_zero_point"]
    assert dq.attributes["axis"].as_int() == 0 and "block_size" not in dq.attributes
    assert dq.outputs[0].name == "W" and node_named(m, "conv").inputs[1] is dq.outputs[0]
    assert list(m.graph.initializers) == ["W_quantized", "W_scale", "W_zero_point"]
    assert m.graph.initializers["W_quantized"].const_value.dtype == onnx.TensorProto.INT8


def test_int4_blocked_weight_sets_axis_and_block_size():
    m, w = _conv((4, 8, 1, 1), inputs=[tensor_info("x", [1, 8, 5, 5])])
    qw = quantize_weight(w, WeightFormat(4, "block", 4), 0, 1)
    WeightQDQPass({"W": qw})(m)
    dq = node_named(m, "W_DequantizeLinear")
    assert dq.attributes["axis"].as_int() == 1 and dq.attributes["block_size"].as_int() == 4
    q = m.graph.initializers["W_quantized"].const_value
    assert q.dtype == onnx.TensorProto.INT4 and len(q.tobytes()) == w.size // 2


def test_int2_conv_kernel_is_dequantized_flat_and_reshaped_back():
    m, w = _conv()
    _quantized(m, w, WeightFormat(2))
    assert ops(m) == ["DequantizeLinear", "Reshape", "Conv"]
    dq, reshape = node_named(m, "W_DequantizeLinear"), node_named(m, "W_Reshape")
    assert dq.outputs[0].name == "W_dequantized_2d" and dq.attributes["block_size"].as_int() == 27
    assert [v.name for v in reshape.inputs] == ["W_dequantized_2d", "W_shape"] and reshape.outputs[0].name == "W"
    np.testing.assert_array_equal(m.graph.initializers["W_shape"].const_value.numpy(), [4, 3, 3, 3])
    assert m.graph.initializers["W_quantized"].const_value.dtype == onnx.TensorProto.INT2


def test_weight_that_was_also_a_graph_input_stops_being_one():
    m, w = _conv(inputs=[tensor_info("x", [1, 3, 5, 5]), tensor_info("W", [4, 3, 3, 3])])
    WeightQDQPass({"W": quantize_weight(w, WeightFormat(8), 0, 1)})(m)
    assert [v.name for v in m.graph.inputs] == ["x"]


def test_names_already_taken_get_a_suffix():
    m, w = _conv(extra_inits={"W_scale": np.ones(1, np.float32)})
    m.graph.node(0).name = "W_DequantizeLinear"
    WeightQDQPass({"W": quantize_weight(w, WeightFormat(8), 0, 1)})(m)
    dq = m.graph.node(0)
    assert dq.name == "W_DequantizeLinear_1"
    assert [v.name for v in dq.inputs] == ["W_quantized", "W_scale_1", "W_zero_point"]


def _widened(m, w, fmt):
    qw = quantize_weight(w, fmt, 0, 1)
    x = RNG.normal(size=(1, 3, 5, 5)).astype(np.float32)
    fake = make_model([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], [tensor_info("x", [1, 3, 5, 5])],
                      [tensor_info("y")], {"W": qw.dequantize()})
    WeightQDQPass({"W": qw}, int8_codes={"W"})(m)
    np.testing.assert_allclose(run(m, {"x": x})[0], run(fake, {"x": x})[0], rtol=1e-5, atol=1e-5)
    return qw


def test_int4_symmetric_codes_widened_for_an_int8_kernel_keep_their_bytes():
    m, w = _conv()
    qw = _widened(m, w, WeightFormat(4, symmetric=True))
    assert ops(m) == ["Cast", "Cast", "DequantizeLinear", "Conv"]
    dq = node_named(m, "W_DequantizeLinear")
    assert [v.producer().op_type for v in dq.inputs[::2]] == ["Cast", "Cast"]
    assert all(v.dtype == onnx.TensorProto.INT8 for v in dq.inputs[::2]) and dq.attributes["axis"].as_int() == 0
    stored = sum(len(v.const_value.tobytes()) for v in m.graph.initializers.values())
    assert m.graph.initializers["W_quantized"].const_value.dtype == onnx.TensorProto.INT4 and stored == qw.nbytes()


def test_conv_weight_zero_point_is_subtracted_from_the_widened_codes():
    m, w = _conv()
    qw = _widened(m, w, WeightFormat(4, symmetric=False))
    assert np.any(qw.zero_point != 0)
    assert ops(m) == ["Cast", "Cast", "Sub", "Cast", "DequantizeLinear", "Conv"]
    dq = node_named(m, "W_DequantizeLinear")
    assert len(dq.inputs) == 2 and dq.inputs[0].dtype == onnx.TensorProto.INT8   # no zero point: QLinearConv's fast path
    assert m.graph.initializers["W_zero_point"].const_value.shape == (4, 1, 1, 1)
    assert sum(len(v.const_value.tobytes()) for v in m.graph.initializers.values()) == qw.nbytes()


def test_int2_kernel_widened_is_reshaped_before_it_is_dequantized():
    m, w = _conv()
    qw = _widened(m, w, WeightFormat(2, symmetric=False))
    assert ops(m) == ["Cast", "Reshape", "Cast", "Sub", "Cast", "DequantizeLinear", "Conv"]
    assert m.graph.initializers["W_quantized"].const_value.shape == (4, 27)   # the bytes of the plain INT2 form
    assert sum(len(v.const_value.tobytes()) for v in m.graph.initializers.values()) == qw.nbytes()


def test_int8_kernel_weights_are_per_channel_narrow_weights_of_conv_matmul_gemm_only():
    from cet_onnx.graph.passes.weight_qdq import int8_kernel_weights

    m, w = _conv()
    per_channel = {"W": quantize_weight(w, WeightFormat(4), 0, 1)}
    assert int8_kernel_weights(m.graph, per_channel, ()) == {"W"}
    assert int8_kernel_weights(m.graph, per_channel, {"W"}) == set()
    assert int8_kernel_weights(m.graph, {"W": quantize_weight(w, WeightFormat(8), 0, 1)}, ()) == set()
    m2, w2 = _conv((4, 8, 1, 1), inputs=[tensor_info("x", [1, 8, 5, 5])])
    assert int8_kernel_weights(m2.graph, {"W": quantize_weight(w2, WeightFormat(4, "block", 4), 0, 1)}, ()) == set()


def test_per_tensor_conv_zero_point_is_subtracted_too():
    w = np.abs(RNG.normal(size=(4, 3, 3, 3))).astype(np.float32) + 0.5   # all positive: a non-zero zero point
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    m = make_model(nodes, [tensor_info("x", [1, 3, 5, 5])], [tensor_info("y")], {"W": w}, opset=25)
    qw = _widened(m, w, WeightFormat(4, "tensor", symmetric=False))
    assert np.any(qw.zero_point != 0)
    assert ops(m) == ["Cast", "Cast", "Sub", "Cast", "DequantizeLinear", "Conv"]
    assert m.graph.initializers["W_zero_point"].const_value.shape == (1, 1, 1, 1)
    assert sum(len(v.const_value.tobytes()) for v in m.graph.initializers.values()) == qw.nbytes()
