"""Which kernels onnxruntime runs for emitted models (its optimised graph, level extended), and the latency report.

These catch an onnxruntime upgrade that silently stops fusing: INT8 Conv groups must become QLinearConv, every
low-bit MatMul / Gemm weight MatMulNBits, with no DequantizeLinear left feeding a MatMul or Gemm.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cet_onnx.cli import main
from cet_onnx.kernels import inspect_kernels
from models import encoder_feeds, small_mlp, tiny_encoder

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"


def _quantize(model, out, calib, *extra):
    res = CliRunner().invoke(main, ["quantize", str(model), "-o", str(out), "--calib", str(calib), "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernels")
    onnx.save(tiny_encoder(), d / "encoder.onnx")
    np.savez(d / "calib.npz", **encoder_feeds(48))
    return d


def test_w8a8_digits_runs_qlinearconv_and_dequantizes_nothing(tmp_path):
    report = _quantize(DIGITS / "model.onnx", tmp_path / "q.onnx", DIGITS / "calib.npz")
    k = report["kernels"]
    assert k["ops"].get("QLinearConv", 0) == 8 and not k["dequantized_at_run_time"]
    assert "DequantizeLinear" not in {op for op in k["ops"] if k["ops"][op] and op in ("Conv",)}


def _optimised_matches_plain(path, feeds):
    """onnxruntime's optimised session (Casts folded, kernels fused) computes what the plain graph says."""
    import onnxruntime as ort

    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"]).run(None, feeds)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(np.abs(b).max()))


@pytest.mark.parametrize("bits", ["4", "2"])
def test_low_bit_per_channel_digits_runs_in_the_int8_kernels_and_dequantizes_nothing(tmp_path, bits):
    """INT4 / INT2 codes widened by a Cast onnxruntime folds at load: QLinearConv and QGemm, like W8A8."""
    report = _quantize(DIGITS / "model.onnx", tmp_path / "q.onnx", DIGITS / "calib.npz", "--weight-bits", bits)
    k = report["kernels"]
    assert k["ops"].get("QLinearConv") == 8 and k["ops"].get("QGemm") == 1
    assert not k["dequantized_at_run_time"]
    assert {w["format"].split("/")[0] for w in report["weights"]} == {f"int{bits}a"}
    assert report["verification"]["min_top1_agreement"] >= 0.95
    _optimised_matches_plain(tmp_path / "q.onnx", {"image": np.load(DIGITS / "eval.npz")["image"][:8]})


def test_no_widen_low_bit_writes_the_plain_form_older_runtimes_load(tmp_path):
    """--no-widen-low-bit: no Cast (onnxruntime < 1.23 has no Cast from INT4): the Convs are dequantized on
    every run and the classifier Gemm becomes MatMulNBits, as before the widening."""
    report = _quantize(DIGITS / "model.onnx", tmp_path / "q.onnx", DIGITS / "calib.npz", "--weight-bits", "4",
                       "--no-widen-low-bit")
    k = report["kernels"]
    assert k["ops"].get("MatMulNBits") == 1 and "QLinearConv" not in k["ops"]
    assert {s["consumer_op"] for s in k["dequantized_at_run_time"]} == {"Conv"} and len(k["dequantized_at_run_time"]) == 8
    assert "Cast" not in {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}


def test_low_bit_per_channel_matmuls_run_in_the_dynamic_int8_kernel(encoder, tmp_path):
    report = _quantize(encoder / "encoder.onnx", tmp_path / "q.onnx", encoder / "calib.npz", "--weight-bits", "4",
                       "--act-mode", "dynamic")
    k = report["kernels"]
    matmuls = [w for w in report["weights"] if w["op"] in ("MatMul", "Gemm")]
    assert len(matmuls) == 6 and k["ops"].get("DynamicQuantizeMatMul", 0) + k["ops"].get("MatMulIntegerToFloat", 0) == 6
    assert not k["dequantized_at_run_time"] and "MatMulNBits" not in k["ops"]
    assert report["verification"]["min_mean_cosine"] > 0.9
    _optimised_matches_plain(tmp_path / "q.onnx", {k_: v[:4] for k_, v in encoder_feeds(8).items()})


@pytest.mark.parametrize("mode", ["static", "dynamic", "none"])
@pytest.mark.parametrize("bits", ["4", "2"])
def test_every_low_bit_matmul_weight_becomes_matmulnbits_in_every_activation_mode(encoder, tmp_path, mode, bits):
    report = _quantize(encoder / "encoder.onnx", tmp_path / "q.onnx", encoder / "calib.npz", "--weight-bits", bits,
                       "--block-size", "32", "--act-mode", mode)
    k = report["kernels"]
    matmuls = [w for w in report["weights"] if w["op"] in ("MatMul", "Gemm")]   # simplification makes one a Gemm
    assert len(matmuls) == 6 and k["ops"].get("MatMulNBits") == 6
    assert not k["dequantized_at_run_time"]
    assert report["verification"]["min_mean_cosine"] > 0.9


def test_small_mlp_int8_weight_only_and_the_2d_matmul_add_relu_onnxruntime_turns_into_fusedgemm(tmp_path):
    """A known gap, reported rather than hidden: on a 2-D input onnxruntime fuses MatMul + Add + Relu into
    FusedGemm before it looks for MatMulNBits, so that weight is dequantized on every run."""
    onnx.save(small_mlp(), tmp_path / "mlp.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32))
    report = _quantize(tmp_path / "mlp.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz", "--weight-only")
    assert report["kernels"]["ops"].get("MatMulNBits") == 1
    assert report["kernels"]["dequantized_at_run_time"] == [{"weight": "w1", "consumer_op": "FusedGemm"}]


def _contrib_nodes(path):
    return [n for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft" and n.op_type == "MatMulNBits"]


def test_emit_contrib_writes_matmulnbits_with_its_accuracy_level_and_matches_the_plain_form(encoder, tmp_path):
    """Level 4 (the default) is the kernel onnxruntime's own fusion picks for the plain form; level 0 computes in
    float, as the plain form does with graph optimisations off."""
    import onnxruntime as ort
    args = ("--weight-bits", "4", "--block-size", "32", "--act-mode", "none", "--latency-batch", "0")
    runs = {name: _quantize(encoder / "encoder.onnx", tmp_path / f"{name}.onnx", encoder / "calib.npz", *args, *extra)
            for name, extra in (("plain", ()), ("c4", ("--emit-contrib",)),
                                ("c0", ("--emit-contrib", "--accuracy-level", "0")))}
    assert not _contrib_nodes(tmp_path / "plain.onnx")
    for name, level in (("c4", 4), ("c0", 0)):
        nodes = _contrib_nodes(tmp_path / f"{name}.onnx")
        assert len(nodes) == 6
        assert {next(a.i for a in n.attribute if a.name == "accuracy_level") for n in nodes} == {level}
        onnx.checker.check_model(str(tmp_path / f"{name}.onnx"))
        k = runs[name]["kernels"]
        assert k["ops"].get("MatMulNBits") == 6 and not k["dequantized_at_run_time"]
        assert runs[name]["totals"]["weight_bytes"] == runs["plain"]["totals"]["weight_bytes"]
    feeds = encoder_feeds(8, seed=5)
    unfused = ort.SessionOptions()
    unfused.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def out(name, so=None):
        return ort.InferenceSession(str(tmp_path / f"{name}.onnx"), so).run(None, feeds)[0]
    np.testing.assert_allclose(out("c4"), out("plain"), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out("c0"), out("plain", unfused), rtol=1e-4, atol=1e-4)


def test_emit_contrib_closes_the_fusedgemm_gap_of_the_plain_form(tmp_path):
    onnx.save(small_mlp(), tmp_path / "mlp.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32))
    report = _quantize(tmp_path / "mlp.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz", "--weight-only",
                       "--emit-contrib")
    assert report["kernels"]["ops"].get("MatMulNBits") == 2 and not report["kernels"]["dequantized_at_run_time"]
    assert {next(a.i for a in n.attribute if a.name == "accuracy_level") for n in _contrib_nodes(tmp_path / "q.onnx")} == {4}


def test_accuracy_level_without_emit_contrib_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["quantize", str(DIGITS / "model.onnx"), "-o", str(tmp_path / "q.onnx"),
                                    "--calib", str(DIGITS / "calib.npz"), "--accuracy-level", "4"])
    assert res.exit_code == 2 and "needs --emit-contrib" in res.output and not (tmp_path / "q.onnx").exists()


def test_inspect_kernels_reads_a_file_too():
    k = inspect_kernels(DIGITS / "model.onnx", ["CPUExecutionProvider"])
    assert k.ops.get("Conv", 0) + k.ops.get("FusedConv", 0) == 8 and not k.dequantized_at_run_time


def test_latency_is_measured_side_by_side_and_gates_the_write(tmp_path):
    out = tmp_path / "q.onnx"
    report = _quantize(DIGITS / "model.onnx", out, DIGITS / "calib.npz", "--latency-batch", "4", "--latency-threads", "1")
    lat = report["latency"]
    assert lat["batch"] == 4 and lat["threads"] == 1 and lat["interleaved_runs"] >= 10
    assert lat["fp32_ms"] > 0 and lat["ratio"] == pytest.approx(lat["quantized_ms"] / lat["fp32_ms"], rel=1e-3)
    gated = tmp_path / "gated.onnx"
    res = CliRunner().invoke(main, ["quantize", str(DIGITS / "model.onnx"), "-o", str(gated), "--calib",
                                    str(DIGITS / "calib.npz"), "--verify-max-latency-ratio", "0.001"])
    assert res.exit_code == 1 and "--verify-max-latency-ratio 0.001" in res.output and "nothing written" in res.output
    assert not gated.exists()


def test_latency_batch_zero_skips_timing_and_the_summary_warns_when_slower(tmp_path):
    report = _quantize(DIGITS / "model.onnx", tmp_path / "q.onnx", DIGITS / "calib.npz", "--latency-batch", "0")
    assert report["latency"] == {"skipped": "--latency-batch 0"}
    res = CliRunner().invoke(main, ["quantize", str(DIGITS / "model.onnx"), "-o", str(tmp_path / "w4.onnx"), "--calib",
                                    str(DIGITS / "calib.npz"), "--weight-bits", "4", "--weight-only"])
    assert res.exit_code == 0, res.output
    assert "8 weight(s) dequantized on every run" in res.output
    assert "SLOWER than the float model" in res.output   # 2.9x measured; INT4 Conv weights have no kernel


def test_int2_matmul_weight_with_n_not_a_multiple_of_4_is_kept_away_from_the_faulty_2bit_kernel(tmp_path):
    """onnxruntime 1.32's 2-bit MatMulNBits is wrong for N % 4 != 0 (digits: 10 classes): not fused, still correct."""
    report = _quantize(DIGITS / "model.onnx", tmp_path / "q.onnx", DIGITS / "calib.npz", "--weight-bits", "2",
                       "--weight-only")
    fc = next(w["name"] for w in report["weights"] if w["op"] == "Gemm")
    assert {"weight": fc, "consumer_op": "Gemm"} in report["kernels"]["dequantized_at_run_time"] or \
        {"weight": fc, "consumer_op": "MatMul"} in report["kernels"]["dequantized_at_run_time"]
    assert "MatMulNBits" not in report["kernels"]["ops"]
    # the optimised model computes what the plain QDQ graph says
    import onnxruntime as ort
    x = np.load(DIGITS / "eval.npz")["image"][:8]
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(tmp_path / "q.onnx"), plain, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    out = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)


def test_slower_warning_advice_fits_the_cause():
    from cet_onnx.cli import _say_speed

    lat = {"batch": 1, "threads": "default", "provider": "CPUExecutionProvider", "interleaved_runs": 100,
           "fp32_ms": 0.028, "quantized_ms": 0.064, "ratio": 2.3}
    conv = [{"weight": "w", "consumer_op": "Conv"}]
    for slow, bits, expected in (([], 4, "No weight is dequantized on every run"),
                                 (conv, 4, "give those 1 sub-8-bit weight(s) 8 bits"),
                                 (conv, 8, "8-bit already")):
        said: list[str] = []
        _say_speed(said.append, {"kernels": {"ops": {"QLinearMatMul": 2}, "dequantized_at_run_time": slow},
                                 "latency": lat, "weights": [{"name": "w", "bits": bits}],
                                 "activation_mode": {"mode": "dynamic"}})
        warning = next(s for s in said if s.startswith("WARNING"))
        assert expected in warning and "2.30x SLOWER" in warning
        assert ("--act-mode static" in warning) == (bits == 8 and bool(slow))


def test_slower_warning_names_both_causes_when_sub_8_bit_and_8_bit_weights_are_dequantized():
    from cet_onnx.cli import _say_speed

    lat = {"batch": 1, "threads": "default", "provider": "CPUExecutionProvider", "interleaved_runs": 100,
           "fp32_ms": 15.0, "quantized_ms": 16.5, "ratio": 1.1}
    slow = [{"weight": n, "consumer_op": "Conv"} for n in ("a", "b", "c")]
    said: list[str] = []
    _say_speed(said.append, {"kernels": {"ops": {"MatMulNBits": 2}, "dequantized_at_run_time": slow}, "latency": lat,
                             "weights": [{"name": "a", "bits": 4}, {"name": "b", "bits": 2}, {"name": "c", "bits": 8}],
                             "activation_mode": {"mode": "dynamic"}})
    warning = next(s for s in said if s.startswith("WARNING"))
    assert "3 weight(s) have no fast onnxruntime kernel" in warning
    assert "give those 2 sub-8-bit weight(s) 8 bits" in warning and "the other 1 are 8-bit" in warning
    assert "--act-mode static" in warning
