"""Reliability: hostile and unusual inputs, interrupted runs, determinism, untouched inputs."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from cet_onnx.cli import main
from cet_onnx.errors import RuntimeFailure
from cet_onnx.graph.passes.upgrade_opset import upgrade_opset

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"
RNG = np.random.default_rng(5)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mlp(path: Path, external: bool = False) -> Path:
    w = numpy_helper.from_array(RNG.normal(size=(16, 32)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(RNG.normal(size=(32, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        onnx.save_model(m, str(path), save_as_external_data=True, location=path.name + ".weights", size_threshold=0)
    else:
        onnx.save(m, path)
    return path


def test_external_data_model_quantizes_and_input_is_untouched(tmp_path):
    model = _mlp(tmp_path / "ext.onnx", external=True)
    before = {p.name: _sha(p) for p in tmp_path.iterdir()}
    data = tmp_path / "c.npz"
    np.savez(data, x=RNG.normal(size=(32, 16)).astype(np.float32))
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    res = invoke("quantize", model, "-o", out, "--calib", data, "--weight-bits", 4, "-q")
    assert res.exit_code == 0, res.output
    assert {p.name: _sha(p) for p in tmp_path.iterdir() if p.is_file()} == {**before, "c.npz": _sha(data)}
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx", "q.report.json"]


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    model = _mlp(inner / "m.onnx", external=True)
    proto = onnx.load(str(model), load_external_data=False)
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    onnx.save(proto, str(model))
    out = tmp_path / "q.onnx"
    res = invoke("quantize", model, "-o", out)
    assert res.exit_code == 2 and "outside the model's folder" in res.stderr and "'w'" in res.stderr
    assert not out.exists()


def test_two_inputs_two_outputs_and_an_int64_input(tmp_path):
    w = numpy_helper.from_array(RNG.normal(size=(8, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["h", "kf"], ["y1"]), helper.make_node("Relu", ["h"], ["y2"])]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                                         helper.make_tensor_value_info("k", TensorProto.INT64, ["N", 1])],
                          [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["N", 4]),
                           helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 4])], [w])
    model = tmp_path / "two.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), model)
    data = tmp_path / "d.npz"
    np.savez(data, x=RNG.normal(size=(40, 8)).astype(np.float32), k=RNG.integers(0, 5, size=(40, 1)))
    res = invoke("quantize", model, "-o", tmp_path / "q.onnx", "--calib", data, "--json", "-q")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert [o["name"] for o in rep["verification"]["outputs"]] == ["y1", "y2"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=RNG.normal(size=(40, 8)).astype(np.float32), k=RNG.normal(size=(40, 1)))
    res = invoke("quantize", model, "-o", tmp_path / "q2.onnx", "--calib", bad)
    assert res.exit_code == 2 and "'k'" in res.stderr and not (tmp_path / "q2.onnx").exists()


def test_weights_inside_if_subgraphs_are_quantized_in_place(tmp_path):
    wt = numpy_helper.from_array(RNG.normal(size=(8, 8)).astype(np.float32), "wt")
    branch = helper.make_graph([helper.make_node("MatMul", ["h", "wt"], ["b"])], "then", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 8])], [wt])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["c"])], "else", [],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 8])])
    w = numpy_helper.from_array(RNG.normal(size=(8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)]
    g = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                          [w, numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = tmp_path / "if.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), model)
    data = tmp_path / "d.npz"
    np.savez(data, x=RNG.normal(size=(16, 8)).astype(np.float32))
    res = invoke("quantize", model, "-o", tmp_path / "q.onnx", "--calib", data, "--json", "-q", "--no-simplify")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert [w["name"] for w in rep["weights"]] == ["w", "wt"] and not rep["skipped_weights"]
    q = onnx.load(tmp_path / "q.onnx")
    then = next(a.g for n in q.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert {n.op_type for n in then.node} >= {"DequantizeLinear", "MatMul"}   # the branch reads its own DQ
    x = np.load(data)["x"][:4]     # in the calibrated range: 12 samples set it
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.sqrt(np.mean((got - ref) ** 2)) < 0.05 * np.sqrt(np.mean(ref ** 2))


def test_opset_conversion_failure_names_the_op():
    node = helper.make_node("Crop", ["x"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 6)])
    with pytest.raises(RuntimeFailure, match="cannot convert opset 6 to 21.*op 'Crop' blocked it"):
        upgrade_opset(m, 21, "m.onnx")


def test_unquantized_ops_are_listed_in_the_report(tmp_path):
    w = numpy_helper.from_array(RNG.normal(size=(8, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    model = tmp_path / "s.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), model)
    data = tmp_path / "d.npz"
    np.savez(data, x=RNG.normal(size=(16, 8)).astype(np.float32))
    rep = json.loads(invoke("quantize", model, "-o", tmp_path / "q.onnx", "--calib", data, "--json", "-q").stdout)
    assert rep["float_ops"] == {"Softmax": 1}


def test_calibration_with_nan_is_refused(tmp_path):
    data = tmp_path / "nan.npz"
    x = RNG.normal(size=(8, 1, 8, 8)).astype(np.float32)
    x[3, 0, 2, 2] = np.nan
    np.savez(data, image=x)
    res = invoke("quantize", DIGITS / "model.onnx", "-o", tmp_path / "q.onnx", "--calib", data)
    assert res.exit_code == 2 and "nan.npz" in res.stderr and "'image'" in res.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_same_inputs_give_byte_identical_model_and_report(tmp_path):
    import shutil
    out = tmp_path / "q.onnx"
    cache = tmp_path / "cache"
    outs = []
    for k in range(3):   # fresh probes, cached probes, fresh probes again
        if k == 2:
            shutil.rmtree(cache)
        res = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--calib", DIGITS / "calib.npz", "--avg-bits", 3,
                     "--calib-size", 96, "--probe-size", 32, "--fidelity-samples", 3, "--refine-rounds", 1,
                     "--cache-dir", cache, "--reproducible", "-q")
        assert res.exit_code == 0, res.output
        outs.append((out.read_bytes(), out.with_name("q.report.json").read_bytes()))
    assert outs[0] == outs[1] == outs[2]
    report = json.loads(outs[0][1])
    assert "timings_s" not in report and "probe_seconds" not in report["allocation"]


def _default_sigint() -> None:
    """A suite started in the background (``nohup pytest &``) passes SIGINT on ignored; the test needs Ctrl-C's default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_no_output(tmp_path, sig):
    out = tmp_path / "q.onnx"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CET_ONNX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "cet_onnx.cli", "quantize", str(DIGITS / "model.onnx"), "-o", str(out),
                             "--calib", str(DIGITS / "calib.npz"), "--avg-bits", "3", "--hutchinson-samples", "8",
                             "--allocator", "hawq"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                            preexec_fn=_default_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and "Hutchinson" not in (proc.stderr.readline() or "Hutchinson"):
        pass
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; no output was written" in err
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []
