import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from cet_onnx.graph.passes._testing import make_model, ops, run, tensor_info
from cet_onnx.graph.passes.gather_rows import GatherRowsPass
from cet_onnx.graph.passes.weight_qdq import WeightQDQPass
from cet_onnx.graph.weights import find_weights
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight
from cet_onnx.quant.sizes import gather_format_ok

RNG = np.random.default_rng(0)
V, H = 40, 64
IDS = RNG.integers(0, V, size=(3, 5)).astype(np.int64)


def _table(fmt, extra_nodes=(), outputs=(("y", [3, 5, H]),)):
    table = RNG.normal(size=(V, H)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["y"], name="embed"), *extra_nodes]
    m = make_model(nodes, [tensor_info("ids", [3, 5], TensorProto.INT64)], [tensor_info(*o) for o in outputs],
                   {"E": table}, opset=21)
    qw = quantize_weight(table, fmt, 0, 1)
    WeightQDQPass({"E": qw})(m)
    return m, qw


@pytest.mark.parametrize("fmt, expected", [
    (WeightFormat(8), ["Gather", "Cast", "Gather", "Unsqueeze", "Mul"]),
    (WeightFormat(8, "tensor"), ["Gather", "Cast", "Mul"]),
    (WeightFormat(4, "block", 32, symmetric=False), ["GatherBlockQuantized"]),
    (WeightFormat(4, "block", 16, symmetric=True), ["GatherBlockQuantized"]),
])
def test_quantized_table_is_looked_up_before_it_is_dequantized(fmt, expected):
    m, qw = _table(fmt)
    p = GatherRowsPass()
    assert p(m).modified and p.converted == ["E"]
    assert ops(m) == expected
    assert m.graph.outputs[0].name == "y"
    np.testing.assert_allclose(run(m, {"ids": IDS})[0], qw.dequantize()[IDS], rtol=1e-6, atol=1e-6)
    if fmt.bits == 8:
        onnx.checker.check_model(ir.to_proto(m), full_check=True)


def test_forms_without_a_fast_lookup_keep_dequantize_then_gather():
    for fmt in (WeightFormat(4), WeightFormat(2, "block", 32), WeightFormat(8, "block", 32)):
        m, _ = _table(fmt)
        assert not GatherRowsPass()(m).modified and ops(m)[-1] == "Gather"
        assert not gather_format_ok(fmt, H)


def test_the_allowed_formats_are_the_ones_the_pass_rewrites():
    assert gather_format_ok(WeightFormat(8), H) and gather_format_ok(WeightFormat(4, "block", 64), H)
    assert not gather_format_ok(WeightFormat(4, "block", 48), 96)      # not a power of two
    assert not gather_format_ok(WeightFormat(4, "block", 64), 96)      # rows not whole blocks
    assert not gather_format_ok(WeightFormat(8, symmetric=False), H)


def test_a_table_also_read_by_another_node_keeps_its_dequantize_for_it():
    m, _ = _table(WeightFormat(8), [helper.make_node("Identity", ["E"], ["e_out"])],
                  (("y", [3, 5, H]), ("e_out", [V, H])))
    GatherRowsPass()(m)
    assert "DequantizeLinear" in ops(m) and ops(m).count("Gather") == 2


def test_gather_tables_are_weights_with_a_scale_per_row():
    table = RNG.normal(size=(V, H)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["y"]), helper.make_node("Gather", ["F", "ids"], ["z"], axis=1)]
    m = make_model(nodes, [tensor_info("ids", [3], TensorProto.INT64)], [tensor_info("y"), tensor_info("z")],
                   {"E": table, "F": table.T.copy()})
    weights, skipped = find_weights(m)
    assert [(w.name, w.op_type, w.channel_axis, w.reduction_axis) for w in weights] == [("E", "Gather", 0, 1)]
