import numpy as np
from onnx import TensorProto, helper

from cet_onnx.graph.passes._testing import make_model, ops, run, tensor_info
from cet_onnx.graph.passes.tie_transposed import TieTransposedCopiesPass
from cet_onnx.graph.weights import find_weights

RNG = np.random.default_rng(0)
V, H = 64, 32
E = RNG.normal(size=(V, H)).astype(np.float32)
IDS = RNG.integers(0, V, size=(2, 3)).astype(np.int64)


def _lm(head: np.ndarray, head_name: str = "head"):
    """Gather(E) → MatMul(·, head): a head that is (or is not) ``Eᵀ`` stored a second time."""
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", head_name], ["logits"], name="lm_head")]
    return make_model(nodes, [tensor_info("ids", [2, 3], TensorProto.INT64)], [tensor_info("logits", [2, 3, V])],
                      {"E": E, head_name: head})


def test_an_exact_transposed_copy_becomes_a_transpose_of_the_table_and_outputs_are_unchanged():
    m = _lm(E.T.copy())
    before = run(m, {"ids": IDS})[0]
    p = TieTransposedCopiesPass()
    assert p(m).modified and p.tied == [("E", "head")]
    assert ops(m) == ["Transpose", "Gather", "MatMul"] and set(m.graph.initializers) == {"E"}
    np.testing.assert_array_equal(run(m, {"ids": IDS})[0], before)


def test_a_near_copy_two_matmul_weights_and_a_copy_read_by_other_ops_stay():
    near = E.T.copy()
    near[0, 0] += 1e-6
    assert not TieTransposedCopiesPass()(_lm(near)).modified
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y"])]
    m = make_model(nodes, [tensor_info("x", [2, V])], [tensor_info("y", [2, V])], {"A": E, "B": E.T.copy()})
    assert not TieTransposedCopiesPass()(m).modified       # only embedding tables are compared
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"]), helper.make_node("Add", ["head", "head"], ["y"])]
    m = make_model(nodes, [tensor_info("ids", [2, 3], TensorProto.INT64)], [tensor_info("x"), tensor_info("y")],
                   {"E": E, "head": E.T.copy()})
    assert not TieTransposedCopiesPass()(m).modified


def test_the_tied_table_is_one_weight_with_the_gather_axes_and_both_consumers():
    m = _lm(E.T.copy())
    TieTransposedCopiesPass()(m)
    weights, skipped = find_weights(m)
    assert not skipped
    assert [(w.name, w.op_type, w.channel_axis, w.reduction_axis, sorted(w.consumers)) for w in weights] == [
        ("E", "Gather", 0, 1, ["embed", "lm_head"])]
