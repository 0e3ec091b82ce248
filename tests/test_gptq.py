"""Major-axis rounding: lower layer-output error than round-to-nearest; im2col matches onnxruntime's Conv."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cet_onnx.rounding.gptq import gptq_round, major_axis_rounding
from cet_onnx.rounding.hessian import LayerSpec, conv_patches, from_rows, linear_rows, patch_count, to_rows
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight
from cet_onnx.graph.weights import WeightInfo

RNG = np.random.default_rng(11)


def _correlated_inputs(n, k):
    """Inputs with a strongly non-isotropic covariance (a few dominant directions)."""
    basis = RNG.normal(size=(k, k))
    spectrum = np.exp(-np.arange(k) / 6.0)
    return (RNG.normal(size=(n, k)) * spectrum) @ basis


@pytest.mark.parametrize("bits,granularity,symmetric", [(2, "channel", False), (3, "block", False),
                                                        (4, "channel", True), (4, "block", False),
                                                        (8, "channel", True)])
def test_major_axis_beats_round_to_nearest_on_least_squares_layer(bits, granularity, symmetric):
    k, rows = 64, 24
    x = _correlated_inputs(1024, k)
    w = RNG.normal(size=(k, rows)).astype(np.float32)            # MatMul B [K, N]
    info = WeightInfo("w", (k, rows), "MatMul", channel_axis=1, reduction_axis=0)
    spec = LayerSpec("w", "linear", "x")
    h = 2 * x.T @ x / len(x)
    fmt = WeightFormat(bits, granularity, 16 if granularity == "block" else None, symmetric=symmetric)
    rtn = quantize_weight(w, fmt, 1, 0)
    gptq = quantize_weight(w, fmt, 1, 0, rounding=major_axis_rounding(info, spec, [h]))
    # same scales, same code range; only the rounding differs
    np.testing.assert_array_equal(rtn.scale, gptq.scale)
    lo, hi = (-(2 ** (bits - 1)) + symmetric, 2 ** (bits - 1) - 1)
    assert gptq.q.min() >= lo and gptq.q.max() <= hi
    err = lambda q: np.linalg.norm(x @ (q.dequantize() - w))  # noqa: E731
    assert err(gptq) < 0.95 * err(rtn)


def test_gptq_with_identity_hessian_is_round_to_nearest():
    w = RNG.normal(size=(8, 32))
    s = np.full(w.shape, 0.1)
    z = np.zeros(w.shape)
    q = gptq_round(w, np.eye(32), s, z, -7, 7, damp=0.0)
    np.testing.assert_array_equal(q, np.clip(np.rint(w / s), -7, 7))


@pytest.mark.parametrize("group,stride,pad,dilation", [(1, 1, 1, 1), (2, 2, 0, 1), (4, 1, 2, 2), (8, 1, 1, 1)])
def test_conv_patches_reproduce_onnxruntime_conv(group, stride, pad, dilation):
    c, o = 8, 8
    x = RNG.normal(size=(2, c, 9, 7)).astype(np.float32)
    w = RNG.normal(size=(o, c // group, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, strides=[stride, stride], pads=[pad] * 4,
                            dilations=[dilation, dilation])
    g = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]                       # [N, O, oh, ow]
    spec = LayerSpec("w", "conv2d", "x", group=group, kernel=(3, 3), strides=(stride, stride), pads=(pad,) * 4,
                     dilations=(dilation, dilation))
    info = WeightInfo("w", w.shape, "Conv", 0, 1)
    w2 = to_rows(w, info)
    per = o // group
    for gi, p in enumerate(conv_patches(x, spec)):
        out = p @ w2[gi * per:(gi + 1) * per].T            # [N·oh·ow, O/g]
        ref = y[:, gi * per:(gi + 1) * per].transpose(0, 2, 3, 1).reshape(-1, per)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_conv_patches_of_sampled_rows_are_those_rows_of_all_patches():
    x = RNG.normal(size=(3, 8, 9, 7)).astype(np.float32)
    spec = LayerSpec("w", "conv2d", "x", group=4, kernel=(3, 3), strides=(2, 1), pads=(1,) * 4, dilations=(1, 2))
    full = conv_patches(x, spec)
    assert full.shape[1] == patch_count(x, spec)
    rows = np.sort(RNG.choice(full.shape[1], 17, replace=False))
    np.testing.assert_array_equal(conv_patches(x, spec, rows), full[:, rows])


@pytest.mark.parametrize("shape,channel_axis", [((5, 7), 0), ((5, 7), 1), ((6, 3, 3, 3), 0)])
def test_rows_layout_round_trip(shape, channel_axis):
    w = RNG.normal(size=shape)
    info = WeightInfo("w", shape, "X", channel_axis, 1 - channel_axis if len(shape) == 2 else 1)
    w2 = to_rows(w, info)
    assert w2.shape[0] == shape[channel_axis]
    np.testing.assert_array_equal(from_rows(w2, shape, info), w)


def test_linear_rows_transposes_left_operand_inputs():
    x = RNG.normal(size=(4, 6))
    np.testing.assert_array_equal(linear_rows(x, LayerSpec("w", "linear", "x", transpose_input=True)), x.T)
    np.testing.assert_array_equal(linear_rows(x[None], LayerSpec("w", "linear", "x")), x)


def test_layer_inputs_count_real_tokens_only():
    from cet_onnx.calibration.padding import token_mask
    from cet_onnx.rounding.hessian import real_tokens
    tokens = token_mask({"input_ids": np.ones((2, 4)), "attention_mask": np.array([[1, 1, 0, 0], [1, 1, 1, 0]])})
    x = RNG.normal(size=(2, 4, 3))
    spec = LayerSpec("w", "linear", "x")
    np.testing.assert_array_equal(real_tokens(x, spec, tokens), np.concatenate([x[0, :2], x[1, :3]]))
    np.testing.assert_array_equal(real_tokens(x.reshape(8, 3), spec, tokens), np.concatenate([x[0, :2], x[1, :3]]))
    assert real_tokens(x, LayerSpec("w", "linear", "x", transpose_input=True), tokens) is x
    swapped = x.reshape(4, 2, 3)                       # [sequence, batch, K]: not the mask's layout
    assert real_tokens(swapped, spec, tokens) is swapped
    other = RNG.normal(size=(5, 3))                    # rows that are not the batch's positions
    assert real_tokens(other, spec, tokens) is other
    assert real_tokens(x, spec, None) is x and token_mask({"x": np.ones((2, 4))}) is None
