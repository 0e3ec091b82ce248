import numpy as np
from onnx import helper

from cet_onnx.graph.passes._testing import make_model, node_named, ops, tensor_info
from cet_onnx.graph.passes.activation_qdq import (TRANSFORMER_ACTIVATION_OPS, ActivationQDQPass, activation_tensors,
                                                 transformer_activation_tensors)
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


def test_a_weight_op_output_cast_to_the_graph_output_stays_float():
    # a half-precision model with float32 outputs (keep_io_types): the Cast's output is the model's
    half = helper.TensorProto.FLOAT16
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Cast", ["h"], ["y"], to=helper.TensorProto.FLOAT)]
    m = make_model(nodes, [tensor_info("x", [1, 4], half)], [tensor_info("y", [1, 4])], {"W": W.astype(np.float16)},
                   value_info=[tensor_info("h", [1, 4], half)])
    assert activation_tensors(m.graph, True) == ["x"]


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


def _hybrid():
    """Conv → Relu → (flattened) x; x @ W1 → h; residual a = x + h; h @ hᵀ (an attention product); a tied-style
    Transpose(W2) weight; everything float-typed."""
    mk = helper.make_node
    nodes = [mk("Conv", ["img", "K"], ["c"], name="conv"), mk("Relu", ["c"], ["r"], name="relu"),
             mk("Reshape", ["r", "shape"], ["x"], name="flat"),
             mk("MatMul", ["x", "W1"], ["h"], name="proj"), mk("Add", ["x", "h"], ["a"], name="residual"),
             mk("Transpose", ["h"], ["ht"], name="t"), mk("MatMul", ["h", "ht"], ["s"], name="scores"),
             mk("Transpose", ["W2"], ["w2t"], name="tied"), mk("MatMul", ["a", "w2t"], ["y"], name="head")]
    return make_model(nodes, [tensor_info("img", [1, 1, 2, 2])], [tensor_info("y"), tensor_info("s")],
                      {"K": np.ones((4, 1, 1, 1), np.float32), "shape": np.array([4, 4]), "W1": W, "W2": W},
                      value_info=[tensor_info(t, [4, 4]) for t in ("x", "h", "a", "ht", "w2t")]
                      + [tensor_info(t, [1, 4, 2, 2]) for t in ("c", "r")])


def test_transformer_plan_keeps_residual_attention_and_matmul_outputs_float_and_the_conv_rules():
    plan = transformer_activation_tensors(_hybrid().graph)
    assert plan == ["c", "img", "x", "a"]   # conv output and input; the inputs of the weight MatMuls
    m = _hybrid()
    ActivationQDQPass(dict.fromkeys(plan, P), TRANSFORMER_ACTIVATION_OPS)(m)
    assert node_named(m, "residual").inputs[0].name == "x"             # the residual Add reads float x
    assert node_named(m, "proj").inputs[0].name == "x_DequantizeLinear_Output"
    assert node_named(m, "head").inputs[1].name == "w2t"              # a Transpose of a weight is no activation


def test_a_pair_nothing_reads_is_removed_with_its_parameters():
    # x's only consumer is a MatMul fused into MatMulNBits (float_nodes): quantizing x would be wasted work
    m = _model()
    ActivationQDQPass({"x": P, "a": P}, float_nodes={"mm"})(m)
    assert node_named(m, "mm").inputs[0].name == "x"
    assert ops(m) == ["MatMul", "Neg", "Add", "QuantizeLinear", "DequantizeLinear", "Exp", "Sigmoid"]
    assert "x_scale" not in m.graph.initializers and "x_zero_point" not in m.graph.initializers
    assert "a_scale" in m.graph.initializers
