import numpy as np
import pytest
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, ops, run, tensor_info
from cet_onnx.graph.passes.matmul_nbits_contrib import MatMulNBitsContribPass
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight

RNG = np.random.default_rng(5)


def _matmul(k, n):
    w = RNG.normal(size=(k, n)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    return make_model([node], [tensor_info("x", [3, k])], [tensor_info("y", [3, n])], {"W": w}), w


@pytest.mark.parametrize("bits, granularity, block, symmetric, k, n", [
    (4, "block", 32, True, 64, 8),      # symmetric: zero points at the kernel's default, not written
    (4, "block", 32, False, 96, 12),
    (4, "block", 128, False, 200, 8),   # K not a multiple of the block: the last block padded
    (4, "channel", None, True, 384, 16),
    (2, "channel", None, False, 100, 8),
    (2, "block", 32, False, 64, 4),
    (8, "block", 32, True, 64, 8),
    (8, "channel", None, True, 48, 6),
])
def test_matmul_becomes_matmul_nbits_with_the_weight_it_had(bits, granularity, block, symmetric, k, n):
    m, w = _matmul(k, n)
    qw = quantize_weight(w, WeightFormat(bits, granularity, block, symmetric=symmetric), 1, 0)
    x = RNG.normal(size=(3, k)).astype(np.float32)
    expected = x @ qw.dequantize()
    p = MatMulNBitsContribPass({"W": qw}, {"W"}, accuracy_level=0)   # level 0: float arithmetic, as the DQ form
    assert p(m).modified and p.converted == {"W"}
    assert ops(m) == ["MatMulNBits"] and "W" not in m.graph.initializers
    node = m.graph.node(0)
    assert node.domain == "com.microsoft" and m.opset_imports["com.microsoft"] == 1
    assert node.attributes.get_int("bits") == bits and node.attributes.get_int("K") == k
    assert (len(node.inputs) == 4) == (not symmetric)
    np.testing.assert_allclose(run(m, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)   # onnxruntime's kernel


def test_weights_not_named_or_read_twice_are_left_alone():
    m, w = _matmul(64, 8)
    qw = quantize_weight(w, WeightFormat(4, "block", 32), 1, 0)
    assert not MatMulNBitsContribPass({"W": qw}, set(), 4)(m).modified
    two = helper.make_node("MatMul", ["x", "W"], ["z"], name="mm2")
    m2 = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), two], [tensor_info("x", [3, 64])],
                    [tensor_info("y", [3, 8]), tensor_info("z", [3, 8])], {"W": w})
    assert not MatMulNBitsContribPass({"W": qw}, {"W"}, 4)(m2).modified and ops(m2) == ["MatMul", "MatMul"]
