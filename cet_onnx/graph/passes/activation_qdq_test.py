import numpy as np
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, node_named, ops, tensor_info
from cet_onnx.graph.passes.activation_qdq import ActivationQDQPass, activation_tensors
from cet_onnx.quant.quantizer import activation_params

W = np.ones((4, 4), np.float32)
P = activation_params(-1.0, 3.0)


def _model():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Neg", ["h"], ["n"], name="neg"),
             helper.make_node("Add", ["h", "n"], ["a"], name="add"), helper.make_node("Exp", ["a"], ["e"], name="exp"),
             helper.make_node("Sigmoid", ["a"], ["y"], name="sig")]
    return make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info("y"), tensor_info("e")], {"W": W},
                      value_info=[tensor_info(t, [1, 4]) for t in ("h", "n", "a")])


def test_plan_has_quantized_op_inputs_and_weight_op_outputs_but_no_graph_outputs():
    assert activation_tensors(_model().graph, True) == ["h", "x", "n", "a"]   # a weight op output comes before its inputs


def test_pair_names_and_placement_after_the_producer():
    m = _model()
    ActivationQDQPass({"x": P, "h": P})(m)
    assert ops(m) == ["QuantizeLinear", "DequantizeLinear", "MatMul", "QuantizeLinear", "DequantizeLinear", "Neg", "Add",
                      "Exp", "Sigmoid"]
    q, dq = node_named(m, "h_QuantizeLinear"), node_named(m, "h_DequantizeLinear")
    assert [v.name for v in q.inputs] == ["h", "h_scale", "h_zero_point"] and q.outputs[0].name == "h_QuantizeLinear_Output"
    assert [v.name for v in dq.inputs] == ["h_QuantizeLinear_Output", "h_scale", "h_zero_point"]
    assert dq.outputs[0].name == "h_DequantizeLinear_Output"
    assert m.graph.initializers["h_zero_point"].const_value.numpy() == P.zero_point


def test_weight_op_output_is_read_dequantized_by_every_consumer_others_only_by_quantized_ops():
    m = _model()
    ActivationQDQPass({"h": P, "a": P})(m)
    assert node_named(m, "neg").inputs[0].name == "h_DequantizeLinear_Output"      # Neg is no activation op
    assert node_named(m, "add").inputs[0].name == "h_DequantizeLinear_Output"
    assert node_named(m, "sig").inputs[0].name == "a_DequantizeLinear_Output"
    assert node_named(m, "exp").inputs[0].name == "a"                               # float consumer of a non-weight output


def test_names_already_taken_get_a_suffix():
    m = _model()
    node_named(m, "neg").outputs[0].name = "h_scale"
    node_named(m, "exp").name = "h_QuantizeLinear"
    ActivationQDQPass({"h": P})(m)
    q = next(n for n in m.graph if n.op_type == "QuantizeLinear")
    assert q.name == "h_QuantizeLinear_1" and q.inputs[1].name == "h_scale_1"
