import numpy as np
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, run, tensor_info
from cet_onnx.graph.passes.dynamic_lstm import DynamicLSTMPass
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight

RNG = np.random.default_rng(0)
H, I, T = 8, 5, 6
W = (RNG.normal(size=(1, 4 * H, I)) / 3).astype(np.float32)
R = (RNG.normal(size=(1, 4 * H, H)) / 3).astype(np.float32)
X = RNG.normal(size=(T, 2, I)).astype(np.float32)


def _model():
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y", "y_h"], hidden_size=H, name="lstm")
    return make_model([node], [tensor_info("x", [T, 2, I])], [tensor_info("y"), tensor_info("y_h")], {"W": W, "R": R})


def _q(w, fmt=WeightFormat(8, "channel", symmetric=True)):
    return quantize_weight(w, fmt, 1, 2, integer_kernel=True)   # as the pipeline quantizes an LSTM it makes dynamic


def test_an_int8_lstm_becomes_dynamic_quantize_lstm_close_to_float():
    m = _model()
    ref = run(m, {"x": X})
    qweights = {"W": _q(W), "R": _q(R)}
    p = DynamicLSTMPass(qweights)
    assert p(m).modified and p.converted == ["W", "R"] and not qweights
    node = m.graph.node(0)
    assert (node.op_type, node.domain, node.name) == ("DynamicQuantizeLSTM", "com.microsoft", "lstm")
    assert set(m.graph.initializers) == {"W_quantized", "W_scale", "W_zero_point", "R_quantized", "R_scale",
                                         "R_zero_point"}
    assert m.graph.initializers["W_quantized"].const_value.shape == (1, I, 4 * H)
    assert m.graph.initializers["W_scale"].const_value.shape == (1, 4 * H)
    got = run(m, {"x": X})
    assert [o.name for o in m.graph.outputs] == ["y", "y_h"]
    for g, r in zip(got, ref):
        assert np.abs(g - r).max() < 0.05 * np.abs(r).max()


def test_other_formats_stay_lstm():
    for fmt in (WeightFormat(4, "channel", symmetric=True), WeightFormat(8, "block", 4, symmetric=True)):
        m = _model()
        qweights = {"W": _q(W, fmt), "R": _q(R)}
        assert not DynamicLSTMPass(qweights)(m).modified and len(qweights) == 2
        assert m.graph.node(0).op_type == "LSTM"
