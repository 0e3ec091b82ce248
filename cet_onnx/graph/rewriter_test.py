"""The composition: an ir.Model in gives an ir.Model out, with the same graph as the proto path."""

import sys
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import numpy_helper

from cet_onnx.graph.rewriter import activation_tensors, removable_relus, rewrite
from cet_onnx.graph.weights import find_weights
from cet_onnx.quant.quantizer import WeightFormat, activation_params, quantize_weight

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from models import small_cnn  # noqa: E402


def test_ir_model_in_ir_model_out_same_graph_as_the_proto_path():
    proto = onnx.shape_inference.infer_shapes(small_cnn())
    weights, _ = find_weights(proto)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    qweights = {w.name: quantize_weight(inits[w.name], WeightFormat(2), w.channel_axis, w.reduction_axis) for w in weights}
    acts = {t: activation_params(-1.0, 1.0) for t in activation_tensors(proto, True)}
    model = ir.serde.deserialize_model(proto)
    assert removable_relus(model) == removable_relus(proto)
    from_proto = rewrite(proto, weights, qweights, acts)
    from_ir = rewrite(model, weights, qweights, acts)
    assert isinstance(from_ir.model, ir.Model) and from_ir.opset == from_proto.opset == 25
    assert [n.name for n in from_ir.model.graph] == [n.name for n in from_proto.model.graph.node]
    assert len(model.graph) == len(proto.graph.node)  # the input is not modified


def test_a_relu_between_matmulnbits_layers_is_kept_when_static_activations_are_planned():
    """MatMul + Add + Relu layers whose blocked INT4 weights take the MatMulNBits form read float activations,
    so their planned Q/DQ pairs are dropped; the Relus must stay (folded, nothing clamped: found on the
    synthetic large MLP, whose output then had an SQNR of -30 dB)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((64, 64)).astype(np.float32) * 0.2 for _ in range(3)]
    b = rng.standard_normal(64).astype(np.float32)
    nodes, x = [], "x"
    for k in range(2):
        nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"h{k}"], name=f"mm{k}"),
                  helper.make_node("Add", [f"h{k}", "b"], [f"a{k}"], name=f"add{k}"),
                  helper.make_node("Relu", [f"a{k}"], [f"r{k}"], name=f"relu{k}")]
        x = f"r{k}"
    nodes.append(helper.make_node("MatMul", [x, "w2"], ["y"], name="mm2"))
    inits = [numpy_helper.from_array(w, f"w{k}") for k, w in enumerate(ws)] + [numpy_helper.from_array(b, "b")]
    proto = helper.make_model(helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto = onnx.shape_inference.infer_shapes(proto)
    weights, _ = find_weights(proto)
    fmt = WeightFormat(4, "block", 32, symmetric=False)
    qweights = {w.name: quantize_weight(ws[int(w.name[1])], fmt, w.channel_axis, w.reduction_axis) for w in weights}
    acts = {t: activation_params(0.0, 8.0) for t in activation_tensors(proto, True)}
    emitted = rewrite(proto, weights, qweights, acts).model
    assert [n.op_type for n in emitted.graph.node].count("Relu") == 2
    xin = rng.standard_normal((4, 64)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xin})[0]

    ref, got = run(proto), run(emitted)
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > 15   # INT4 weights alone: no sign flips
