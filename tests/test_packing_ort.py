"""onnxruntime's DequantizeLinear decodes our packed INT2/INT4/INT8 weights exactly as we do."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cet_onnx.graph.tensors import make_int_tensor
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight

RNG = np.random.default_rng(1)


def _dq_model(qw, name="w"):
    opset = 25 if qw.fmt.bits <= 2 else 21
    attrs = {}
    if qw.axis is not None:
        attrs["axis"] = qw.axis
    if qw.block_size is not None:
        attrs["block_size"] = qw.block_size
    inits = [make_int_tensor(f"{name}_q", qw.q, qw.fmt.bits), numpy_helper.from_array(qw.scale, f"{name}_s"),
             make_int_tensor(f"{name}_zp", qw.zero_point, qw.fmt.bits)]
    node = helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_zp"], ["y"], **attrs)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(qw.q.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
@pytest.mark.parametrize("shape", [(7, 33), (6, 40, 3, 3)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ort_dequantize_matches_numpy(bits, kind, shape, symmetric):
    w = (RNG.normal(size=shape) + (0 if symmetric else 0.7)).astype(np.float32)
    fmt = WeightFormat(bits, kind, 16 if kind == "block" else None, symmetric=symmetric)
    qw = quantize_weight(w, fmt, channel_axis=0, reduction_axis=1, clip_ratio="mse")
    if not symmetric:
        assert np.any(qw.zero_point != 0)
    sess = ort.InferenceSession(_dq_model(qw).SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {})
    assert y.shape == w.shape
    np.testing.assert_array_equal(y, qw.dequantize())
