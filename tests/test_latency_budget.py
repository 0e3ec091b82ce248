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
    proto, _ = _layer(digits, w, WeightFormat(4, "channel", symmetric=False))   # INT4 codes widened at load
    k = inspect_kernels(proto, digits.providers)
    assert k.ops == {"QLinearConv": 1} and not k.dequantized_at_run_time
    proto, _ = _layer(digits, w, WeightFormat(4, "block", 16, symmetric=False))   # blocked: no INT8 kernel
    assert inspect_kernels(proto, digits.providers).dequantized_at_run_time == [{"weight": w.name, "consumer_op": "Conv"}]


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
    # batch 16: the all-INT8 model runs at about 0.6x float here, so the budget leaves room to choose;
    # 1.5x rather than 1.0x, since on a busy 2-core machine timings vary enough to make 1.0x infeasible
    res = _quantize(tmp_path, "--avg-bits", "7.8", "--max-latency-ratio", "1.5", "--latency-batch", "16", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    lb = report["allocation"]["latency_budget"]
    assert lb["constraint"] == "--max-latency-ratio 1.5" and lb["batch"] == 16
    assert lb["predicted_ms"] <= lb["budget_ms"] + 1e-6
    loop = lb["closed_loop"]   # every solve's choice measured as a whole model
    assert 1 <= len(loop) <= 3 and all(h["measured_ms"] > 0 for h in loop)
    assert lb["met_when_measured"] == (loop[-1]["measured_ms"] <= lb["budget_ms"])
    assert report["latency"]["batch"] == 16 and report["latency"]["ratio"] > 0
    assert set(lb["per_weight"]) == {w["name"] for w in report["weights"]}
    # the latency axis of the Pareto front: within the budget, and the front without it beside
    front, free = report["allocation"]["pareto_front"], report["allocation"]["pareto_front_without_latency_budget"]
    assert front and all(pt["predicted_latency_ms"] <= lb["budget_ms"] + 1e-6 for pt in front)
    assert free and all("predicted_latency_ms" in pt for pt in free)
    assert min(pt["predicted_loss"] for pt in free) <= min(pt["predicted_loss"] for pt in front) + 1e-12


def test_the_closed_loop_fits_layer_costs_to_whole_model_measurements():
    from cet_onnx.allocation.latency_budget import LatencyBudget
    lb = object.__new__(LatencyBudget)   # the fit alone: no model, no timing
    lb.delta = np.array([[0.0, 1.0, 3.0], [0.0, 2.0, 5.0]])
    lb.fastest_ms, lb.fastest_sum, lb.scale, lb.points, lb.budget_ms, lb.flag = 10.0, 0.0, 1.0, [], 13.0, "test"
    lb.fastest = np.array([0, 0])
    a, b = np.array([1, 1]), np.array([2, 0])
    assert lb.predict(a) == 13.0 and lb.limit.holds(a)
    lb._fit(a, 16.0)             # the whole model is twice as slow as its layers say
    assert lb.scale == 2.0 and lb.predict(a) == 16.0 and not lb.limit.holds(a)
    assert lb.limit.holds(np.array([1, 0]))          # 10 + 2 * 1 <= 13
    lb._fit(b, 14.0)             # least squares through the anchor over both measurements
    assert lb.scale == pytest.approx((3 * 6 + 3 * 4) / (9 + 9))
    lb._fit(np.array([0, 0]), 30.0)                  # the anchor itself: nothing to fit
    assert len(lb.points) == 2


def test_a_latency_budget_below_the_fastest_assignment_says_what_was_measured(tmp_path):
    res = _quantize(tmp_path, "--avg-bits", "2.5", "--max-latency-ratio", "0.05", "--latency-batch", "16")
    assert res.exit_code == 2
    assert "--max-latency-ratio 0.05 cannot be met: the fastest assignment of formats measured" in res.output
    # static mode: what every weight float measured with the activation Q/DQ still in place, and the way out
    assert "with static activations their Q/DQ stay even where every weight is float (measured" in res.output
    assert "--act-mode none or dynamic leaves them float" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "q.onnx").exists()


def _budget_without_a_model(measured: list[float]):
    """A LatencyBudget over two weights × (slow small, fast large) formats whose whole-model timings are given."""
    from types import SimpleNamespace

    from cet_onnx.allocation.latency_budget import LatencyBudget
    lb = object.__new__(LatencyBudget)
    lb.delta = np.array([[1.0, 0.0], [1.0, 0.0]])
    lb.cand = SimpleNamespace(available=np.ones((2, 2), bool), sizes=np.array([[1.0, 4.0], [1.0, 4.0]]))
    lb.fastest, lb.fastest_ms, lb.fastest_sum, lb.scale, lb.points, lb.history = np.array([1, 1]), 10.0, 0.0, 1.0, [], []
    lb.budget_ms, lb.float_ms, lb.flag, lb.report = 11.0, 12.0, "--max-latency-ratio 0.92", {"batch": 1}
    lb.p, lb.all_float_ms = SimpleNamespace(act_mode="none"), None
    timings = iter(measured)
    lb.measure = lambda choice: (lb.float_ms, next(timings))
    return lb


def _too_small(limits):
    from cet_onnx.errors import InputError
    raise InputError("--avg-bits 1 together with the latency budget cannot be met")


def test_an_infeasible_size_stops_once_the_smallest_within_the_latency_budget_is_measured_within_it():
    from cet_onnx.errors import InputError
    lb = _budget_without_a_model([10.9, 10.8])   # within the budget twice: the slower one counts
    with pytest.raises(InputError, match="cannot be met"):
        lb.closed_loop(_too_small)
    assert len(lb.history) == 1 and lb.history[0]["solved"] == "smallest within the latency budget"
    assert lb.history[0]["measured_ms"] == 10.9


def test_one_lucky_measurement_within_the_budget_does_not_pass_it():
    from cet_onnx.errors import InputError
    lb = _budget_without_a_model([10.9, 13.0])   # within the budget once, over it when taken again
    with pytest.raises(InputError, match="cannot be met"):
        lb.closed_loop(_too_small)
    assert lb.history[0]["measured_ms"] == 13.0 and lb.scale == pytest.approx(3.0)


def test_an_infeasible_size_refits_when_the_smallest_within_measures_over_the_budget():
    from cet_onnx.errors import InputError
    lb = _budget_without_a_model([13.0])   # one small weight: predicted 11 ms, measured 13
    with pytest.raises(InputError, match="cannot be met"):
        lb.closed_loop(_too_small)         # after the refit only the all-fast anchor fits: not timed again
    assert lb.scale == pytest.approx(3.0)
    assert [h["measured_ms"] for h in lb.history] == [13.0, 10.0]


def test_a_budget_below_the_measured_anchor_needs_no_solve_to_fail():
    from cet_onnx.errors import InputError
    lb = _budget_without_a_model([])
    lb.budget_ms = 9.0
    with pytest.raises(InputError, match="fastest assignment of formats measured 10 ms against a budget of 9 ms"):
        lb.closed_loop(_too_small)
    assert lb.history == []


@pytest.mark.parametrize("args, message", [
    (["--max-latency-ratio", "1.0"], "give --avg-bits, --max-size or --max-loss too"),
    (["--avg-bits", "4", "--max-latency", "1", "--max-latency-ratio", "1"], "only one of --max-latency"),
    (["--avg-bits", "4", "--max-latency-ratio", "1", "--latency-batch", "0"], "cannot be 0"),
    (["--avg-bits", "4", "--max-latency-ratio", "1", "--allocator", "uniform"], "not uniform"),
])
def test_latency_budget_option_errors(tmp_path, args, message):
    res = _quantize(tmp_path, *args)
    assert res.exit_code == 2 and message in res.output, res.output


def test_float_is_timed_as_one_more_format_of_every_layer(digits, tmp_path):
    from cet_onnx.allocation.float_option import KEEP_FLOAT
    from cet_onnx.latency import latency_feed
    fmts = [WeightFormat(8, "channel"), KEEP_FLOAT]
    available = np.ones((len(digits.weights), 2), bool)
    lat = L.measure_layer_latencies(digits.model, digits.weights, fmts, available, digits.values,
                                    latency_feed(digits.calib_batches, 1), digits.act_params, "static",
                                    digits.providers, 1, tmp_path)
    assert np.isfinite(lat.delta_ms).all()
    # the float form of a layer is not the float layer itself: in static mode it keeps its activation Q/DQ
    assert lat.as_report(digits.weights, fmts)["stem.0.weight"]["delta_ms"]["float"] is not None


def test_a_weight_the_latency_row_keeps_float_is_left_out_of_the_emitted_weights(digits):
    """Float as a format (latency budgets): chosen when every quantized form of a layer is too slow; the weight
    stays float in the emitted model, which onnxruntime runs, and the report counts its float bytes."""
    from cet_onnx.allocation.float_option import WithFloat
    from cet_onnx.allocation.solver import Limit, solve_size_budget
    from cet_onnx.allocation.stage import candidates
    from cet_onnx.report import _totals, weight_rows
    from cet_onnx.runner import make_session
    opts = QuantizeOptions(allocation=AllocationOptions(avg_bits=8))
    cand = WithFloat(candidates(digits, opts))
    n, k = cand.sizes.shape
    assert k == len(cand.base.formats) + 1 and cand.available[:, -1].all()
    np.testing.assert_array_equal(cand.sizes[:, -1], [4.0 * w.size for w in cand.weights])
    costs = np.where(cand.available, 1.0 / np.maximum(cand.sizes, 1), np.inf)   # wider: less loss
    costs[:, -1] = 0.0
    slow = np.zeros((n, k))
    slow[0, :-1] = 1.0   # every quantized form of the first layer costs 1 ms more than float
    sol = solve_size_budget(costs, cand.sizes, cand.sizes[:, -1].sum() / 3, [Limit(slow, 0.5, "latency")])
    assert sol.choice[0] == k - 1 and (sol.choice[1:] != k - 1).any()
    chosen = cand.chosen(sol.choice)
    first = digits.weights[0].name
    assert first not in chosen and len(chosen) == n - sum(sol.choice == k - 1)
    emitted = L.rewrite(digits.model, digits.weights, chosen, digits.act_params).model
    inits = {v.name: v for v in emitted.graph.initializers.values()}
    assert inits[first].const_value.dtype == ir.DataType.FLOAT
    session = make_session(emitted, digits.providers)
    x = digits.calib_batches[0]
    assert np.isfinite(session.run(None, {k: v for k, v in x.items()})[0]).all()
    rows = weight_rows(digits.weights, chosen, None, digits.values)
    row = next(r for r in rows if r["name"] == first)
    assert row["format"] == "float" and row["bits"] == 32 and row["bytes"] == 4 * digits.weights[0].size
    assert _totals(rows)["weight_bytes"] == sum(r["bytes"] for r in rows)
    cand.base.close()


def test_a_layer_gain_the_whole_model_contradicts_is_charged_to_the_weights_that_took_it():
    """Layer timings said both quantized forms are faster than float; the whole model measured the first
    choice slower: its excess goes to the weight it moved, and the next solve moves the other one."""
    from cet_onnx.allocation.solver import solve_size_budget
    lb = _budget_without_a_model([11.0, 9.5, 9.5])
    lb.delta = np.array([[0.0, -1.0], [0.0, -1.5]])   # column 0: float (the anchor), column 1: quantized
    lb.fastest, lb.fastest_ms, lb.budget_ms = np.array([0, 0]), 10.0, 10.0
    costs, sizes = np.array([[0.0, 0.2], [0.0, 0.1]]), np.array([[4.0, 1.0], [4.0, 1.0]])
    chosen = []

    def choose(limits):
        sol = solve_size_budget(costs, sizes, 5.0, limits)   # one weight must be quantized
        chosen.append(sol.choice.tolist())
        return (sol,)

    sol, = lb.closed_loop(choose)
    assert chosen == [[0, 1], [1, 0]]          # the cheaper-loss weight first, then, once it was charged, the other
    assert lb.delta[1, 1] == pytest.approx(0.0 + (11.0 - 8.5))   # no gain left below float, plus the excess
    assert [h["measured_ms"] for h in lb.history] == [11.0, 9.5] and sol.choice.tolist() == [1, 0]


def test_a_form_dequantized_on_every_run_is_never_timed_faster_than_float(digits):
    """A blocked INT4 Conv weight is dequantized on every run: its cost is clamped at 0 (in the whole graph it is
    the float Conv plus a DequantizeLinear); the QLinearConv form and the float form are not clamped."""
    from cet_onnx.allocation.float_option import KEEP_FLOAT
    from cet_onnx.latency import latency_feed
    w = next(w for w in digits.weights if w.name == "block1.cb1.0.weight")
    acts = L.layer_activations(digits.model, digits.weights, latency_feed(digits.calib_batches, 1), digits.providers)
    node = next(n for n in digits.model.graph if n.name == w.consumers[0])
    layer = L._layer_model(digits.model, node, w, acts, digits.values)
    names = {v.name for v in node.inputs if v is not None} | {o.name for o in node.outputs} | \
        {L._relu_after(node).outputs[0].name}
    la = {k: v for k, v in digits.act_params.items() if k in names}
    fmts = [WeightFormat(8, "channel"), WeightFormat(4, "block", 16, symmetric=False), KEEP_FLOAT]
    entry = L._time_layer(layer, w, fmts, digits.values, la, "static", acts, digits.providers, 1)
    assert entry["dequantized"] == [False, True, False]
    assert entry["delta_ms"][1] >= 0.0
