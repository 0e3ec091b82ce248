"""Latency as a solver resource: each layer timed in its deployed form, the budget an exact MILP row."""

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from cet_onnx.allocation import layer_latency as L
from cet_onnx.cli import main
from cet_onnx.kernels import inspect_kernels
from cet_onnx.options import AllocationOptions, QuantizeOptions
from cet_onnx.pipeline import prepare
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"


@pytest.fixture(scope="module")
def digits():
    opts = QuantizeOptions(allocation=AllocationOptions(avg_bits=4))
    return prepare(DIGITS / "model.onnx", str(DIGITS / "calib.npz"), opts, mixed=True)


def _layer(p, w, fmt):
    """The static-mode layer of weight ``w`` in ``fmt``, as it is timed."""
    from cet_onnx.latency import latency_feed
    acts = L.layer_activations(p.model, p.weights, latency_feed(p.calib_batches, 1), p.providers)
    node = next(n for n in p.model.graph if n.name == w.consumers[0])
    layer = L._layer_model(p.model, node, w, acts, p.values)
    names = {v.name for v in node.inputs if v is not None} | {o.name for o in node.outputs}
    relu = L._relu_after(node)
    if relu is not None:
        names.add(relu.outputs[0].name)
    la = {k: v for k, v in p.act_params.items() if k in names}
    qw = quantize_weight(np.asarray(p.values[w.name]), fmt, w.channel_axis, w.reduction_axis)
    emitted = L.rewrite(ir.from_proto(layer), [w], {w.name: qw}, la).model
    return L.deployed_boundary(ir.to_proto(emitted), {i.name: acts[i.name] for i in layer.graph.input}, la)


def test_an_int8_conv_layer_is_timed_as_the_qlinearconv_it_becomes(digits):
    w = next(w for w in digits.weights if w.name == "block1.cb1.0.weight")   # Conv + Relu, input and output quantized
    proto, feed = _layer(digits, w, WeightFormat(8, "channel"))
    assert inspect_kernels(proto, digits.providers).ops == {"QLinearConv": 1}
    assert all(v.dtype == np.uint8 for v in feed.values())   # it receives codes, as inside the quantized model
    proto, _ = _layer(digits, w, WeightFormat(4, "channel", symmetric=False))
    k = inspect_kernels(proto, digits.providers)
    assert k.dequantized_at_run_time == [{"weight": w.name, "consumer_op": "Conv"}]


def test_every_available_format_gets_a_finite_cost_and_unavailable_ones_none(digits, tmp_path):
    fmts = [WeightFormat(8, "channel"), WeightFormat(4, "block", 32, symmetric=False)]
    available = np.array([[True, w.shape[w.reduction_axis] >= 32] for w in digits.weights])
    from cet_onnx.latency import latency_feed
    lat = L.measure_layer_latencies(digits.model, digits.weights, fmts, available, digits.values,
                                    latency_feed(digits.calib_batches, 1), digits.act_params, "static",
                                    digits.providers, 1, tmp_path)
    assert np.isfinite(lat.delta_ms[available]).all() and np.isnan(lat.delta_ms[~available]).all()
    assert all(t is not None and t > 0 for t in lat.float_layer_ms)
    assert len(list(tmp_path.glob("latency-*.json"))) == len(digits.weights)   # cached per layer
    again = L.measure_layer_latencies(digits.model, digits.weights, fmts, available, digits.values,
                                      latency_feed(digits.calib_batches, 1), digits.act_params, "static",
                                      digits.providers, 1, tmp_path)
    np.testing.assert_array_equal(again.delta_ms, lat.delta_ms)


def _quantize(tmp_path, *extra):
    return CliRunner().invoke(main, ["quantize", str(DIGITS / "model.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                                     str(DIGITS / "calib.npz"), "--fidelity-samples", "0", "--refine-rounds", "1",
                                     "--cache-dir", str(tmp_path / "cache"), *extra])


def test_a_latency_budget_is_met_in_the_prediction_and_reported(tmp_path):
    # batch 16: the all-INT8 model runs at about 0.6x float here, so the budget leaves room to choose
    res = _quantize(tmp_path, "--avg-bits", "7.8", "--max-latency-ratio", "1.0", "--latency-batch", "16", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    lb = report["allocation"]["latency_budget"]
    assert lb["constraint"] == "--max-latency-ratio 1.0" and lb["batch"] == 16
    assert lb["predicted_ms"] <= lb["budget_ms"] + 1e-6
    assert report["latency"]["batch"] == 16 and report["latency"]["ratio"] > 0
    assert set(lb["per_weight"]) == {w["name"] for w in report["weights"]}


def test_an_unreachable_latency_budget_says_which_size_it_allows(tmp_path):
    res = _quantize(tmp_path, "--avg-bits", "2.5", "--max-latency-ratio", "0.05", "--latency-batch", "16")
    assert res.exit_code == 2
    assert "--max-latency-ratio 0.05 cannot be met" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["--max-latency-ratio", "1.0"], "give --avg-bits, --max-size or --max-loss too"),
    (["--avg-bits", "4", "--max-latency", "1", "--max-latency-ratio", "1"], "only one of --max-latency"),
    (["--avg-bits", "4", "--max-latency-ratio", "1", "--latency-batch", "0"], "cannot be 0"),
    (["--avg-bits", "4", "--max-latency-ratio", "1", "--allocator", "uniform"], "not uniform"),
])
def test_latency_budget_option_errors(tmp_path, args, message):
    res = _quantize(tmp_path, *args)
    assert res.exit_code == 2 and message in res.output, res.output
