"""--act-precision: each static activation at 8 bits, 16 bits or float, chosen by probes and an exact solve."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from cet_onnx.allocation.activation_plan import SLACK, Target
from cet_onnx.cli import main
from cet_onnx.verify import OutputMetrics
from models import outlier_mlp, small_cnn


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _quantize(model, out, calib, *extra):
    res = invoke("quantize", model, "-o", out, "--calib", calib, "--json", *extra)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    d = tmp_path_factory.mktemp("outlier")
    onnx.save(outlier_mlp(), d / "model.onnx")
    np.savez(d / "calib.npz", x=np.random.default_rng(1).normal(size=(256, 16)).astype(np.float32))
    return d


def _agreement(report):
    return report["verification"]["min_top1_agreement"]


def test_auto_repairs_the_tensor_that_uniform_int8_destroys(outlier):
    d = outlier
    uniform = _quantize(d / "model.onnx", d / "u.onnx", d / "calib.npz", "--act-precision", "uniform")
    auto = _quantize(d / "model.onnx", d / "a.onnx", d / "calib.npz")   # the default: auto
    assert uniform["activation_precision"] == {"precision": "uniform", "why": "--act-precision uniform"}
    assert _agreement(uniform) < 0.7                       # destroyed by the range of channel 0
    plan = auto["activation_precision"]
    assert plan["precision"] == "per tensor" and plan["why"].startswith("auto: every planned tensor at 8 bits misses")
    chosen = {t["tensor"]: t["chosen"] for t in plan["tensors"]}
    assert chosen["hr"] == "float"                          # the wide tensor, whose 8-bit probe costs most
    costs = {t["tensor"]: t["delta_loss"]["int8"] for t in plan["tensors"]}
    assert costs["hr"] == max(costs.values()) and costs["hr"] > 100 * min(costs.values())
    assert plan["met"] and plan["closed_loop"][-1]["kept"] and "warning" not in plan
    assert "int8" in chosen.values()                        # not simply everything float
    assert _agreement(auto) >= 0.9                          # held-out samples, never seen by the plan
    assert auto["activations_left_float"]["hr"].startswith("activation plan: float")
    # fc2 reads the float hr now: no integer kernel reads w2, whose codes go back from +-63 to +-127
    bits = {w["name"]: w["bits"] for w in auto["weights"]}
    assert "w2" in plan["full_range"] and all(bits[n] == 8 for n in plan["full_range"])
    assert {w["name"]: w["bits"] for w in uniform["weights"]}["w2"] == 7
    ort.InferenceSession(str(d / "a.onnx"), providers=["CPUExecutionProvider"])


def test_auto_keeps_uniform_int8_where_it_meets_the_target(tmp_path):
    onnx.save(small_cnn(), tmp_path / "cnn.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(96, 3, 8, 8)).astype(np.float32))
    r = _quantize(tmp_path / "cnn.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz")
    plan = r["activation_precision"]
    assert plan["precision"] == "uniform" and plan["why"].startswith("auto: every planned tensor at 8 bits meets")
    assert plan["checks"] == 1                              # one run of the written model, no probes
    assert r["activation_tensors"] > 0 and not r["activations_left_float"]


def test_solve_bisects_to_the_fastest_assignment_that_meets_the_target(outlier):
    d = outlier
    r = _quantize(d / "model.onnx", d / "s.onnx", d / "calib.npz", "--act-precision", "solve", "--latency-batch", "0")
    plan = r["activation_precision"]
    assert plan["why"] == "--act-precision solve" and plan["latency_measured"] is False
    loop = plan["closed_loop"]
    assert loop[0]["tau"] == 0.0 and loop[0]["met"]        # nothing quantized that costs loss: met
    kept = loop[-1]
    assert kept["kept"] and kept["met"]
    # without timings every tensor off 8 bits costs 1: the kept one has the fewest such among those that met
    assert kept["counts"]["float"] == min(h["counts"]["float"] for h in loop if h["met"])
    assert all(t["delta_loss"]["int16"] is None for t in plan["tensors"])   # 16 bits dominated by float here


def test_weights_that_miss_the_target_are_said_loudly_and_activations_keep_their_level(outlier):
    d = outlier
    res = invoke("quantize", d / "model.onnx", "-o", d / "w.onnx", "--calib", d / "calib.npz",
                 "--act-min-agreement", "1.0", "--weight-bits", "2", "--latency-batch", "0")
    assert res.exit_code == 0, res.output
    assert "WARNING: activations: the quantized weights alone miss the activation target" in res.output
    report = json.loads((d / "w.report.json").read_text())
    plan = report["activation_precision"]
    assert not plan["met"] and plan["met_weights_level"]     # the absolute target missed, the weights' level kept
    lowered = plan["target_below_weights"]["min_agreement"]
    assert lowered < 1.0 and lowered == pytest.approx(float(plan["weights_alone"].split()[-2]) / 100 - SLACK["agreement"], abs=1e-4)
    assert "the weights alone miss it too" in plan["why"]
    chosen = {t["tensor"]: t["chosen"] for t in plan["tensors"]}
    assert chosen["hr"] == "float" and "int8" in chosen.values()   # still chosen (fewest off 8 bits), not all float


def test_target_below_weights_lowers_only_what_the_weights_miss():
    t = Target(min_agreement=0.98, min_cosine=0.99, min_sqnr_db=20.0)
    low = t.below_weights([OutputMetrics("a", 30.0, 0.1, 0.95, "logits"), OutputMetrics("t", 25.0, 0.1, None)])
    assert low.min_agreement == pytest.approx(0.95 - SLACK["agreement"])
    assert low.min_cosine == 0.99 and low.min_sqnr_db == 20.0


def test_target_reads_the_metric_of_each_output_kind():
    t = Target(min_agreement=0.98, min_cosine=0.99, min_sqnr_db=20.0)
    good = [OutputMetrics("a", 30.0, 0.1, 0.99, "logits"), OutputMetrics("e", 30.0, 0.1, None, "embedding", 0.995, 0.9),
            OutputMetrics("t", 25.0, 0.1, None)]
    assert t.misses(good) == []
    bad = [OutputMetrics("a", 30.0, 0.1, 0.97, "logits"), OutputMetrics("e", 30.0, 0.1, None, "embedding", 0.98, 0.9),
           OutputMetrics("t", 15.0, 0.1, None)]
    assert [m.split(":")[0] for m in t.misses(bad)] == ["a", "e", "t"]


def test_mixed_8_and_16_bit_activations_are_written_at_opset_21(tmp_path):
    import onnx_ir as ir

    from cet_onnx.graph.rewriter import rewrite
    from cet_onnx.graph.weights import find_weights
    from cet_onnx.quant.quantizer import activation_params

    model = ir.serde.deserialize_model(outlier_mlp())
    params = {"x": activation_params(-4, 4, 8), "hr": activation_params(0, 1010, 16)}
    out = rewrite(model, find_weights(model)[0], {}, params)
    assert out.opset == 21
    proto = ir.to_proto(out.model)
    zps = {i.name: i.data_type for i in proto.graph.initializer if i.name.endswith("_zero_point")}
    assert zps == {"x_zero_point": onnx.TensorProto.UINT8, "hr_zero_point": onnx.TensorProto.UINT16}
    x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = ort.InferenceSession(outlier_mlp().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() < 0.5 * np.abs(ref).max()


def test_a_bad_precision_choice_is_a_usage_error(outlier):
    res = invoke("quantize", outlier / "model.onnx", "-o", outlier / "x.onnx", "--act-precision", "best")
    assert res.exit_code == 2 and "--act-precision" in res.output
    assert not (outlier / "x.onnx").exists()
