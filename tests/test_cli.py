"""The command line end to end: the bundled model, reports, and every user mistake's exit code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cet_onnx.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _left_behind(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def digits_int8(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "digits.int8.onnx"
    res = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--calib", DIGITS / "calib.npz", "--json")
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


def test_quantize_bundled_model_int8(digits_int8):
    out, report = digits_int8
    assert report["ok"] and out.exists()
    saved = json.loads(out.with_name("digits.int8.report.json").read_text())
    assert saved["totals"]["weight_bytes"] == report["totals"]["weight_bytes"]
    assert report["calibration"]["disjoint"] and report["calibration"]["verify_samples"] == 64
    assert report["verification"]["min_top1_agreement"] >= 0.99
    # compression counts scales and zero points: slightly under 4x for per-channel INT8
    assert 3.5 < report["totals"]["weight_compression"] < 4.0
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_int8_weights_of_integer_kernels_take_saturation_safe_codes_unless_asked(digits_int8, tmp_path):
    """W8A8: every weight runs in QLinearConv / QLinearMatMul, so its codes stay within +-63 (int7, one byte);
    --int8-full-range keeps +-127. The summary says which and why."""
    out, report = digits_int8
    assert {(w["format"], w.get("integer_kernel")) for w in report["weights"]} == {("int7/ch", True)}
    codes = [onnx.numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer
             if t.name.endswith("_quantized") and t.data_type == onnx.TensorProto.INT8]   # not the INT32 biases
    assert codes and max(int(np.abs(c.astype(np.int32)).max()) for c in codes) == 63
    full = tmp_path / "full.onnx"
    res = invoke("quantize", DIGITS / "model.onnx", "-o", full, "--calib", DIGITS / "calib.npz", "--int8-full-range")
    assert res.exit_code == 0, res.output
    rep = json.loads(full.with_name("full.report.json").read_text())
    assert {w["format"] for w in rep["weights"]} == {"int8/ch"} and not any("integer_kernel" in w for w in rep["weights"])
    assert "within +-63" not in res.output
    res = invoke("quantize", DIGITS / "model.onnx", "-o", tmp_path / "safe.onnx", "--calib", DIGITS / "calib.npz")
    assert f"{len(report['weights'])} INT8 weight(s) of onnxruntime's integer kernels take codes within +-63" in res.output


def test_report_has_the_peak_memory_of_each_stage_and_the_summary_names_the_stage(tmp_path):
    res = invoke("quantize", DIGITS / "model.onnx", "-o", tmp_path / "q.onnx", "--calib", DIGITS / "calib.npz")
    assert res.exit_code == 0, res.output
    peaks = json.loads((tmp_path / "q.report.json").read_text())["peak_rss_mb"]
    assert list(peaks)[:2] == ["load", "data"] and all(v > 10 for v in peaks.values())
    assert list(peaks.values()) == sorted(peaks.values())          # a running peak never falls
    top = max(peaks, key=lambda k: (peaks[k], -list(peaks).index(k)))
    assert f"memory: peak RSS {peaks[top]:,.0f} MB, reached by the end of '{top}'" in res.output


def test_evaluate_bundled_int8_agreement_and_accuracy(digits_int8):
    out, _ = digits_int8
    res = invoke("evaluate", DIGITS / "model.onnx", out, "--calib", DIGITS / "eval.npz",
                 "--labels", DIGITS / "eval_labels.npy", "--repeats", 3, "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["samples"] == 500
    assert r["outputs"][0]["top1_agreement"] >= 0.99
    assert r["accuracy"]["quantized"] >= r["accuracy"]["fp32"] - 0.01
    assert r["file_bytes"]["quantized"] < r["file_bytes"]["fp32"] / 2


@pytest.mark.parametrize("args", [["--weight-bits", 4, "--block-size", 16], ["--weight-bits", 2, "--weight-only"],
                                  ["--calib-method", "entropy", "--act-symmetric"]])
def test_quantize_variants_load_and_run(tmp_path, args):
    out = tmp_path / "q.onnx"
    res = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--calib", DIGITS / "calib.npz", "--json", *args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["verification"]["samples"] == 64
    # the solver-facing byte count equals what is stored in the file
    model = onnx.load(out)
    stored = sum(len(t.raw_data) + 4 * len(t.float_data) for t in model.graph.initializer
                 if t.name.endswith(("_quantized", "_scale", "_zero_point", "_shape"))
                 and any(t.name.startswith(w["name"] + "_") for w in report["weights"]))
    assert stored == report["totals"]["weight_bytes"]


def test_inspect_lists_weights():
    res = invoke("inspect", DIGITS / "model.onnx", "--json")
    assert res.exit_code == 0
    info = json.loads(res.stdout)
    assert info["inputs"][0]["name"] == "image" and len(info["weights"]) == 9
    assert info["weight_params"] == sum(w["params"] for w in info["weights"])


def _bad(tmp_path, *args, code=2, expect=""):
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir(exist_ok=True)
    res = invoke("quantize", *args, "-o", out)
    assert res.exit_code == code, res.output
    err_lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and expect in err_lines[0], res.stderr
    assert _left_behind(out.parent) == []
    return err_lines[0]


def test_missing_model(tmp_path):
    _bad(tmp_path, tmp_path / "nope.onnx", expect="no such model file")


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf at all \x00\xff" * 10)
    _bad(tmp_path, bad, "--calib", DIGITS / "calib.npz", expect=str(bad))


def test_truncated_model(tmp_path):
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes((DIGITS / "model.onnx").read_bytes()[:5000])
    _bad(tmp_path, bad, "--calib", DIGITS / "calib.npz", expect="trunc.onnx")


def test_calib_wrong_input_name(tmp_path):
    f = tmp_path / "c.npz"
    np.savez(f, img=np.zeros((4, 1, 8, 8), np.float32))
    _bad(tmp_path, DIGITS / "model.onnx", "--calib", f, expect="'img'")


def test_calib_wrong_shape(tmp_path):
    f = tmp_path / "c.npz"
    np.savez(f, image=np.zeros((4, 3, 8, 8), np.float32))
    line = _bad(tmp_path, DIGITS / "model.onnx", "--calib", f, expect="'image'")
    assert "[4,3,8,8]" in line.replace(" ", "")


def test_calib_missing_path(tmp_path):
    _bad(tmp_path, DIGITS / "model.onnx", "--calib", tmp_path / "missing.npz", expect="missing.npz")


def test_calib_bad_callable(tmp_path):
    _bad(tmp_path, DIGITS / "model.onnx", "--calib", "no_such_module_xyz:reader", expect="no_such_module_xyz")


def test_conflicting_options(tmp_path):
    _bad(tmp_path, DIGITS / "model.onnx", "--per-tensor", "--block-size", 32, expect="--per-tensor")


def test_output_folder_missing(tmp_path):
    res = invoke("quantize", DIGITS / "model.onnx", "-o", tmp_path / "no" / "q.onnx", "--calib", DIGITS / "calib.npz")
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_output_equal_to_input_is_refused(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes((DIGITS / "model.onnx").read_bytes())
    before = model.read_bytes()
    res = invoke("quantize", model, "-o", model, "--calib", DIGITS / "calib.npz")
    assert res.exit_code == 2 and "overwrite" in res.stderr
    assert model.read_bytes() == before


def test_bad_option_value_is_usage_error(tmp_path):
    res = invoke("quantize", DIGITS / "model.onnx", "-o", tmp_path / "q.onnx", "--weight-bits", 9)
    assert res.exit_code == 2 and not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("args, expect", [
    (["--candidate-block", "32,x"], "--candidate-block: expected comma-separated integers, got '32,x'"),
    (["--candidate-block", "1"], "--candidate-block: block sizes must be 0 or at least 2, got '1'"),
    (["--weight-only", "--act-mode", "dynamic"], "--weight-only is --act-mode none"),
])
def test_bad_candidate_blocks_and_conflicting_activation_modes_are_one_line_errors(tmp_path, args, expect):
    _bad(tmp_path, DIGITS / "model.onnx", "--calib", DIGITS / "calib.npz", "--avg-bits", 3, *args, expect=expect)


def test_verification_gate_fails_with_exit_1_and_writes_nothing(tmp_path):
    _bad(tmp_path, DIGITS / "model.onnx", "--calib", DIGITS / "calib.npz", "--weight-bits", 2, "--weight-only",
         "--verify-min-agreement", 0.999, code=1, expect="verification failed")


def test_no_quantizable_weights(tmp_path):
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), m)
    _bad(tmp_path, m, expect="no quantizable weights")


def test_json_error_is_one_object_on_stdout(tmp_path):
    res = invoke("quantize", tmp_path / "nope.onnx", "-o", tmp_path / "q.onnx", "--json")
    assert res.exit_code == 2
    obj = json.loads(res.stdout)
    assert obj["ok"] is False and obj["exit_code"] == 2 and "nope.onnx" in obj["error"]


def test_evaluate_labels_misaligned(tmp_path, digits_int8):
    out, _ = digits_int8
    labels = tmp_path / "l.npy"
    np.save(labels, np.zeros(7, np.int64))
    res = invoke("evaluate", DIGITS / "model.onnx", out, "--calib", DIGITS / "eval.npz", "--labels", labels)
    assert res.exit_code == 2 and "7 labels for 500 samples" in res.stderr


def test_random_calibration_warns_loudly(tmp_path):
    res = invoke("quantize", DIGITS / "model.onnx", "-o", tmp_path / "q.onnx", "-q")
    assert res.exit_code == 0
    assert "WARNING" in res.stderr and "random" in res.stderr.lower()


def test_help_has_examples():
    for cmd in ("quantize", "inspect", "evaluate"):
        res = invoke(cmd, "--help")
        assert res.exit_code == 0 and "Example" in res.output


def test_console_script_runs_as_a_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "cet_onnx.cli", "inspect", str(DIGITS / "model.onnx")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "quantizable weights: 9" in proc.stdout
