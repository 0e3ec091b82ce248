import pytest
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, tensor_info
from cet_onnx.graph.passes.stable_sort import StableTopologicalSortPass


def _model():
    nodes = [helper.make_node("Neg", ["x"], ["a"], name="a"), helper.make_node("Neg", ["x"], ["b"], name="b"),
             helper.make_node("Add", ["a", "b"], ["y"], name="y")]
    return make_model(nodes, [tensor_info("x", [2])], [tensor_info("y")])


def test_sorted_graph_is_left_as_it_is():
    m = _model()
    assert not StableTopologicalSortPass()(m).modified
    assert [n.name for n in m.graph] == ["a", "b", "y"]


def test_misplaced_node_moves_only_as_far_as_it_must():
    m = _model()
    y = m.graph.node(2)
    m.graph.remove(y)
    m.graph.insert_before(m.graph.node(0), y)
    assert StableTopologicalSortPass()(m).modified
    assert [n.name for n in m.graph] == ["a", "b", "y"]


def test_cycle_is_an_error():
    nodes = [helper.make_node("Neg", ["b"], ["a"]), helper.make_node("Neg", ["a"], ["b"])]
    m = make_model(nodes, [], [tensor_info("b")])
    with pytest.raises(ValueError, match="cycle"):
        StableTopologicalSortPass()(m)
