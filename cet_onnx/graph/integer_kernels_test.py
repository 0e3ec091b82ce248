import numpy as np
import onnxruntime as ort
from onnx import helper

from cet_onnx.graph.integer_kernels import integer_kernel_weights
from cet_onnx.graph.passes._testing import make_model, tensor_info
from cet_onnx.graph.weights import find_weights
from cet_onnx.quant.quantizer import WeightFormat, activation_params, quantize_weight, saturation_safe

RNG = np.random.default_rng(0)


def _model():
    """conv(x) → flatten → MatMul(·, fc); MatMul(emb_T, h2)-style weight as input A; a Gather; an LSTM."""
    nodes = [helper.make_node("Conv", ["x", "conv"], ["c"]), helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["h"]), helper.make_node("MatMul", ["left", "h"], ["g"]),
             helper.make_node("Transpose", ["tied"], ["tied_T"], perm=[1, 0]),
             helper.make_node("MatMul", ["g", "tied_T"], ["y"]),
             helper.make_node("Gather", ["emb", "ids"], ["e"]),
             helper.make_node("LSTM", ["s", "lstm_W", "lstm_R"], ["", "o"], hidden_size=2)]
    inits = {"conv": np.ones((2, 1, 1, 1), np.float32), "fc": np.ones((8, 4), np.float32),
             "left": np.ones((3, 1), np.float32), "tied": np.ones((5, 4), np.float32),
             "emb": np.ones((5, 4), np.float32), "lstm_W": np.ones((1, 8, 3), np.float32),
             "lstm_R": np.ones((1, 8, 2), np.float32)}
    inputs = [tensor_info("x", [1, 1, 2, 2]), tensor_info("ids", [2], 7), tensor_info("s", [4, 1, 3])]
    return make_model(nodes, inputs, [tensor_info("y"), tensor_info("e"), tensor_info("o")], inits)


def test_static_mode_marks_the_layers_whose_data_input_is_quantized_and_lstms():
    m = _model()
    weights, _ = find_weights(m)
    assert integer_kernel_weights(m.graph, weights, "static", {"x", "f"}) == {"conv", "fc", "lstm_W", "lstm_R"}
    # 'left' is input A of a MatMul whose B ('h') is quantized: a QLinearMatMul reads it too
    assert "left" in integer_kernel_weights(m.graph, weights, "static", {"h"})


def test_a_16_bit_activation_feeds_no_integer_kernel():
    m = _model()
    weights, _ = find_weights(m)
    params = {"x": activation_params(-1, 1, 16), "f": activation_params(-1, 1, 8)}
    assert integer_kernel_weights(m.graph, weights, "static", params) == {"fc", "lstm_W", "lstm_R"}


def test_dynamic_mode_marks_matmul_b_weights_transposed_ones_included_and_lstms():
    m = _model()
    weights, _ = find_weights(m)
    assert integer_kernel_weights(m.graph, weights, "dynamic") == {"fc", "tied", "lstm_W", "lstm_R"}


def test_weight_only_marks_nothing():
    m = _model()
    weights, _ = find_weights(m)
    assert integer_kernel_weights(m.graph, weights, "none", {"x", "f"}) == set()


def test_only_8_bit_per_channel_and_per_tensor_formats_change():
    assert saturation_safe(WeightFormat(8)) == WeightFormat(7)
    assert saturation_safe(WeightFormat(8, "tensor")) == WeightFormat(7, "tensor")
    for fmt in (WeightFormat(8, "block", 32), WeightFormat(4), WeightFormat(4, "block", 32, symmetric=False)):
        assert saturation_safe(fmt) == fmt


def test_saturation_safe_codes_give_the_fused_kernel_the_unfused_result():
    """Activations at the top of the uint8 range times weights at the top of theirs: the worst case for
    x86 u8 x s8 kernels without VNNI. With codes within +-63, onnxruntime's fused QLinearMatMul computes
    what the Q/DQ graph says, on every CPU."""
    k, n = 64, 8
    w = np.where(RNG.random((k, n)) < 0.5, 1.0, 0.98).astype(np.float32)
    qw = quantize_weight(w, WeightFormat(8), 1, 0, integer_kernel=True)
    assert qw.fmt.bits == 7 and np.abs(qw.q).max() == 63
    x_scale, w_scale = np.float32(1 / 255), qw.scale.astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    inits = {"xs": x_scale, "xz": np.uint8(0), "wq": qw.q.astype(np.int8), "ws": w_scale,
             "wz": np.zeros(n, np.int8), "ys": np.float32(k / 255), "yz": np.uint8(0)}
    m = make_model(nodes, [tensor_info("x", [4, k])], [tensor_info("out", [4, n])], inits, opset=21)
    from onnx_ir import to_proto
    data = to_proto(m).SerializeToString()
    x = np.ones((4, k), np.float32)
    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        outs.append(ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])
    np.testing.assert_allclose(outs[1], outs[0], atol=float(k / 255) + 1e-6)   # at most one output step apart
