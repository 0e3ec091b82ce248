import numpy as np
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, tensor_info
from cet_onnx.graph.passes.int2_float_bias import Int2FloatBiasPass
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight

RNG = np.random.default_rng(1)


def _model(op="Conv", w_shape=(4, 3, 1, 1), bias=False, **attrs):
    inputs = ["x", "W"] + (["b"] if bias else [])
    inits = {"W": RNG.normal(size=w_shape).astype(np.float32)}
    if bias:
        inits["b"] = np.ones(4, np.float32)
    m = make_model([helper.make_node(op, inputs, ["y"], name="n", **attrs)], [tensor_info("x")], [tensor_info("y")], inits)
    return m, inits["W"]


def _run(m, w, op, bits, channel=0, reduction=1):
    info = WeightInfo("W", w.shape, op, channel, reduction)
    qw = {"W": quantize_weight(w, WeightFormat(bits), channel, reduction)}
    return Int2FloatBiasPass(qw, [info])(m).modified


def test_int2_conv_without_bias_gets_a_zero_float_bias_per_output_channel():
    m, w = _model()
    assert _run(m, w, "Conv", 2)
    b = m.graph.node(0).inputs[2]
    assert b.name == "W_zero_bias" and b.const_value.numpy().tolist() == [0.0] * 4


def test_conv_transpose_and_gemm_channels():
    m, w = _model("ConvTranspose", (3, 2, 1, 1), group=2)
    _run(m, w, "ConvTranspose", 2, 1, 0)
    assert m.graph.node(0).inputs[2].const_value.shape == [4]
    m, w = _model("Gemm", (3, 5))
    _run(m, w, "Gemm", 2, 1, 0)
    assert m.graph.node(0).inputs[2].const_value.shape == [5]


def test_existing_bias_and_wider_weights_are_left_alone():
    m, w = _model(bias=True)
    assert not _run(m, w, "Conv", 2) and m.graph.node(0).inputs[2].name == "b"
    m, w = _model()
    assert not _run(m, w, "Conv", 4) and len(m.graph.node(0).inputs) == 2


def test_name_already_taken_gets_a_suffix():
    m, w = _model()
    m.graph.node(0).outputs[0].name = "W_zero_bias"
    _run(m, w, "Conv", 2)
    assert m.graph.node(0).inputs[2].name == "W_zero_bias_1"
