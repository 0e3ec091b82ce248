"""Per-tensor error report: SQNR of every weight and of the activations around each weight's layer."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cet_onnx.cli import main
from cet_onnx.tensor_errors import array_sqnr_db, worst
from models import encoder_feeds, small_cnn, tiny_encoder


def _quantize(model, out, calib, *extra):
    res = CliRunner().invoke(main, [str(a) for a in ("quantize", model, "-o", out, "--calib", calib, "-q", *extra)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads((out.parent / f"{out.stem}.report.json").read_text()), res.output


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    d = tmp_path_factory.mktemp("cnn")
    onnx.save(small_cnn(), d / "m.onnx")
    np.savez(d / "calib.npz", x=np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32))
    return d


def _rows(report, kind):
    return {r["name"]: r for r in report["tensor_errors"]["tensors"] if r["kind"] == kind}


def test_sqnr_counts_only_positions_finite_in_both():
    ref = np.array([1.0, -np.inf, 2.0, 3.0], np.float32)
    test = np.array([1.0, -np.inf, 2.0, 2.0], np.float32)
    assert array_sqnr_db(ref, test) == pytest.approx(10 * np.log10(14.0 / 1.0))
    assert array_sqnr_db(ref, ref) == float("inf")


def test_every_weight_and_the_activations_around_its_layer_get_an_sqnr(cnn, tmp_path):
    w8, _ = _quantize(cnn / "m.onnx", tmp_path / "w8.onnx", cnn / "calib.npz")
    w4, _ = _quantize(cnn / "m.onnx", tmp_path / "w4.onnx", cnn / "calib.npz", "--weight-bits", "4")
    weights8, weights4 = _rows(w8, "weight"), _rows(w4, "weight")
    assert set(weights8) == {w["name"] for w in w8["weights"]}
    for name, row in weights8.items():
        assert row["sqnr_db"] > 35.0                         # 8-bit per-channel on a normal weight: ~40 dB
        assert weights4[name]["sqnr_db"] < row["sqnr_db"] - 10.0   # ~6 dB per bit
    acts = _rows(w8, "activation")
    quantized = [r for r in acts.values() if r["precision"] == "int8 static"]
    assert len(quantized) == w8["activation_tensors"] > 0
    for r in quantized:
        # the quantizer's own error at 8 bits (none where its input is already on its grid: Flatten of a
        # dequantized tensor); a Relu folded into its range is not counted as error
        assert float(r["quantizer_sqnr_db"]) > 25.0, r
        assert float(r["sqnr_db"]) <= float(r["quantizer_sqnr_db"]) + 1e-6 or r["role"].startswith("input of Conv 'conv1'")
    assert acts["logits"]["precision"] == "float" and acts["logits"]["quantizer_sqnr_db"] is None


def test_the_summary_names_the_worst_tensors(cnn, tmp_path):
    report, stderr = _quantize(cnn / "m.onnx", tmp_path / "w4.onnx", cnn / "calib.npz", "--weight-bits", "4")
    rows = report["tensor_errors"]["tensors"]
    assert "worst tensors (SQNR against the float model, held-out data" in stderr
    for r in worst(rows, "activation") + worst(rows, "weight"):
        assert f"{r['kind']} '{r['name']}' ({r['precision']}" in stderr
    assert worst(rows, "weight", 1)[0]["sqnr_db"] == min(float(r["sqnr_db"]) for r in rows if r["kind"] == "weight")


def test_dynamic_matmul_inputs_are_reported_with_their_run_time_quantizer(tmp_path):
    onnx.save(tiny_encoder(mask_value=-np.inf), tmp_path / "enc.onnx")
    np.savez(tmp_path / "calib.npz", **encoder_feeds(48))
    report, _ = _quantize(tmp_path / "enc.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz")
    assert report["activation_mode"]["mode"] == "dynamic"
    dynamic = [r for r in _rows(report, "activation").values() if r["precision"] == "int8 dynamic"]
    runtime_quantizers = [n for n in onnx.load(tmp_path / "q.onnx").graph.node if n.op_type == "DynamicQuantizeLinear"]
    assert len(dynamic) == len(runtime_quantizers) > 0
    for r in dynamic:
        assert r["role"].startswith("input of ") and 20.0 < r["quantizer_sqnr_db"] < 60.0, r


def test_analyze_activations_measures_each_quantizer_alone(cnn, tmp_path):
    prefix = tmp_path / "acts"
    res = CliRunner().invoke(main, [str(a) for a in ("analyze", cnn / "m.onnx", "--calib", cnn / "calib.npz",
                                                     "--activations", "-o", prefix, "-q")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    acts = json.loads((tmp_path / "acts.json").read_text())["activations"]
    by = {(r["tensor"], r["precision"]): r for r in acts["points"]}
    tensors = {t for t, _ in by}
    assert tensors and all((t, "int16 static") in by for t in tensors)
    for t in tensors:
        a8, a16 = by[(t, "int8 static")], by[(t, "int16 static")]
        # 8 more bits: ~256x (48 dB) smaller error over the same range; the default mse range clips the
        # 8-bit grid to the bulk (several dB) while 16 bits keeps the full range, so the gap is a little less
        assert a16["quantizer_sqnr_db"] > a8["quantizer_sqnr_db"] + 30.0
        assert abs(a16["delta_loss"]) < 0.01 * a8["delta_loss"]
        assert a8["delta_loss"] > 0
    assert len(acts["fidelity"]["assignments"]) == 12
    rows = (tmp_path / "acts.csv").read_text().splitlines()
    assert rows[0].startswith("tensor,precision,method,delta_loss,quantizer_sqnr_db") and len(rows) == 1 + len(by)
    assert "most sensitive activations at int8 static" in res.output


def test_analyze_activations_compares_range_methods_per_tensor(cnn, tmp_path):
    prefix = tmp_path / "acts"
    res = CliRunner().invoke(main, [str(a) for a in ("analyze", cnn / "m.onnx", "--calib", cnn / "calib.npz",
                                                     "--activations", "--compare-methods", "--fidelity-samples", "0",
                                                     "-o", prefix, "-q")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    acts = json.loads((tmp_path / "acts.json").read_text())["activations"]
    eight = [r for r in acts["points"] if r["precision"] == "int8 static"]
    tensors = {r["tensor"] for r in eight}
    assert {r["method"] for r in eight} == {"minmax", "percentile", "entropy", "mse"}
    assert set(acts["best_method"]) == tensors
    for t, m in acts["best_method"].items():
        losses = {r["method"]: r["delta_loss"] for r in eight if r["tensor"] == t}
        assert losses[m] == min(losses.values())
    assert "best 8-bit range method per tensor:" in res.output


def test_analyze_joint_checks_weights_and_activations_quantized_together(cnn, tmp_path):
    prefix = tmp_path / "joint"
    res = CliRunner().invoke(main, [str(a) for a in ("analyze", cnn / "m.onnx", "--calib", cnn / "calib.npz",
                                                     "--activations", "--joint", "--bits", "2,4,8", "-o", prefix)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "joint.json").read_text())
    joint, weights = result["joint_fidelity"], result["weights"]
    rows = joint["assignments"]
    assert len(rows) == 12 and joint["weights"] == len(weights["cet"]) and joint["activation_points"] > 0
    assert all(r["predicted"] == pytest.approx(r["predicted_weights"] + r["predicted_activations"]) for r in rows)
    assert len({r["activation_points"] for r in rows}) > 1 and len({r["bytes"] for r in rows}) > 1   # both kinds vary
    assert all(np.isfinite(r["measured"]) for r in rows)
    assert joint["spearman"] > 0.7        # the summed single probes rank the joint assignments
    assert "joint fidelity over 12 random assignments" in res.output


def test_compare_methods_without_activations_is_a_usage_error(cnn):
    before = set(cnn.iterdir())
    res = CliRunner().invoke(main, ["analyze", str(cnn / "m.onnx"), "--compare-methods"])
    assert res.exit_code == 2 and "needs --activations" in res.output
    assert len(res.output.strip().splitlines()) == 1 and set(cnn.iterdir()) == before   # nothing written
    res = CliRunner().invoke(main, ["analyze", str(cnn / "m.onnx"), "--joint"])
    assert res.exit_code == 2 and "needs --activations" in res.output and set(cnn.iterdir()) == before


def test_a_large_model_runs_one_session_at_a_time_with_the_same_result(cnn, tmp_path, monkeypatch):
    import onnx_ir as ir

    from cet_onnx import tensor_errors
    from cet_onnx.graph.weights import find_weights
    _quantize(cnn / "m.onnx", tmp_path / "q.onnx", cnn / "calib.npz")
    model, qmodel = ir.load(cnn / "m.onnx"), ir.load(tmp_path / "q.onnx")
    weights, _ = find_weights(model)
    batches = [{"x": np.random.default_rng(i).normal(size=(8, 3, 8, 8)).astype(np.float32)} for i in range(3)]
    side_by_side = tensor_errors.activation_errors(model, qmodel, weights, batches, ["CPUExecutionProvider"])
    monkeypatch.setattr(tensor_errors, "SIDE_BY_SIDE_MAX_BYTES", 0)
    one_at_a_time = tensor_errors.activation_errors(model, qmodel, weights, batches, ["CPUExecutionProvider"])
    assert side_by_side and one_at_a_time == side_by_side


def test_16_bit_activations_are_reported_as_such(cnn, tmp_path):
    report, _ = _quantize(cnn / "m.onnx", tmp_path / "a16.onnx", cnn / "calib.npz", "--act-bits", "16")
    quantized = [r for r in _rows(report, "activation").values() if r["precision"] != "float"]
    assert quantized and all(r["precision"] == "int16 static" for r in quantized)
    # ~48 dB more than 8 bits where the range holds; the model input clips a little on held-out data
    assert np.median([float(r["quantizer_sqnr_db"]) for r in quantized]) > 80.0


def test_batches_whose_tensors_exceed_the_run_budget_run_in_pieces_with_the_same_result(cnn, tmp_path, monkeypatch):
    import onnx_ir as ir

    from cet_onnx import exposed, tensor_errors
    from cet_onnx.exposed import ExposedSession
    from cet_onnx.graph.weights import find_weights
    _quantize(cnn / "m.onnx", tmp_path / "q.onnx", cnn / "calib.npz")
    model, qmodel = ir.load(cnn / "m.onnx"), ir.load(tmp_path / "q.onnx")
    weights, _ = find_weights(model)
    batches = [{"x": np.random.default_rng(i).normal(size=(8, 3, 8, 8)).astype(np.float32)} for i in range(3)]
    sizes: list[int] = []
    run = ExposedSession.run

    def counted(self, feed):
        sizes.append(feed["x"].shape[0])
        return run(self, feed)

    monkeypatch.setattr(ExposedSession, "run", counted)
    whole = tensor_errors.activation_errors(model, qmodel, weights, batches, ["CPUExecutionProvider"], splittable=True)
    assert set(sizes) == {1, 8}                     # one sample to size the runs, then whole batches: they fit
    sizes.clear()
    monkeypatch.setattr(exposed, "RUN_MAX_BYTES", 1)
    pieces = tensor_errors.activation_errors(model, qmodel, weights, batches, ["CPUExecutionProvider"], splittable=True)
    assert set(sizes) == {1} and len(sizes) == 2 * (1 + 24)   # both sessions: the sizing run, then every sample
    assert [r["name"] for r in pieces] == [r["name"] for r in whole]
    for a, b in zip(whole, pieces):
        assert a["sqnr_db"] == pytest.approx(b["sqnr_db"], abs=1e-3)
