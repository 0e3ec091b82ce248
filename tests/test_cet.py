"""CET mixed precision end to end: probes, cache, analyze, budgets, closed loop, size accounting."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from cet_onnx.allocation.allocate import Candidates, candidate_formats
from cet_onnx.cli import main
from cet_onnx.allocation.probes import ProbeSession
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight
from cet_onnx.graph.weights import find_weights

from models import small_cnn

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"
FAST = ["--calib-size", "96", "--probe-size", "32", "--fidelity-samples", "4", "-q", "--json"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def cnn_session():
    model = onnx.shape_inference.infer_shapes(small_cnn())
    weights, _ = find_weights(model)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)
    session = ProbeSession(ir.from_proto(model), weights, {w.name: values[w.name] for w in weights}, None,
                           [{"x": x[:8]}, {"x": x[8:]}],
                           ["CPUExecutionProvider"], "kl", "logits")
    return session, weights, values


def test_downstream_probes_cost_what_whole_model_probes_cost(cnn_session, monkeypatch):
    """A one-sided probe runs only the graph after the weight, on cut tensors computed once per group;
    a tiny cache splits the weights into groups and leaves a weight whose cut alone is larger to
    the whole model. Every way gives the whole model's costs."""
    from cet_onnx.allocation import downstream
    session, weights, values = cnn_session
    whole = ProbeSession(session_model := ir.from_proto(onnx.shape_inference.infer_shapes(small_cnn())), weights,
                         {w.name: values[w.name] for w in weights}, None, session.batches,
                         ["CPUExecutionProvider"], "kl", "logits", downstream=False)
    assert session._downstream is not None and whole._downstream is None
    probes = {w.name: quantize_weight(values[w.name], WeightFormat(2), w.channel_axis, w.reduction_axis).dequantize()
              for w in weights}
    expected = {n: whole.probe_one_sided(n, q) for n, q in probes.items()}
    runs0 = session.runs
    for n, q in probes.items():
        assert session.probe_one_sided(n, q) == pytest.approx(expected[n], rel=1e-5, abs=1e-9)
    assert session._downstream._groups and all(session._downstream.suffix(n) is not None for n in probes)
    cuts = session._downstream._cuts
    assert cuts[weights[0].name] == ["x"]                       # the first layer reads the model input
    assert all(cuts[w.name] != ["x"] for w in weights[1:])     # the others start further down
    # a cache of one byte: only the first layer (its cut is the model input, fed from the batches) runs a suffix
    tiny = ProbeSession(session_model, weights, {w.name: values[w.name] for w in weights}, None, session.batches,
                        ["CPUExecutionProvider"], "kl", "logits")
    monkeypatch.setattr(tiny._downstream, "cache_bytes", 1)
    for n, q in probes.items():
        assert tiny.probe_one_sided(n, q) == pytest.approx(expected[n], rel=1e-5, abs=1e-9)
    assert tiny._downstream._groups == [[weights[0].name]]
    # a cache of the largest cut tensor: several groups, each within it
    sizes = session._downstream.sizes
    small = ProbeSession(session_model, weights, {w.name: values[w.name] for w in weights}, None, session.batches,
                         ["CPUExecutionProvider"], "kl", "logits")
    monkeypatch.setattr(small._downstream, "cache_bytes", max(sizes.values()))
    for n, q in probes.items():
        assert small.probe_one_sided(n, q) == pytest.approx(expected[n], rel=1e-5, abs=1e-9)
    groups = small._downstream._groups
    assert len(groups) > 1 and sum(len(g) for g in groups) == len(weights)
    for g in groups:
        held = {t for n in g for t in cuts[n] if t in sizes}
        assert sum(sizes[t] for t in held) <= max(sizes.values())
    assert session.runs > runs0


@pytest.mark.parametrize("rebuilt", [True, False])
def test_leave_one_out_runs_suffixes_and_measures_what_the_whole_model_does(cnn_session, monkeypatch, rebuilt):
    """The closed loop's in-context costs: with each weight alone back in float, the rest quantized.
    Suffix runs on cut tensors computed with the assignment in place give the whole model's losses,
    for weights as constants (rebuilt) and bound as inputs, in one group or several."""
    session, weights, values = cnn_session
    model = ir.from_proto(onnx.shape_inference.infer_shapes(small_cnn()))
    chosen = {w.name: quantize_weight(values[w.name], WeightFormat(2 if k % 2 else 4), w.channel_axis,
                                      w.reduction_axis) for k, w in enumerate(weights)}
    whole = ProbeSession(model, weights, {w.name: values[w.name] for w in weights}, None, session.batches,
                         ["CPUExecutionProvider"], "kl", "logits", downstream=False, rebuilt=rebuilt)
    expected = {n: whole.assignment_loss({k: v for k, v in chosen.items() if k != n}) for n in chosen}
    assert len(set(expected.values())) == len(expected) and min(expected.values()) > 0
    for cache in (None, "largest cut"):
        cut = ProbeSession(model, weights, {w.name: values[w.name] for w in weights}, None, session.batches,
                           ["CPUExecutionProvider"], "kl", "logits", rebuilt=rebuilt)
        if cache:
            cut.probe_one_sided(weights[0].name, chosen[weights[0].name].dequantize())   # fixes the groups
            monkeypatch.setattr(cut._downstream, "cache_bytes", max(cut._downstream.sizes.values()))
            cut._downstream._groups = None
        monkeypatch.setattr(cut, "assignment_loss", lambda _: pytest.fail("a weight ran the whole model"))
        calls = []
        got = cut.leave_one_out(chosen, lambda: calls.append(1))
        assert len(calls) == len(chosen) and set(got) == set(chosen)
        for n in chosen:
            assert got[n] == pytest.approx(expected[n], rel=1e-5, abs=1e-9)
        assert (len(cut._downstream.partition()) > 1) == (cache is not None)


def test_downstream_probes_type_the_cut_tensors_a_graph_leaves_undeclared(cnn_session):
    """Without shape inference the cut tensors have no declared type: the suffix takes their values' types."""
    session, weights, values = cnn_session
    bare = ir.from_proto(small_cnn())   # no value_info
    assert all(v.type is None for n in bare.graph for v in n.outputs if not v.is_graph_output())
    untyped = ProbeSession(bare, weights, {w.name: values[w.name] for w in weights}, None, session.batches,
                           ["CPUExecutionProvider"], "kl", "logits")
    for w in weights:
        q = quantize_weight(values[w.name], WeightFormat(2), w.channel_axis, w.reduction_axis).dequantize()
        assert untyped.probe_one_sided(w.name, q) == pytest.approx(session.probe_one_sided(w.name, q), rel=1e-5,
                                                                   abs=1e-9)
    assert sum(len(g) for g in untyped._downstream._groups) == len(weights)   # suffixes, not the fallback


def test_probe_terms_and_weight_restoration(cnn_session):
    session, weights, values = cnn_session
    # label-free loss at the float weights, activations float: exactly zero
    assert session.base_loss == pytest.approx(0.0, abs=1e-9)
    w = weights[1]
    q = quantize_weight(values[w.name], WeightFormat(2), w.channel_axis, w.reduction_axis).dequantize()
    r = session.probe(w.name, q, "int2/ch")
    assert r.predicted == pytest.approx(r.loss_plus - session.base_loss)
    assert r.first_order + r.curvature == pytest.approx(r.predicted)
    assert r.loss_plus > 0 and r.curvature > 0 and r.form == "ellipsoid"
    # at the minimum the first-order term is small next to the curvature term
    assert abs(r.first_order) < r.curvature
    # probes rebind the float weight afterwards
    assert session.loss() == pytest.approx(session.base_loss, abs=1e-12)
    # quantizing the same weight to 8 bits costs far less than to 2 bits
    q8 = quantize_weight(values[w.name], WeightFormat(8), w.channel_axis, w.reduction_axis).dequantize()
    assert session.probe(w.name, q8, "int8/ch").predicted < 0.05 * r.predicted


def test_rebuilt_and_bound_evaluations_measure_the_same_losses(cnn_session, monkeypatch):
    """Constant weights (a session per evaluation) and weights bound as graph inputs (one session)
    differ only in onnxruntime's kernels: the same losses to float rounding."""
    from cet_onnx.allocation import probes
    rebuilt, weights, values = cnn_session
    monkeypatch.setattr(probes, "REBUILD_MAX_BYTES", 0)
    model = ir.from_proto(onnx.shape_inference.infer_shapes(small_cnn()))
    bound = ProbeSession(model, weights, {w.name: values[w.name] for w in weights}, None,
                         rebuilt.batches, ["CPUExecutionProvider"], "kl", "logits")
    assert rebuilt.rebuilt and not bound.rebuilt and rebuilt.session is None
    for w in weights:
        for bits in (2, 4, 8):
            q = quantize_weight(values[w.name], WeightFormat(bits), w.channel_axis, w.reduction_axis).dequantize()
            assert rebuilt.probe_one_sided(w.name, q) == pytest.approx(bound.probe_one_sided(w.name, q), rel=1e-4)
    everything = {w.name: values[w.name] * 1.01 for w in weights}
    assert rebuilt.loss(everything) == pytest.approx(bound.loss(everything), rel=1e-4)
    q = quantize_weight(values[weights[0].name], WeightFormat(2), 0, 1).dequantize()
    assert rebuilt.layer_nsr(weights[0].name, q) == bound.layer_nsr(weights[0].name, q)   # the bound session serves both


def test_candidate_sizes_are_real_bytes(cnn_session):
    _, weights, values = cnn_session
    cand = Candidates(weights, candidate_formats((2, 4, 8), 4), {w.name: values[w.name] for w in weights})
    for i, w in enumerate(weights):
        for j, f in enumerate(cand.formats):
            if cand.available[i, j]:
                assert cand.sizes[i, j] == quantize_weight(values[w.name], f, w.channel_axis, w.reduction_axis).nbytes()
                assert cand.sizes[i, j] == cand.quantize(i, j).nbytes()
            else:  # blocks of 4 need at least 4 input channels; Conv kernels take no INT8 blocks
                assert f.granularity == "block"
                assert w.shape[w.reduction_axis] < 4 or (w.op_type == "Conv" and f.bits == 8)


def test_analyze_writes_tables_and_second_run_hits_the_cache(tmp_path):
    args = ["analyze", DIGITS / "model.onnx", "--calib", DIGITS / "calib.npz", "-o", tmp_path / "sens",
            "--cache-dir", tmp_path / "cache", "--allocators", "cet,hawq", "--hutchinson-samples", 1, *FAST]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    r1 = json.loads(first.stdout)
    assert r1["probe_runs"] > 0 and r1["forward_passes_per_second"] > 0
    assert len(r1["cet"]) == 9 and "int2a/ch" in r1["cet"][0]["formats"]
    assert {"first_order", "curvature", "predicted", "form"} <= set(r1["cet"][0]["formats"]["int4a/ch"])
    assert (tmp_path / "sens.json").exists()
    csv_lines = (tmp_path / "sens.csv").read_text().splitlines()
    assert csv_lines[0].startswith("allocator,name,op,params,format,bytes")
    assert len(csv_lines) > 9 * 4
    second = json.loads(invoke(*args).stdout)
    assert second["probe_runs"] == 0  # everything came from the cache
    assert second["cet"] == r1["cet"]
    # full-range INT8 codes are other candidates: probed afresh, not read from the ±63 run's cache
    full = json.loads(invoke(*args, "--int8-full-range").stdout)
    assert full["probe_runs"] > 0


def _quantize(tmp_path, name, *args):
    out = tmp_path / f"{name}.onnx"
    res = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--calib", DIGITS / "calib.npz",
                 "--cache-dir", tmp_path / "cache", *FAST, *args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_budget_allocation_accounts_bytes_exactly_and_meets_budget(tmp_path):
    rep = _quantize(tmp_path, "avg3", "--avg-bits", "3")
    a = rep["allocation"]
    assert a["predicted_bytes"] == rep["totals"]["weight_bytes"]
    assert rep["totals"]["avg_bits"] <= 3.0
    assert len({w["format"] for w in rep["weights"]}) > 1            # really mixed
    assert a["fidelity"]["spearman"] is not None and len(a["pareto_front"]) >= 3
    f = a["fidelity"]   # the closed loop's corrected costs, judged on the same random assignments
    assert -1 <= f["spearman_corrected"] <= 1 and all("corrected" in r for r in f["assignments"])
    assert all("predicted_delta_loss" in w for w in rep["weights"])
    assert rep["verification"]["min_top1_agreement"] >= 0.95
    png = tmp_path / "avg3.pareto.png"
    try:
        import matplotlib  # noqa: F401
        assert a["pareto_png"] == png.name and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "matplotlib is not installed" in a["pareto_png"] and not png.exists()


def test_cet_beats_uniform_at_the_size_of_uniform_2bit(tmp_path):
    uni = _quantize(tmp_path, "uni", "--weight-bits", "2", "--block-size", "32")
    size_mb = uni["totals"]["weight_bytes"] / 1e6
    cet = _quantize(tmp_path, "cet", "--max-size", f"{size_mb:.6f}", "--allocator", "cet")
    uni_loss = _quantize(tmp_path, "uni2", "--max-size", f"{size_mb:.6f}", "--allocator", "uniform")
    assert cet["totals"]["weight_bytes"] <= uni["totals"]["weight_bytes"]
    assert cet["allocation"]["measured_loss"] < uni_loss["allocation"]["measured_loss"]


def test_max_loss_closed_loop_keeps_measured_loss_within_budget(tmp_path):
    rep = _quantize(tmp_path, "ml", "--max-loss", "0.05")
    a = rep["allocation"]
    assert a["closed_loop"] and a["measured_loss"] <= 0.05
    assert rep["totals"]["avg_bits"] < 8.5


def test_budget_errors(tmp_path):
    res = invoke("quantize", DIGITS / "model.onnx", "-o", tmp_path / "q.onnx", "--calib", DIGITS / "calib.npz",
                 "--avg-bits", "3", "--max-size", "1")
    assert res.exit_code == 2 and "only one of" in res.stderr
    res = invoke("quantize", DIGITS / "model.onnx", "-o", tmp_path / "q.onnx", "--calib", DIGITS / "calib.npz",
                 "--avg-bits", "0.5", "--cache-dir", tmp_path / "c", "-q")
    assert res.exit_code == 2 and "cannot be met" in res.stderr
    res = invoke("quantize", DIGITS / "model.onnx", "-o", tmp_path / "q.onnx", "--calib", DIGITS / "calib.npz",
                 "--avg-bits", "4", "--loss", "ce")
    assert res.exit_code == 2 and "--labels" in res.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_labels_give_task_loss_with_nonzero_first_order_term(tmp_path):
    args = ["analyze", DIGITS / "model.onnx", "--calib", DIGITS / "calib.npz", "--labels", DIGITS / "calib_labels.npy",
            "-o", tmp_path / "s", "--cache-dir", tmp_path / "cache", "--weight-only", *FAST]
    r = json.loads(invoke(*args).stdout)
    assert r["loss"] == "ce" and r["base_loss"] > 0
    firsts = [f["first_order"] for row in r["cet"] for f in row["formats"].values()]
    assert max(abs(v) for v in firsts) > 0


def test_deployed_probe_numerics_include_activation_quantization(tmp_path):
    args = ["analyze", DIGITS / "model.onnx", "--calib", DIGITS / "calib.npz", "-o", tmp_path / "s",
            "--cache-dir", tmp_path / "cache", "--bits", "4,8", "--candidate-block", 0, *FAST]
    flt = json.loads(invoke(*args).stdout)
    dep = json.loads(invoke(*args, "--probe-numerics", "deployed").stdout)
    assert flt["probe_numerics"] == "float" and flt["base_loss"] == pytest.approx(0.0, abs=1e-9)
    assert dep["probe_numerics"] == "deployed" and dep["base_loss"] > 1e-6   # activation rounding alone costs loss
    assert flt["formats"] == ["int4a/ch", "int8/ch"]
