"""Models onnxruntime runs whose inputs or weights sit where simple models have none: scalar and state inputs,
weights inside If branches and Loop bodies, local functions, LSTM. Each is quantized with the CLI and checked
against onnxruntime's float outputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from cet_onnx.cli import main

RNG = np.random.default_rng(0)
HIDDEN = 8


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _info(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _const(nodes, name, array):
    nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name)))
    return name


def _branch(tag: str, seed: int) -> onnx.GraphProto:
    """frame → Conv → Relu → mean over time → with the state's h: MatMul → Tanh → new h; output Gemm → Sigmoid."""
    rng = np.random.default_rng(seed)
    n: list = []
    n.append(helper.make_node("Unsqueeze", ["x", _const(n, f"{tag}_ax1", np.array([1], np.int64))], [f"{tag}_x3"]))
    n.append(helper.make_node("Conv", [f"{tag}_x3", _const(n, f"{tag}_conv_w", rng.normal(size=(6, 1, 5)).astype(np.float32) / 2),
                                       _const(n, f"{tag}_conv_b", np.zeros(6, np.float32))],
                              [f"{tag}_conv"], pads=[2, 2], name=f"{tag}_Conv"))
    n.append(helper.make_node("Relu", [f"{tag}_conv"], [f"{tag}_relu"]))
    n.append(helper.make_node("ReduceMean", [f"{tag}_relu"], [f"{tag}_feat"], axes=[2], keepdims=0))
    n.append(helper.make_node("Gather", ["state", _const(n, f"{tag}_i0", np.array(0, np.int64))], [f"{tag}_h"], axis=0))
    n.append(helper.make_node("Concat", [f"{tag}_feat", f"{tag}_h"], [f"{tag}_fh"], axis=1))
    wc = rng.normal(size=(6 + HIDDEN, HIDDEN)).astype(np.float32) / 3
    n.append(helper.make_node("MatMul", [f"{tag}_fh", _const(n, f"{tag}_cell_w", wc)], [f"{tag}_pre"], name=f"{tag}_MatMul"))
    n.append(helper.make_node("Tanh", [f"{tag}_pre"], [f"{tag}_hn"]))
    wo = rng.normal(size=(HIDDEN, 1)).astype(np.float32)
    n.append(helper.make_node("Gemm", [f"{tag}_hn", _const(n, f"{tag}_out_w", wo), _const(n, f"{tag}_out_b", np.zeros(1, np.float32))],
                              [f"{tag}_logit"], name=f"{tag}_Gemm"))
    n.append(helper.make_node("Sigmoid", [f"{tag}_logit"], [f"{tag}_out"]))
    ax0 = _const(n, f"{tag}_ax0", np.array([0], np.int64))
    n.append(helper.make_node("Unsqueeze", [f"{tag}_hn", ax0], [f"{tag}_hu"]))
    n.append(helper.make_node("Gather", ["state", _const(n, f"{tag}_i1", np.array([1], np.int64))], [f"{tag}_c"], axis=0))
    n.append(helper.make_node("Concat", [f"{tag}_hu", f"{tag}_c"], [f"{tag}_stateN"], axis=0))
    return helper.make_graph(n, tag, [], [_info(f"{tag}_out", None), _info(f"{tag}_stateN", None)])


def streaming_model(path) -> None:
    """``x [batch, 32]``, scalar ``sr: int64``, ``state [2, batch, 8]``; an If on ``sr == 16000`` whose branches hold
    every weight as Constant nodes."""
    nodes = [helper.make_node("Constant", [], ["k16"], value=numpy_helper.from_array(np.array(16000, np.int64))),
             helper.make_node("Equal", ["sr", "k16"], ["is16"]),
             helper.make_node("If", ["is16"], ["out", "stateN"], then_branch=_branch("a", 1),
                              else_branch=_branch("b", 2), name="If_sr")]
    graph = helper.make_graph(nodes, "stream", [_info("x", ["batch", 32]), _info("sr", [], TensorProto.INT64),
                                                _info("state", [2, "batch", HIDDEN])],
                              [_info("out", ["batch", 1]), _info("stateN", [2, "batch", HIDDEN])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _stream(sess, frames, sr, with_sr=True):
    state = np.zeros((2, 1, HIDDEN), np.float32)
    outs, feeds = [], []
    for frame in frames:
        feed = {"x": frame[None], "state": state}
        if with_sr:
            feed["sr"] = np.array(sr, np.int64)
        feeds.append(feed)
        out, state = sess.run(None, feed)
        outs.append(out)
    return np.concatenate(outs), feeds


def _sess(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """The model, a calibration folder of 40 streamed 16 kHz runs (state from the previous run) and test frames."""
    root = tmp_path_factory.mktemp("stream")
    streaming_model(root / "m.onnx")
    frames = RNG.normal(size=(60, 32)).astype(np.float32)
    _, feeds = _stream(_sess(root / "m.onnx"), frames[:40], 16000)
    (root / "calib").mkdir()
    for k, feed in enumerate(feeds):
        np.savez(root / "calib" / f"r{k:03d}.npz", **feed)
    return root, frames[40:]


def _report(res):
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_streaming_model_with_an_if_is_quantized_in_both_branches(stream):
    root, test = stream
    rep = _report(invoke("quantize", root / "m.onnx", "-o", root / "q.onnx", "--calib", root / "calib", "--json", "-q"))
    assert sorted(w["name"] for w in rep["weights"]) == sorted(f"{t}_{w}" for t in "ab" for w in ("conv_w", "cell_w", "out_w"))
    assert rep["calibration"]["feeds_are_runs"] == "input 'sr' is a scalar"
    assert any("never computed" in why for why in rep["activations_left_float"].values())   # the 8 kHz branch
    q, f = _sess(root / "q.onnx"), _sess(root / "m.onnx")
    for sr in (16000, 8000):
        ref, _ = _stream(f, test, sr)
        got, _ = _stream(q, test, sr)
        assert np.abs(got - ref).max() < 0.03, sr
    ops = {n.op_type for n in onnx.load(root / "q.onnx").graph.node}
    assert "If" in ops


def test_fix_input_folds_the_if_and_keep_fixed_inputs_keeps_the_signature(stream):
    root, test = stream
    rep = _report(invoke("quantize", root / "m.onnx", "-o", root / "q16.onnx", "--calib", root / "calib",
                         "--fix-input", "sr=16000", "--json", "-q"))
    assert sorted(w["name"] for w in rep["weights"]) == ["a_cell_w", "a_conv_w", "a_out_w"]
    assert rep["fixed_inputs"] == {"sr": {"value": 16000, "kept_in_signature": False}}
    q = onnx.load(root / "q16.onnx")
    assert [i.name for i in q.graph.input] == ["x", "state"] and "If" not in {n.op_type for n in q.graph.node}
    assert "QuantizeLinear" in {n.op_type for n in q.graph.node}
    ref, _ = _stream(_sess(root / "m.onnx"), test, 16000)
    got, _ = _stream(_sess(root / "q16.onnx"), test, 16000, with_sr=False)
    assert np.abs(got - ref).max() < 0.03
    _report(invoke("quantize", root / "m.onnx", "-o", root / "k.onnx", "--calib", root / "calib",
                   "--fix-input", "sr=16000", "--keep-fixed-inputs", "--json", "-q"))
    assert [i.name for i in onnx.load(root / "k.onnx").graph.input] == ["x", "state", "sr"]
    got, _ = _stream(_sess(root / "k.onnx"), test, 16000)
    assert np.abs(got - ref).max() < 0.03


def test_mixed_precision_reaches_weights_inside_branches(stream):
    root, test = stream
    rep = _report(invoke("quantize", root / "m.onnx", "-o", root / "mix.onnx", "--calib", root / "calib",
                         "--avg-bits", "11", "--json", "-q"))
    formats = {w["name"]: w["format"] for w in rep["weights"]}
    assert len(formats) == 6 and any(not f.startswith("int8") for f in formats.values())
    # the 8 kHz branch never ran on the (16 kHz) calibration data: no evidence, so its weights keep 8 bits
    assert sorted(rep["allocation"]["unexercised_weights"]) == ["b_cell_w", "b_conv_w", "b_out_w"]
    assert all(formats[w].startswith("int8") for w in rep["allocation"]["unexercised_weights"])
    ref, _ = _stream(_sess(root / "m.onnx"), test, 16000)
    got, _ = _stream(_sess(root / "mix.onnx"), test, 16000)
    assert np.abs(got - ref).max() < 0.15
    tight = _report(invoke("quantize", root / "m.onnx", "-o", root / "mix7.onnx", "--calib", root / "calib",
                           "--avg-bits", "7", "--json", "-q"))   # cannot hold them at 8 bits: allocated, and said so
    assert all("cannot keep it at 8 bits" in why for why in tight["allocation"]["unexercised_weights"].values())


@pytest.mark.parametrize("args, message", [
    (["--fix-input", "rate=1"], "no input 'rate' (inputs: x, sr, state)"),
    (["--fix-input", "sr=1.5"], "--fix-input sr=1.5: expected int64 value(s) for input 'sr'"),
    (["--fix-input", "sr=16000", "--fix-input", "sr=8000"], "--fix-input: input 'sr' is fixed twice"),
    (["--keep-fixed-inputs"], "--keep-fixed-inputs keeps the inputs --fix-input froze; give --fix-input too"),
    (["--fix-input", "sr=8000"], "input 'sr' is fixed to 8000 by --fix-input, but the data gives [16000]"),
])
def test_bad_fixed_inputs_are_one_line_errors_and_write_nothing(stream, args, message):
    root, _ = stream
    res = invoke("quantize", root / "m.onnx", "-o", root / "bad.onnx", "--calib", root / "calib", *args)
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not (root / "bad.onnx").exists() and not (root / "bad.report.json").exists()


def test_a_run_feed_of_the_wrong_shape_is_a_one_line_error(stream, tmp_path):
    root, _ = stream
    calib = tmp_path / "calib"
    calib.mkdir()
    np.savez(calib / "r0.npz", x=np.zeros((1, 32), np.float32), sr=np.array(16000, np.int64),
             state=np.zeros((1, HIDDEN), np.float32))
    res = invoke("quantize", root / "m.onnx", "-o", tmp_path / "q.onnx", "--calib", calib)
    assert res.exit_code == 2 and "input 'state' expects shape [2,batch,8] (float32) in each run's feed, got [1,8]" \
        in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "q.onnx").exists()


def _quantize_and_compare(tmp_path, proto, feed, *args, tol=0.05, runs=False):
    """Quantize ``proto`` on 8 copies of ``feed`` (stacked, or with ``runs`` a folder of 8 per-run feeds) and
    compare with the float model on ``feed``."""
    model = tmp_path / "m.onnx"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, model)
    calib = tmp_path / "d"
    if runs:
        calib.mkdir()
        for k in range(8):
            np.savez(calib / f"run{k}.npz", **feed)
    else:
        calib = tmp_path / "d.npz"
        np.savez(calib, **{k: np.concatenate([v] * 8) for k, v in feed.items()})
    rep = _report(invoke("quantize", model, "-o", tmp_path / "q.onnx", "--calib", calib, "--json", "-q", *args))
    ref = _sess(model).run(None, feed)[0]
    got = _sess(tmp_path / "q.onnx").run(None, feed)[0]
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    return rep


def test_a_loop_body_weight_is_quantized(tmp_path):
    w = numpy_helper.from_array(RNG.normal(size=(4, 4)).astype(np.float32) / 2, "loop_w")
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("MatMul", ["v_in", "loop_w"], ["mm"]),
         helper.make_node("Tanh", ["mm"], ["v_out"])], "body",
        [_info("i", [], TensorProto.INT64), _info("c_in", [], TensorProto.BOOL), _info("v_in", ["N", 4])],
        [_info("c_out", [], TensorProto.BOOL), _info("v_out", ["N", 4])], [w])
    nodes = [helper.make_node("Constant", [], ["n"], value=numpy_helper.from_array(np.array(3, np.int64))),
             helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)]
    proto = helper.make_model(helper.make_graph(nodes, "loop", [_info("x", ["N", 4])], [_info("y", ["N", 4])]),
                              opset_imports=[helper.make_opsetid("", 17)])
    rep = _quantize_and_compare(tmp_path, proto, {"x": RNG.normal(size=(2, 4)).astype(np.float32)})
    assert [r["name"] for r in rep["weights"]] == ["loop_w"]


def _body_nodes(path):
    """The nodes inside the Loop / Scan bodies of the model at ``path``."""
    return [n for node in onnx.load(path).graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
            for n in a.g.node]


def _quantized_in_bodies(path) -> set[str]:
    return {n.input[0] for n in _body_nodes(path) if n.op_type == "QuantizeLinear"}


def _scan_rnn() -> onnx.ModelProto:
    """h_t = tanh(x_t W + h U), y_t = h_t V, as a Scan over axis 1 (the form tf2onnx exports RNNs in)."""
    w = [numpy_helper.from_array(RNG.normal(size=s).astype(np.float32) / d, n)
         for n, s, d in (("scan_W", (5, 8), 2), ("scan_U", (8, 8), 3), ("scan_V", (8, 3), 1))]
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "scan_W"], ["xw"]), helper.make_node("MatMul", ["h_in", "scan_U"], ["hu"]),
         helper.make_node("Add", ["xw", "hu"], ["pre"]), helper.make_node("Tanh", ["pre"], ["h_out"]),
         helper.make_node("MatMul", ["h_out", "scan_V"], ["y_t"])], "body",
        [_info("h_in", ["N", 8]), _info("x_t", ["N", 5])], [_info("h_out", ["N", 8]), _info("y_t", ["N", 3])], w)
    scan = helper.make_node("Scan", ["h0", "x"], ["hT", "y"], body=body, num_scan_inputs=1, scan_input_axes=[1],
                            scan_output_axes=[1])
    return helper.make_model(helper.make_graph([scan], "scan", [_info("h0", ["N", 8]), _info("x", ["N", 12, 5])],
                                               [_info("hT", ["N", 8]), _info("y", ["N", 12, 3])]),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_activations_and_hessians_inside_a_scan_body(tmp_path):
    feed = {"h0": np.zeros((4, 8), np.float32), "x": RNG.normal(size=(4, 12, 5)).astype(np.float32)}
    rep = _quantize_and_compare(tmp_path, _scan_rnn(), feed, tol=0.1)
    assert {"x_t", "h_in", "h_out"} <= _quantized_in_bodies(tmp_path / "q.onnx") and not rep["activations_left_float"]
    # at 4 bits the rounding uses each body layer's Hessian, observed over all 12 steps
    rep4 = _quantize_and_compare(tmp_path, _scan_rnn(), feed, "--weight-bits", "4", tol=0.3)
    assert rep4["rounding"]["method"] == "major-axis" and not rep4["rounding"]["round_to_nearest_fallback"]


def test_a_loop_whose_state_grows_leaves_only_that_tensor_float(tmp_path):
    w = numpy_helper.from_array(RNG.normal(size=(4, 4)).astype(np.float32) / 2, "grow_w")
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("MatMul", ["h_in", "grow_w"], ["mm"]),
         helper.make_node("Tanh", ["mm"], ["h_out"]), helper.make_node("Concat", ["acc_in", "h_out"], ["acc_out"], axis=1)],
        "body", [_info("i", [], TensorProto.INT64), _info("c_in", [], TensorProto.BOOL), _info("h_in", ["N", 4]),
                 _info("acc_in", ["N", "T"])],
        [_info("c_out", [], TensorProto.BOOL), _info("h_out", ["N", 4]), _info("acc_out", ["N", "T2"])], [w])
    proto = helper.make_model(helper.make_graph([helper.make_node("Loop", ["n", "", "x", "x"], ["h", "acc"], body=body)],
                                                "grow", [_info("x", ["N", 4]), _info("n", [], TensorProto.INT64)],
                                                [_info("h", ["N", 4]), _info("acc", ["N", "T3"])]),
                              opset_imports=[helper.make_opsetid("", 17)])
    feed = {"x": RNG.normal(size=(4, 4)).astype(np.float32), "n": np.array(3, np.int64)}
    rep = _quantize_and_compare(tmp_path, proto, feed, runs=True)
    # the accumulated sequence changes shape every iteration: onnxruntime cannot stack it, so it alone stays float
    assert list(rep["activations_left_float"]) == ["acc_in"]
    assert "iterations onnxruntime cannot stack" in rep["activations_left_float"]["acc_in"]
    assert {"h_in", "mm", "h_out"} <= _quantized_in_bodies(tmp_path / "q.onnx")


def test_weights_of_a_local_function_are_quantized(tmp_path):
    fn = helper.make_function("custom", "Dense", ["x", "w"], ["y"],
                              [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                              [helper.make_opsetid("", 17)])
    w = numpy_helper.from_array(RNG.normal(size=(6, 5)).astype(np.float32), "dense_w")
    graph = helper.make_graph([helper.make_node("Dense", ["x", "dense_w"], ["y"], domain="custom")], "fn",
                              [_info("x", ["N", 6])], [_info("y", ["N", 5])], [w])
    proto = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 17),
                                                                    helper.make_opsetid("custom", 1)])
    rep = _quantize_and_compare(tmp_path, proto, {"x": RNG.normal(size=(3, 6)).astype(np.float32)})
    assert [r["name"] for r in rep["weights"]] == ["dense_w"]


@pytest.mark.parametrize("op, gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_recurrent_weights_are_quantized(tmp_path, op, gates):
    hidden, inp = 6, 5
    W = numpy_helper.from_array(RNG.normal(size=(1, gates * hidden, inp)).astype(np.float32) / 2, "lstm_W")
    R = numpy_helper.from_array(RNG.normal(size=(1, gates * hidden, hidden)).astype(np.float32) / 2, "lstm_R")
    nodes = [helper.make_node(op, ["x", "lstm_W", "lstm_R"], ["", "y"], hidden_size=hidden)]
    proto = helper.make_model(helper.make_graph(nodes, "lstm", [_info("x", [7, "N", inp])],
                                                [_info("y", [1, "N", hidden])], [W, R]),
                              opset_imports=[helper.make_opsetid("", 17)])
    rep = _quantize_and_compare(tmp_path, proto, {"x": RNG.normal(size=(7, 2, inp)).astype(np.float32)}, runs=True)
    assert sorted(r["name"] for r in rep["weights"]) == ["lstm_R", "lstm_W"]
    assert rep["calibration"]["feeds_are_runs"].startswith("input 'x' has a fixed first dimension (7)")
    expected = "DynamicQuantizeLSTM" if op == "LSTM" else op   # onnxruntime's INT8 LSTM kernel; none for GRU / RNN
    assert [n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node][-1] == expected


def test_inspect_finds_the_weights_inside_branches(stream):
    root, _ = stream
    res = invoke("inspect", root / "m.onnx", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert len(info["weights"]) == 6 and info["nodes"] == 2 and info["subgraph_nodes"] > 20


def test_analyze_takes_fix_input_and_runs(stream, tmp_path):
    root, _ = stream
    res = invoke("analyze", root / "m.onnx", "--calib", root / "calib", "--fix-input", "sr=16000", "-o",
                 tmp_path / "sens", "--json", "-q", "--probe-size", "8", "--fidelity-samples", "0")
    assert res.exit_code == 0, res.output
    assert sorted(row["name"] for row in json.loads(res.stdout)["cet"]) == ["a_cell_w", "a_conv_w", "a_out_w"]
