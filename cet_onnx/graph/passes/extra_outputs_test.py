import numpy as np
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


def _loop_model():
    from onnx import TensorProto

    body = helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Neg", ["v_in"], ["neg"]),
                              helper.make_node("Add", ["neg", "one"], ["v_out"])],
                             "body", [tensor_info("i", [], TensorProto.INT64), tensor_info("c_in", [], TensorProto.BOOL),
                                      tensor_info("v_in", [2])],
                             [tensor_info("c_out", [], TensorProto.BOOL), tensor_info("v_out", [2])],
                             [onnx.numpy_helper.from_array(np.ones(2, np.float32), "one")])
    return make_model([helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
                      [tensor_info("x", [2]), tensor_info("n", [], TensorProto.INT64)], [tensor_info("y")])


def test_loop_body_tensors_come_out_stacked_one_row_per_iteration():
    from cet_onnx.graph.passes._testing import run
    from cet_onnx.graph.passes.extra_outputs import exposable, per_iteration, stack_depth

    m = _loop_model()
    body = next(iter(m.graph.subgraphs()))
    assert exposable(m.graph, body.inputs[2]) and stack_depth(m.graph, body) == 1 and stack_depth(m.graph, m.graph) == 0
    out = with_outputs(m, ["neg", "v_in"])
    assert [v.name for v in out.graph.outputs] == ["y", "neg", "v_in"]
    x = np.array([1.0, 2.0], np.float32)
    y, neg, v_in = run(out, {"x": x, "n": np.array(3, np.int64)})
    np.testing.assert_allclose(v_in, [x, 1 - x, x])           # the carried state of each of the 3 iterations
    np.testing.assert_allclose(neg, -v_in)
    np.testing.assert_allclose(y, 1 - x)
    assert len(per_iteration(neg, 1)) == 3 and per_iteration(neg, 0)[0] is neg
    assert run(out, {"x": x, "n": np.array(0, np.int64)})[1].shape[0] == 0   # no iteration: empty


def test_scan_body_tensors_come_out_stacked_along_the_scan():
    from onnx import TensorProto

    from cet_onnx.graph.passes._testing import run

    body = helper.make_graph([helper.make_node("Add", ["s_in", "e"], ["s_out"]), helper.make_node("Neg", ["s_out"], ["o"])],
                             "body", [tensor_info("s_in", [2]), tensor_info("e", [2])],
                             [tensor_info("s_out", [2]), tensor_info("o", [2])])
    m = make_model([helper.make_node("Scan", ["s0", "xs"], ["s", "os"], body=body, num_scan_inputs=1,
                                     scan_output_axes=[0], scan_output_directions=[0])],
                   [tensor_info("s0", [2]), tensor_info("xs", [4, 2])], [tensor_info("s"), tensor_info("os")])
    out = with_outputs(m, ["s_out"])
    xs = np.arange(8, dtype=np.float32).reshape(4, 2)
    s, os_, s_out = run(out, {"s0": np.zeros(2, np.float32), "xs": xs})
    np.testing.assert_allclose(s_out, np.cumsum(xs, axis=0))
    np.testing.assert_allclose(os_, -s_out)


def test_tensors_under_other_subgraph_ops_are_not_exposable():
    from onnx import TensorProto

    from cet_onnx.graph.passes.extra_outputs import exposable

    body = helper.make_graph([helper.make_node("Neg", ["a"], ["b"])], "body", [tensor_info("a", [2])], [tensor_info("b", [2])])
    m = make_model([helper.make_node("SequenceMap", ["seq"], ["out"], body=body)],
                   [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_sequence_value_info("out", TensorProto.FLOAT, [2])])
    neg = next(n for g in m.graph.subgraphs() for n in g if n.op_type == "Neg")
    assert not exposable(m.graph, neg.outputs[0])
