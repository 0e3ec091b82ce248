import numpy as np
import pytest
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, ops, run, tensor_info
from cet_onnx.graph.passes.downstream import DownstreamPass, NotDownstream

RNG = np.random.default_rng(0)
W = {f"w{i}": RNG.standard_normal((4, 4)).astype(np.float32) for i in (1, 2, 3)}


def _residual():
    """x → MatMul w1 → h1 → Relu → h2 → MatMul w2 → h3; y = MatMul(h3 + h1, w3); aux = Neg(h1)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "w2"], ["h3"]), helper.make_node("Add", ["h3", "h1"], ["s"]),
             helper.make_node("MatMul", ["s", "w3"], ["y"]), helper.make_node("Neg", ["h1"], ["aux"])]
    outs = [tensor_info("y", [2, 4]), tensor_info("aux", [2, 4])]
    vi = [tensor_info(n, [2, 4]) for n in ("h1", "h2", "h3", "s")]
    return make_model(nodes, [tensor_info("x", [2, 4])], outs, W, value_info=vi)


def test_the_suffix_reads_the_cut_and_computes_what_the_whole_model_does():
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    h1 = x @ W["w1"]
    h2 = np.maximum(h1, 0)
    m = _residual()
    p = DownstreamPass(["w2"], "y")
    p(m)
    assert p.cut == ["h2", "h1"]                       # the layer's input and the residual branch
    assert ops(m) == ["MatMul", "Add", "MatMul"]       # w1's MatMul, the Relu and the other output are gone
    assert [v.name for v in m.graph.outputs] == ["y"]
    assert sorted(m.graph.initializers) == ["w2", "w3"]
    (y,) = run(m, {"h2": h2, "h1": h1})
    np.testing.assert_allclose(y, (h2 @ W["w2"] + h1) @ W["w3"], rtol=1e-5)


def test_the_model_input_stays_an_input_where_the_first_layer_is_probed():
    m = _residual()
    p = DownstreamPass(["w1"], "y")
    p(m)
    assert p.cut == ["x"]
    assert ops(m) == ["MatMul", "Relu", "MatMul", "Add", "MatMul"]


def test_several_weights_take_the_union_of_what_they_reach():
    m = _residual()
    p = DownstreamPass(["w3", "w2"], "y")
    p(m)
    assert p.cut == ["h2", "h1"]


def test_an_output_the_weights_do_not_reach_is_an_error():
    with pytest.raises(NotDownstream, match="'aux' does not depend on w2"):
        DownstreamPass(["w2"], "aux")(_residual())


def test_a_name_that_is_not_an_initializer_is_an_error():
    with pytest.raises(NotDownstream, match="'h1' is not an initializer"):
        DownstreamPass(["h1"], "y")(_residual())


def test_a_graph_with_subgraphs_is_an_error():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "b", [], [tensor_info("t", [2, 4])])
    nodes = [helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch),
             helper.make_node("MatMul", ["z", "w1"], ["y"])]
    m = make_model(nodes, [tensor_info("x", [2, 4]), tensor_info("c", [], 9)], [tensor_info("y", [2, 4])],
                   {"w1": W["w1"]})
    with pytest.raises(NotDownstream, match="subgraphs"):
        DownstreamPass(["w1"], "y")(m)
