import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from cet_onnx.graph.passes._testing import make_model, ops, run, tensor_info
from cet_onnx.graph.passes.dynamic_matmul import DynamicMatMulPass
from cet_onnx.graph.passes.weight_qdq import WeightQDQPass
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight

RNG = np.random.default_rng(0)
K, N = 16, 8


def _model(fmt=WeightFormat(8), extra_nodes=(), outputs=(("y", [2, 3, N]),)):
    w = RNG.normal(size=(K, N)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), *extra_nodes]
    m = make_model(nodes, [tensor_info("x", [2, 3, K])], [tensor_info(*o) for o in outputs], {"W": w}, opset=21)
    qw = quantize_weight(w, fmt, 1, 0, integer_kernel=True)
    WeightQDQPass({"W": qw})(m)
    return m, qw


def _expected(x, qw):
    """Dynamic quantization of ``x`` (uint8, onnxruntime's rule) times the dequantized weight."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255)
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    xq = np.clip(np.rint(x / scale) + zero, 0, 255)
    return ((xq - zero) * scale) @ qw.dequantize()


def test_int8_weight_matmul_becomes_dynamic_quantize_and_matmul_integer():
    m, qw = _model()
    p = DynamicMatMulPass()
    assert p(m).modified and p.converted == ["mm"]
    assert ops(m) == ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul"]
    assert "W_DequantizeLinear" not in [n.name for n in m.graph]          # nobody reads it any more
    assert m.graph.outputs[0].name == "y" and m.graph.outputs[0].producer().op_type == "Mul"
    x = RNG.normal(size=(2, 3, K)).astype(np.float32)
    np.testing.assert_allclose(run(m, {"x": x})[0], _expected(x, qw), rtol=1e-4, atol=1e-4)
    onnx.checker.check_model(ir.to_proto(m), full_check=True)


def test_onnxruntime_fuses_it_into_its_dynamic_quantized_matmul_kernel():
    m, _ = _model()
    DynamicMatMulPass()(m)
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(ir.to_proto(m).SerializeToString(), so, providers=["CPUExecutionProvider"])
        fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert fused == ["DynamicQuantizeMatMul"]


def test_blocked_or_sub_8_bit_weights_keep_their_weight_only_dequantize():
    for fmt in (WeightFormat(4), WeightFormat(8, "block", 8)):
        m, _ = _model(fmt)
        assert not DynamicMatMulPass()(m).modified
        assert ops(m) == ["DequantizeLinear", "MatMul"]


def test_a_weight_read_by_another_node_keeps_its_dequantize_for_that_node():
    m, _ = _model(extra_nodes=[helper.make_node("Identity", ["W"], ["w_out"])], outputs=(("y", [2, 3, N]), ("w_out", [K, N])))
    DynamicMatMulPass()(m)
    assert ops(m)[0] == "DequantizeLinear" and "MatMulInteger" in ops(m)


def test_weight_as_left_operand_or_initializer_activation_is_left_alone():
    w = RNG.normal(size=(N, K)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["W", "x"], ["y"])], [tensor_info("x", [K, 3])], [tensor_info("y")],
                   {"W": w}, opset=21)
    WeightQDQPass({"W": quantize_weight(w, WeightFormat(8), 0, 1, integer_kernel=True)})(m)
    assert not DynamicMatMulPass()(m).modified


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_an_int8_weight_and_bias_becomes_dynamic_with_an_add(trans_b):
    w = RNG.normal(size=(N, K) if trans_b else (K, N)).astype(np.float32)
    b = RNG.normal(size=N).astype(np.float32)
    m = make_model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=trans_b)],
                   [tensor_info("x", [3, K])], [tensor_info("y", [3, N])], {"W": w, "b": b}, opset=21)
    qw = quantize_weight(w, WeightFormat(8), 0 if trans_b else 1, 1 if trans_b else 0, integer_kernel=True)
    WeightQDQPass({"W": qw})(m)
    p = DynamicMatMulPass()
    assert p(m).modified and p.converted == ["fc"]
    assert ops(m) == ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul", "Add"]
    assert ("W_quantized_transposed" in m.graph.initializers) == bool(trans_b)
    assert ("W_quantized" in m.graph.initializers) != bool(trans_b)        # unread codes are dropped
    x = RNG.normal(size=(3, K)).astype(np.float32)
    dq = qw.dequantize()
    ref = _expected(x, type("Q", (), {"dequantize": lambda self: dq.T if trans_b else dq})()) + b
    np.testing.assert_allclose(run(m, {"x": x})[0], ref, rtol=1e-4, atol=1e-4)
    onnx.checker.check_model(ir.to_proto(m), full_check=True)


def test_transposed_codes_shared_with_another_reader_are_read_through_a_transpose_not_copied():
    w = RNG.normal(size=(N, K)).astype(np.float32)           # a table [rows, width], also gathered
    m = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], name="head", transB=1),
                    helper.make_node("Identity", ["W"], ["w_out"])],
                   [tensor_info("x", [3, K])], [tensor_info("y", [3, N]), tensor_info("w_out", [N, K], TensorProto.INT8)], {"W": w},
                   opset=21)
    qw = quantize_weight(w, WeightFormat(8), 0, 1, integer_kernel=True)
    WeightQDQPass({"W": qw})(m)
    m.graph.node(m.graph.num_nodes() - 1).replace_input_with(0, m.graph.initializers["W_quantized"])  # a second reader
    assert DynamicMatMulPass()(m).modified
    assert "W_quantized_transposed" not in m.graph.initializers and "Transpose" in ops(m)
    x = RNG.normal(size=(3, K)).astype(np.float32)
    dq = qw.dequantize()
    ref = _expected(x, type("Q", (), {"dequantize": lambda self: dq.T})())
    np.testing.assert_allclose(run(m, {"x": x})[0], ref, rtol=1e-4, atol=1e-4)


def test_gemm_with_alpha_or_trans_a_is_left_alone():
    w = RNG.normal(size=(K, N)).astype(np.float32)
    m = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], alpha=0.5)], [tensor_info("x", [3, K])],
                   [tensor_info("y", [3, N])], {"W": w}, opset=21)
    WeightQDQPass({"W": quantize_weight(w, WeightFormat(8), 1, 0, integer_kernel=True)})(m)
    assert not DynamicMatMulPass()(m).modified


def test_matmuls_reading_the_same_input_share_one_dynamic_quantize():
    ws = {n: RNG.normal(size=(K, N)).astype(np.float32) for n in ("Wa", "Wb")}
    nodes = [helper.make_node("MatMul", ["x", n], [f"y{n}"], name=f"mm{n}") for n in ws]
    m = make_model(nodes, [tensor_info("x", [3, K])], [tensor_info(f"y{n}", [3, N]) for n in ws], ws, opset=21)
    WeightQDQPass({n: quantize_weight(w, WeightFormat(8), 1, 0, integer_kernel=True) for n, w in ws.items()})(m)
    DynamicMatMulPass()(m)
    assert ops(m).count("DynamicQuantizeLinear") == 1 and ops(m).count("MatMulInteger") == 2
