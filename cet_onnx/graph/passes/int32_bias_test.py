import numpy as np
import onnx
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, node_named, tensor_info
from cet_onnx.graph.passes.int32_bias import Int32BiasPass
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.quant.quantizer import WeightFormat, activation_params, quantize_weight

RNG = np.random.default_rng(2)
W = RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)
B = np.array([0.5, -0.25, 1.0, 0.0], np.float32)
INFO = [WeightInfo("W", W.shape, "Conv", 0, 1)]
ACTS = {"x": activation_params(-1.0, 2.0)}


def _model(op="Conv", w=W, extra=(), **attrs):
    nodes = [helper.make_node(op, ["x", "W", "b"], ["y"], name="n", **attrs), *extra]
    return make_model(nodes, [tensor_info("x")], [tensor_info("y")], {"W": w, "b": B})


def _pass(fmt=WeightFormat(8), acts=ACTS, w=W, info=INFO):
    return Int32BiasPass({"W": quantize_weight(w, fmt, info[0].channel_axis, info[0].reduction_axis)}, info, acts)


def test_bias_becomes_int32_with_input_times_weight_scale():
    m = _model()
    p = _pass()
    assert p(m).modified and p.quantized_biases == ["b"]
    dq = node_named(m, "b_DequantizeLinear")
    assert [v.name for v in dq.inputs] == ["b_quantized", "b_scale", "b_zero_point"]
    assert dq.attributes["axis"].as_int() == 0 and dq.outputs[0].name == "b"
    assert m.graph.node(0) is dq and node_named(m, "n").inputs[2] is dq.outputs[0]
    inits = m.graph.initializers
    assert inits["b_quantized"].const_value.dtype == onnx.TensorProto.INT32 and "b" not in inits
    qw = quantize_weight(W, WeightFormat(8), 0, 1)
    scale = (ACTS["x"].scale * qw.scale.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(inits["b_scale"].const_value.numpy(), scale)
    np.testing.assert_array_equal(inits["b_quantized"].const_value.numpy(), np.rint(B / scale.astype(np.float64)))


def test_float_bias_stays_without_quantized_input_or_with_blocked_or_int2_weight():
    for p in (_pass(acts={}), _pass(WeightFormat(4, "block", 2)), _pass(WeightFormat(2))):
        m = _model()
        assert not p(m).modified and node_named(m, "n").inputs[2].name == "b"


def test_shared_bias_and_gemm_with_beta_stay_float():
    m = _model(extra=[helper.make_node("Add", ["y", "b"], ["z"])])
    assert not _pass()(m).modified
    w = RNG.normal(size=(3, 4)).astype(np.float32)
    info = [WeightInfo("W", w.shape, "Gemm", 1, 0)]
    m = _model("Gemm", w, beta=0.5)
    assert not _pass(w=w, info=info)(m).modified
    m = _model("Gemm", w)
    assert _pass(w=w, info=info)(m).modified


def test_names_already_taken_get_a_suffix():
    m = _model()
    m.graph.node(0).outputs[0].name = "b_quantized"
    _pass()(m)
    assert [v.name for v in m.graph.node(0).inputs] == ["b_quantized_1", "b_scale", "b_zero_point"]
