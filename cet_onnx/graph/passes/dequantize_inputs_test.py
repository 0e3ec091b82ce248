import numpy as np
import pytest
from onnx import helper

from cet_onnx.allocation.probes import code_feeds
from cet_onnx.graph.passes._testing import make_model, ops, run, tensor_info
from cet_onnx.graph.passes.dequantize_inputs import DequantizeInputsPass
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight


def _matmul(opset: int = 21):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    return make_model(nodes, [tensor_info("x", [2, 64]), tensor_info("w", [64, 8])], [tensor_info("y", [2, 8])],
                      opset=opset)


@pytest.mark.parametrize("fmt", [WeightFormat(8, "channel"), WeightFormat(4, "block", 32, symmetric=False),
                                 WeightFormat(2, "channel", symmetric=False), WeightFormat(8, "tensor")],
                         ids=lambda f: f.label)
def test_the_graph_computes_what_the_dequantized_weight_computes(fmt):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 8)).astype(np.float32)
    x = rng.normal(size=(2, 64)).astype(np.float32)
    qw = quantize_weight(w, fmt, channel_axis=1, reduction_axis=0)
    form, fed = code_feeds("w", qw)
    m = _matmul()
    assert DequantizeInputsPass({"w": form})(m).modified
    assert ops(m) == ["DequantizeLinear", "MatMul"]
    assert sorted(v.name for v in m.graph.inputs) == ["w_codes", "w_scale", "w_zero_point", "x"]
    assert not m.graph.initializers                      # nothing onnxruntime could fold into a float constant
    got = run(m, {"x": x, **fed})[0]
    np.testing.assert_array_equal(got, run(_matmul(), {"x": x, "w": qw.dequantize()})[0])


def test_a_flattened_int2_kernel_is_reshaped_back():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    x = rng.normal(size=(1, 3, 6, 6)).astype(np.float32)
    qw = quantize_weight(w, WeightFormat(2, "channel"), channel_axis=0, reduction_axis=1)
    form, fed = code_feeds("w", qw)
    assert form.reshape_to == (4, 3, 3, 3) and fed["w_codes"].shape == (4, 27)

    def conv():
        return make_model([helper.make_node("Conv", ["x", "w"], ["y"])],
                          [tensor_info("x", [1, 3, 6, 6]), tensor_info("w", [4, 3, 3, 3])], [tensor_info("y")], opset=21)

    m = conv()
    DequantizeInputsPass({"w": form})(m)
    assert ops(m) == ["DequantizeLinear", "Reshape", "Conv"]
    np.testing.assert_array_equal(run(m, {"x": x, **fed})[0], run(conv(), {"x": x, "w": qw.dequantize()})[0])


def test_a_name_that_is_not_a_graph_input_is_an_error():
    qw = quantize_weight(np.ones((64, 8), np.float32), WeightFormat(8, "channel"), channel_axis=1, reduction_axis=0)
    form, _ = code_feeds("v", qw)
    with pytest.raises(ValueError, match="'v' is not a graph input"):
        DequantizeInputsPass({"v": form})(_matmul())
