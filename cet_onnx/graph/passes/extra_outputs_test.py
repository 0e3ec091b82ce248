import onnx
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, tensor_info
from cet_onnx.graph.passes.extra_outputs import ExposeOutputsPass, with_outputs


def _model():
    nodes = [helper.make_node("Neg", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["g"]),
             helper.make_node("Neg", ["g"], ["y"])]
    return make_model(nodes, [tensor_info("x", [2])], [tensor_info("y")], value_info=[tensor_info("h", [2])])


def test_named_tensors_become_outputs_with_their_value_info_or_as_float():
    m = _model()
    assert ExposeOutputsPass(["h", "g", "y", "h"])(m).modified
    assert [v.name for v in m.graph.outputs] == ["y", "h", "g"]
    assert m.graph.outputs[1].shape == [2] and m.graph.outputs[2].shape is None
    assert m.graph.outputs[2].type.dtype == onnx.TensorProto.FLOAT


def test_untyped_keeps_only_a_known_element_type():
    m = _model()
    ExposeOutputsPass(["h", "g"], typed=False)(m)
    h, g = m.graph.outputs[1:]
    assert h.shape is None and h.type.dtype == onnx.TensorProto.FLOAT and g.type is None


def test_proto_gives_a_proto_copy():
    proto = onnx.helper.make_model(onnx.helper.make_graph([helper.make_node("Neg", ["x"], ["h"]),
                                                           helper.make_node("Neg", ["h"], ["y"])], "g",
                                                          [tensor_info("x", [2])], [tensor_info("y")]))
    out = with_outputs(proto, ["h"])
    assert [o.name for o in out.graph.output] == ["y", "h"] and [o.name for o in proto.graph.output] == ["y"]


def test_a_tensor_inside_an_if_branch_is_carried_out_empty_when_the_other_branch_runs():
    import numpy as np

    from cet_onnx.graph.passes._testing import W_THEN, if_model, run
    from cet_onnx.graph.passes.extra_outputs import exposable

    m = if_model()
    values = {v.name: v for g in m.graph.subgraphs() for n in g for v in n.outputs}
    assert exposable(m.graph, values["then_mm"])
    out = with_outputs(m, ["then_mm"])
    assert [v.name for v in out.graph.outputs] == ["y", "then_mm"]
    x = np.ones((2, 4), np.float32)
    y, mm = run(out, {"x": x, "mode": np.array(1, np.int64)})
    np.testing.assert_allclose(mm, x @ W_THEN, rtol=1e-6)
    np.testing.assert_array_equal(y, np.maximum(mm, 0))
    assert run(out, {"x": x, "mode": np.array(0, np.int64)})[1].shape == (0,)
    assert [v.name for v in m.graph.outputs] == ["y"]   # the input model is untouched


def test_tensors_of_loop_bodies_are_not_exposable():
    from onnx import TensorProto

    from cet_onnx.graph.passes.extra_outputs import exposable

    body = helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Neg", ["v_in"], ["v_out"])],
                             "body", [tensor_info("i", [], TensorProto.INT64), tensor_info("c_in", [], TensorProto.BOOL),
                                      tensor_info("v_in", [2])],
                             [tensor_info("c_out", [], TensorProto.BOOL), tensor_info("v_out", [2])])
    m = make_model([helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
                   [tensor_info("x", [2]), tensor_info("n", [], TensorProto.INT64)], [tensor_info("y")])
    neg = next(n for g in m.graph.subgraphs() for n in g if n.op_type == "Neg")
    assert not exposable(m.graph, neg.outputs[0])
