"""The QDQ rewriter on small graphs: checker-valid, loads in onnxruntime, numerics as designed."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from cet_onnx.graph.passes.constants_to_initializers import constants_to_initializers
from cet_onnx.quant.quantizer import WeightFormat, activation_params, quantize_weight
from cet_onnx.graph.rewriter import activation_tensors, removable_relus, rewrite
from cet_onnx.calibration.observe import collect_ranges
from cet_onnx.graph.weights import find_weights

from models import small_cnn, small_mlp

RNG = np.random.default_rng(3)


def _run(model, feed, optimize=True):
    opts = ort.SessionOptions()
    if not optimize:  # onnxruntime fuses DQ+MatMul into MatMulNBits, which quantizes activations
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def _quantize(model, fmt_for, acts=True, symmetric=False, data=None):
    model = onnx.shape_inference.infer_shapes(model)
    weights, _ = find_weights(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qweights = {w.name: quantize_weight(inits[w.name], fmt_for(w), w.channel_axis, w.reduction_axis) for w in weights}
    params = None
    if acts:
        tensors = activation_tensors(model, remove_relus=not symmetric)
        ranges = collect_ranges(model, tensors, [data], ["CPUExecutionProvider"])
        params = {t: activation_params(lo, hi, 8, symmetric) for t, (lo, hi) in ranges.items()}
    return weights, qweights, rewrite(model, weights, qweights, params)


def _fake_quantized_float(model, qweights):
    """The float model with each weight replaced by its dequantized value."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in qweights:
            t.CopyFrom(numpy_helper.from_array(qweights[t.name].dequantize(), t.name))
    return m


@pytest.mark.parametrize("bits,kind", [(8, "channel"), (4, "channel"), (4, "block"), (3, "tensor"), (2, "channel"),
                                       (2, "tensor"), (2, "block")])
@pytest.mark.parametrize("builder", ["cnn", "cnn_const", "mlp"])
def test_weight_only_model_equals_fake_quantized_float(bits, kind, builder):
    model = {"cnn": lambda: small_cnn(), "cnn_const": lambda: small_cnn(constant_weights=True),
             "mlp": lambda: small_mlp()}[builder]()
    constants_to_initializers(model)
    fmt = lambda w: WeightFormat(bits, kind, 4 if kind == "block" else None)  # noqa: E731
    weights, qweights, res = _quantize(model, fmt, acts=False)
    assert len(weights) == (4 if builder != "mlp" else 2)
    onnx.checker.check_model(res.model, full_check=True)
    assert res.opset == (25 if bits == 2 else 21 if bits < 8 or kind == "block" else 17)
    x = RNG.normal(size=(5, 3, 8, 8) if builder != "mlp" else (5, 16)).astype(np.float32)
    expected = _run(_fake_quantized_float(model, qweights), {"x": x})
    np.testing.assert_allclose(_run(res.model, {"x": x}, optimize=False), expected, rtol=1e-5, atol=1e-5)
    _run(res.model, {"x": x})  # and it loads with all of onnxruntime's fusions on
    # weights are really stored packed in their integer type
    stored = {t.name: t for t in res.model.graph.initializer}
    for w in weights:
        t = stored[f"{w.name}_quantized"]
        assert t.data_type == {8: onnx.TensorProto.INT8, 4: onnx.TensorProto.INT4, 2: onnx.TensorProto.INT2}[
            8 if bits > 4 else 4 if bits > 2 else 2]
        assert len(t.raw_data) == -(-w.size * (8 if bits > 4 else 4 if bits > 2 else 2) // 8)


def test_qdq_cnn_has_activation_qdq_int32_bias_and_fused_relus():
    model = small_cnn()
    x = RNG.normal(size=(16, 3, 8, 8)).astype(np.float32)
    _, qweights, res = _quantize(model, lambda w: WeightFormat(8), data={"x": x})
    onnx.checker.check_model(res.model, full_check=True)
    ops = [n.op_type for n in res.model.graph.node]
    # relu1 and relu3 follow a Conv; relu2 follows Add: all three are removable
    assert ops.count("Relu") == 0
    assert ops.count("QuantizeLinear") == len(activation_tensors(onnx.shape_inference.infer_shapes(small_cnn()), True)) == 7
    inits = {t.name: t for t in res.model.graph.initializer}
    for b in ("c1.b", "c2.b", "dw.b", "fc.b"):
        assert inits[f"{b}_quantized"].data_type == onnx.TensorProto.INT32
    y = _run(res.model, {"x": x})
    ref = _run(model, {"x": x})
    assert np.mean(np.argmax(y, 1) == np.argmax(ref, 1)) >= 0.9
    assert np.abs(y - ref).max() < 0.2 * np.abs(ref).max()


def test_symmetric_activations_keep_relus():
    model = small_cnn()
    x = RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)
    _, _, res = _quantize(model, lambda w: WeightFormat(8), symmetric=True, data={"x": x})
    assert [n.op_type for n in res.model.graph.node].count("Relu") == 3
    assert all(t.data_type != onnx.TensorProto.UINT8 for t in res.model.graph.initializer)
    _run(res.model, {"x": x})


def test_relu_not_removed_when_its_input_has_another_consumer():
    model = small_cnn()
    # r1 feeds conv2 and the residual Add, but relu1's *input* c1 has only relu1: removable.
    assert len(removable_relus(model)) == 3
    # let c1 also be a graph output: relu1 must stay
    model.graph.output.append(onnx.helper.make_tensor_value_info("c1", onnx.TensorProto.FLOAT, None))
    assert len(removable_relus(model)) == 2


def test_residual_add_inputs_are_quantized_and_graph_output_stays_float():
    model = onnx.shape_inference.infer_shapes(small_cnn())
    tensors = activation_tensors(model, remove_relus=True)
    assert "x" in tensors and "c2" in tensors and "r1" in tensors
    assert "logits" not in tensors


def test_shared_weight_is_quantized_once():
    from onnx import TensorProto, helper
    w = numpy_helper.from_array(RNG.normal(size=(16, 16)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    weights, skipped = find_weights(model)
    assert [x.name for x in weights] == ["w"] and len(weights[0].consumers) == 2 and not skipped
    _, qweights, res = _quantize(model, lambda w: WeightFormat(4), acts=False)
    x = RNG.normal(size=(3, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(res.model, {"x": x}, False), _run(_fake_quantized_float(model, qweights), {"x": x}),
                               rtol=1e-5, atol=1e-5)


def test_hardswish_split_is_exact_and_gets_quantized_mul():
    from onnx import TensorProto, helper
    from cet_onnx.graph.passes.split_hardswish import decompose_hardswish
    w = numpy_helper.from_array(RNG.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("HardSwish", ["c"], ["h"]),
             helper.make_node("Conv", ["h", "w2"], ["y"])]
    w2 = numpy_helper.from_array(RNG.normal(size=(2, 4, 1, 1)).astype(np.float32), "w2")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, w2])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = RNG.normal(size=(4, 3, 6, 6)).astype(np.float32) * 4
    ref = _run(model, {"x": x})
    split = onnx.ModelProto()
    split.CopyFrom(model)
    assert decompose_hardswish(split) == 1
    assert [n.op_type for n in split.graph.node] == ["Conv", "HardSigmoid", "Mul", "Conv"]
    np.testing.assert_allclose(_run(split, {"x": x}), ref, rtol=1e-5, atol=1e-5)
    tensors = activation_tensors(onnx.shape_inference.infer_shapes(split), remove_relus=True)
    assert {"c", "h_hardsigmoid", "h"} <= set(tensors)  # the Conv output and both Mul inputs


def test_int2_conv_of_a_static_model_is_widened_gets_an_int32_bias_and_runs_as_qlinearconv():
    from cet_onnx.kernels import inspect_kernels

    model = onnx.shape_inference.infer_shapes(small_cnn())
    x = RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)
    _, qweights, res = _quantize(model, lambda w: WeightFormat(2), data={"x": x})
    convs = [n.name for n in res.model.graph.node if n.op_type == "Conv"]
    assert convs and len(res.quantized_biases) >= len(convs)
    assert inspect_kernels(res.model, ["CPUExecutionProvider"]).ops.get("QLinearConv") == len(convs)
    np.testing.assert_allclose(_run(res.model, {"x": x}, optimize=True), _run(res.model, {"x": x}, optimize=False),
                               rtol=1e-4, atol=1e-4)


def test_int2_conv_without_activation_quantization_keeps_a_float_bias():
    """No INT8 kernel runs it: onnxruntime must not fuse the 2-bit type (a float bias stops its selectors)."""
    model = onnx.shape_inference.infer_shapes(small_cnn())
    x = RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)
    nobias = onnx.ModelProto()
    nobias.CopyFrom(model)
    conv1 = next(n for n in nobias.graph.node if n.name == "conv1")
    del conv1.input[2]
    _, _, res2 = _quantize(nobias, lambda w: WeightFormat(2), acts=False, data={"x": x})
    conv1 = next(n for n in res2.model.graph.node if n.name == "conv1")
    zero = {t.name: t for t in res2.model.graph.initializer}[conv1.input[2]]
    assert zero.data_type == onnx.TensorProto.FLOAT and not numpy_helper.to_array(zero).any()
    np.testing.assert_allclose(_run(res2.model, {"x": x}, optimize=True), _run(res2.model, {"x": x}, optimize=False),
                               rtol=1e-4, atol=1e-4)
