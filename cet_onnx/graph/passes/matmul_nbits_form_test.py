import numpy as np
import pytest
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, node_named, ops, run, tensor_info
from cet_onnx.graph.passes.matmul_nbits_form import MatMulNBitsFormPass
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight

RNG = np.random.default_rng(3)
X = RNG.normal(size=(2, 64)).astype(np.float32)


def _gemm(trans_b=1, bias=True, **attrs):
    w = RNG.normal(size=(8, 64) if trans_b else (64, 8)).astype(np.float32)
    inits = {"W": w, **({"c": RNG.normal(size=8).astype(np.float32)} if bias else {})}
    node = helper.make_node("Gemm", ["x", "W"] + (["c"] if bias else []), ["y"], name="fc", transB=trans_b, **attrs)
    return make_model([node], [tensor_info("x", [2, 64])], [tensor_info("y", [2, 8])], inits), w


def _qweight(w, bits=4, trans_b=1):
    axes = (0, 1) if trans_b else (1, 0)   # (channel, reduction)
    return quantize_weight(w, WeightFormat(bits, "block", 32), *axes)


def test_transposed_gemm_becomes_matmul_plus_add_with_the_weight_stored_k_by_n():
    m, w = _gemm()
    qw = _qweight(w)
    expected = run(m, {"x": X})[0]
    qweights = {"W": qw}
    p = MatMulNBitsFormPass(qweights)
    assert p(m).modified
    assert ops(m) == ["MatMul", "Add"] and p.float_nodes == {"fc"}
    assert node_named(m, "fc").op_type == "MatMul" and node_named(m, "fc_bias_Add").outputs[0].name == "y"
    t = qweights["W"]
    assert t.q.shape == (64, 8) and t.axis == 0 and t.reduction_axis == 0 and t.channel_axis == 1
    np.testing.assert_array_equal(t.dequantize(), qw.dequantize().T)   # exactly the same weight
    assert m.graph.initializers["W"].const_value.numpy().shape == (64, 8)
    np.testing.assert_allclose(run(m, {"x": X})[0], expected, rtol=1e-5, atol=1e-5)


def test_gemm_without_bias_is_one_matmul():
    m, w = _gemm(bias=False)
    MatMulNBitsFormPass({"W": _qweight(w)})(m)
    assert ops(m) == ["MatMul"] and m.graph.node(0).outputs[0].name == "y"


@pytest.mark.parametrize("attrs", [{"alpha": 2.0}, {"transA": 1}])
def test_gemm_that_is_not_a_plain_matmul_is_left_alone(attrs):
    m, w = _gemm(**attrs)
    p = MatMulNBitsFormPass({"W": _qweight(w)})
    p(m)
    assert ops(m) == ["Gemm"] and not p.float_nodes


def test_untransposed_gemm_becomes_matmul_without_moving_its_weight():
    m, w = _gemm(trans_b=0)
    expected = run(m, {"x": X})[0]
    qw = _qweight(w, trans_b=0)
    qweights = {"W": qw}
    p = MatMulNBitsFormPass(qweights)
    p(m)
    assert ops(m) == ["MatMul", "Add"] and p.float_nodes == {"fc"} and qweights["W"] is qw
    np.testing.assert_allclose(run(m, {"x": X})[0], expected, rtol=1e-5, atol=1e-5)


def test_matmul_keeps_float_activations():
    w = RNG.normal(size=(64, 8)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [tensor_info("x", [2, 64])],
                   [tensor_info("y", [2, 8])], {"W": w})
    p = MatMulNBitsFormPass({"W": _qweight(w, bits=2, trans_b=0)})
    assert p(m).modified and ops(m) == ["MatMul"] and p.float_nodes == {"mm"}


def test_per_channel_int8_weights_only_when_all_bits_and_blocked_int8_always():
    m, w = _gemm()
    per_channel = quantize_weight(w, WeightFormat(8, "channel"), 0, 1)   # QGemm / QLinearMatMul fuse it
    p = MatMulNBitsFormPass({"W": per_channel})
    p(m)
    assert ops(m) == ["Gemm"] and not p.float_nodes
    p = MatMulNBitsFormPass({"W": per_channel}, all_bits=True)
    p(m)
    assert ops(m) == ["MatMul", "Add"]
    m, w = _gemm()
    p = MatMulNBitsFormPass({"W": _qweight(w, bits=8)})   # INT8 in blocks: only MatMulNBits runs it
    p(m)
    assert ops(m) == ["MatMul", "Add"] and p.float_nodes == {"fc"}


def test_shared_weight_is_left_alone():
    w = RNG.normal(size=(8, 64)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], name="a", transB=1),
             helper.make_node("Gemm", ["x", "W"], ["z"], name="b", transB=1)]
    m = make_model(nodes, [tensor_info("x", [2, 64])], [tensor_info("y"), tensor_info("z")], {"W": w})
    p = MatMulNBitsFormPass({"W": _qweight(w)})
    p(m)
    assert ops(m) == ["Gemm", "Gemm"] and not p.float_nodes


def test_int2_weight_with_n_not_a_multiple_of_4_is_guarded_not_converted():
    m, w = _gemm()   # N = 8: fine
    p = MatMulNBitsFormPass({"W": _qweight(w, bits=2)})
    p(m)
    assert p.weights == {"W"} and not p.guarded
    w10 = RNG.normal(size=(10, 64)).astype(np.float32)
    m = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)], [tensor_info("x", [2, 64])],
                   [tensor_info("y", [2, 10])], {"W": w10})
    p = MatMulNBitsFormPass({"W": _qweight(w10, bits=2)})
    p(m)
    assert ops(m) == ["Gemm"] and p.guarded == {"W"} and not p.float_nodes
