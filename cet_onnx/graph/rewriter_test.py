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
