"""``--probes fast``: one-sided probes and costs scaled with the layer's quadratic form, against full probes."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from cet_onnx import pipeline
from cet_onnx.allocation.allocate import measure_cet, measure_cet_fast, probed_formats
from cet_onnx.allocation.stage import candidates, probe_session, sensitivities
from cet_onnx.cli import main
from cet_onnx.graph.weights import find_weights
from cet_onnx.options import QuantizeOptions
from cet_onnx.rounding.hessian import LayerHessian, LayerSpec, quadratic_error

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"


def _linear_model(path: Path, k: int = 64, n: int = 12) -> Path:
    """One MatMul ``y = x W`` (W [k, n]): with the MSE loss its loss is exactly quadratic in W."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.normal(size=(k, n)) * 0.3).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _linear_session(tmp_path, samples: int = 96, **opts):
    model = _linear_model(tmp_path / "linear.onnx")
    x = np.random.default_rng(1).normal(size=(samples, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    options = QuantizeOptions(avg_bits=4, device="cpu", weight_only=True, loss="mse", verify_size=0,
                              probe_size=samples, rounding="major-axis", **opts)
    p = pipeline.prepare(str(model), str(tmp_path / "calib.npz"), options, mixed=True)
    session, info = probe_session(p, options)
    return p, options, session, info, candidates(p, options)


def test_quadratic_error_is_the_layer_output_error():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    spec = LayerSpec("w", "linear", "x")
    layer = LayerHessian(spec)
    layer.update(x, rng, 10_000)
    h = layer.hessians()
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(np.zeros((8, 5), np.float32), "w")]))
    info = find_weights(model)[0][0]
    delta = rng.normal(size=(8, 5))
    expected = 2.0 / 40 * float(np.sum((x.astype(np.float64) @ delta) ** 2))
    assert quadratic_error(delta, info, spec, h) == pytest.approx(expected, rel=1e-5)


def test_extrapolation_is_exact_for_a_linear_layer_with_mse(tmp_path):
    p, opts, session, info, cand = _linear_session(tmp_path)
    assert info["probes_extrapolated"]
    full = measure_cet(session, cand)
    fast = measure_cet_fast(session, cand)
    q = cand.quadratic_forms(0)
    probed, ref = probed_formats(cand, 0, q)
    assert ref >= 0 and len(probed) < int(cand.available[0].sum())   # some formats were not probed
    assert fast.runs < full.runs / 2
    ok = cand.available
    np.testing.assert_allclose(fast.costs[ok], full.costs[ok], rtol=2e-3)
    extrapolated = [j for j in range(len(cand.formats)) if ok[0, j] and j not in probed]
    assert extrapolated and all(not fast.details[0][cand.formats[j].label]["probed"] for j in extrapolated)


def test_a_hessian_of_fewer_rows_than_columns_is_not_kept_for_extrapolation(tmp_path):
    # 48 samples, 64 inputs: the quadratic form (64³ per format) would cost more than probing
    _, _, session, info, cand = _linear_session(tmp_path, samples=48)
    assert info["probes_extrapolated"] and cand.quadratic_forms(0) is None
    fast = measure_cet_fast(session, cand)
    assert all(d["probed"] for d in fast.details[0].values())


def test_without_extrapolation_every_format_is_probed_once(tmp_path):
    _, _, session, _, cand = _linear_session(tmp_path)
    fast = measure_cet_fast(session, cand, extrapolate=False)
    full = measure_cet(session, cand)
    # one pass per format, plus one per weight for its suffix's float loss (downstream-only probes)
    assert session.downstream
    batches, weights = len(session.batches), len(cand.weights)
    assert fast.runs == full.runs // 2 + weights * batches
    np.testing.assert_allclose(fast.costs[cand.available], full.costs[cand.available], rtol=1e-7)  # (L₊−L₋)/2 + (L₊+L₋−2L₀)/2 vs L₊−L₀


def test_full_mode_is_todays_probes_and_keeps_no_hessians(tmp_path):
    p, opts, session, info, cand = _linear_session(tmp_path, probes="full", use_cache=False)
    assert not info["probes_extrapolated"] and cand.quadratic_forms(0) is None
    sens = sensitivities(p, opts, session, cand, "cet", info)
    ref = measure_cet(session, cand)
    np.testing.assert_array_equal(sens.costs, ref.costs)
    assert {"first_order", "curvature"} <= set(sens.details[0]["int4a/ch"])


def test_labels_or_deployed_numerics_turn_extrapolation_off():
    from cet_onnx.allocation.stage import extrapolates
    assert extrapolates("fast", "logmse", "float")
    assert not extrapolates("fast", "ce", "float")
    assert not extrapolates("fast", "logmse", "deployed")
    assert not extrapolates("full", "mse", "float")


def test_probes_option_is_validated():
    from cet_onnx.errors import InputError
    with pytest.raises(InputError, match="--probes"):
        pipeline.prepare("unused.onnx", None, QuantizeOptions(probes="quick"))


def test_fast_probes_keep_fidelity_on_digits(tmp_path):
    res = CliRunner().invoke(main, [str(a) for a in (
        "quantize", DIGITS / "model.onnx", "-o", tmp_path / "m.onnx", "--calib", DIGITS / "calib.npz",
        "--calib-size", 96, "--probe-size", 32, "--fidelity-samples", 12, "--avg-bits", 3, "--no-cache",
        "-q", "--json")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    a = json.loads(res.stdout)["allocation"]
    assert a["probes"] == "fast" and a["probes_extrapolated"]
    assert a["fidelity"]["spearman"] >= 0.9
