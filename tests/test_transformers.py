"""Transformer-shaped exports: attention masks, activation modes, output-aware loss and metrics."""

import json
import re

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from cet_onnx.calibration.observe import collect_ranges
from cet_onnx.cli import main
from cet_onnx.graph.act_mode import choose_act_mode
from cet_onnx.graph.output_kind import output_kinds
from models import encoder_feeds, keras_style_mlp, small_cnn, tiny_encoder

FINFO_MIN = float(np.finfo(np.float32).min)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    d = tmp_path_factory.mktemp("encoder")
    np.savez(d / "calib.npz", **encoder_feeds(96))
    paths = {}
    for name, mask in (("inf", -np.inf), ("finfo", FINFO_MIN)):
        paths[name] = d / f"encoder_{name}.onnx"
        onnx.save(tiny_encoder(mask_value=mask), paths[name])
    return d, paths


def _quantize(model, out, calib, *extra):
    res = invoke("quantize", model, "-o", out, "--calib", calib, "--json", *extra)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _optimized_ops(path, tmp_path) -> list[str]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def test_auto_mode_is_dynamic_for_attention_and_static_for_a_cnn():
    enc = ir.serde.deserialize_model(tiny_encoder())
    mode, why = choose_act_mode("auto", enc.graph)
    assert mode == "dynamic" and "LayerNormalization" in why
    assert choose_act_mode("auto", ir.serde.deserialize_model(small_cnn()).graph)[0] == "static"
    assert choose_act_mode("static", enc.graph) == ("static", "as requested")


def test_decomposed_layernorm_and_softmax_of_a_keras_export_are_recognised():
    graph = ir.serde.deserialize_model(keras_style_mlp()).graph
    mode, why = choose_act_mode("auto", graph)
    assert mode == "dynamic" and "decomposed LayerNorm" in why
    assert output_kinds(graph) == {"probs": "probabilities"}


def test_output_kinds_follow_the_ops_that_compute_them():
    kinds = output_kinds(ir.serde.deserialize_model(tiny_encoder(tied_head=True)).graph)
    assert kinds == {"embedding": "embedding", "logits": "logits"}
    assert output_kinds(ir.serde.deserialize_model(small_cnn()).graph) == {"logits": "logits"}


@pytest.mark.parametrize("mask", ["inf", "finfo"])
def test_dynamic_mode_quantizes_a_masked_encoder_and_keeps_its_embeddings(encoder, mask, tmp_path):
    d, paths = encoder
    out = tmp_path / "q.onnx"
    report = _quantize(paths[mask], out, d / "calib.npz", "--act-mode", "dynamic")
    assert report["activation_mode"]["mode"] == "dynamic" and report["activation_mode"]["dynamic_matmuls"] == 6
    (o,) = report["verification"]["outputs"]
    assert o["kind"] == "embedding" and o["top1_agreement"] is None and o["mean_cosine"] >= 0.99
    ops = _optimized_ops(out, tmp_path)
    # q, k and v share one DynamicQuantizeLinear: MatMulIntegerToFloat; the others DynamicQuantizeMatMul
    assert ops.count("DynamicQuantizeMatMul") == 3 and ops.count("MatMulIntegerToFloat") == 3
    assert ops.count("DynamicQuantizeLinear") == 1 and "MatMulInteger" not in ops


def test_auto_tries_static_activations_on_a_transformer_with_conv_weights_and_keeps_them_where_they_meet_the_target(
        encoder, tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(256, 16)).astype(np.float32))
    onnx.save(keras_style_mlp(seed=2, conv=True), tmp_path / "m.onnx")
    kept = _quantize(tmp_path / "m.onnx", tmp_path / "s.onnx", tmp_path / "calib.npz")   # the default: auto
    mode = kept["activation_mode"]
    assert mode["mode"] == "static" and "keep the target on" in mode["why"] and "decomposed LayerNorm" in mode["why"]
    assert float(re.search(r"probs agreement ([0-9.]+) %", mode["why"]).group(1)) >= 98   # on the probe samples
    assert kept["activation_tensors"] > 0 and kept["verification"]["min_top1_agreement"] >= 0.95   # held out
    assert "QLinearConv" in _optimized_ops(tmp_path / "s.onnx", tmp_path)   # no Conv dequantized every run
    # a target static activations cannot keep: the trial says so and the model goes dynamic as before
    missed = _quantize(tmp_path / "m.onnx", tmp_path / "d.onnx", tmp_path / "calib.npz", "--weight-bits", "2",
                       "--act-min-agreement", "1.0")
    mode = missed["activation_mode"]
    assert mode["mode"] == "dynamic" and "checked first, miss the target (probs: top-1 agreement" in mode["why"]
    assert missed["timings_s"]["static trial"] > 0
    # a graph of MatMuls only runs as fast dynamic: no trial
    d, paths = encoder
    plain = _quantize(paths["inf"], tmp_path / "e.onnx", d / "calib.npz")
    assert plain["activation_mode"]["mode"] == "dynamic" and "static trial" not in plain["timings_s"]


@pytest.mark.parametrize("mask", ["inf", "finfo"])
def test_static_mode_on_an_encoder_quantizes_only_weight_matmul_inputs(encoder, mask, tmp_path):
    d, paths = encoder
    out = tmp_path / "q.onnx"
    report = _quantize(paths[mask], out, d / "calib.npz", "--act-mode", "static")
    assert report["activation_mode"]["mode"] == "static" and "LayerNorm" in report["activation_mode"]["why"]
    assert report["activation_tensors"] == 4   # x0 (q, k, v), ctx, x1, gelu
    graph = ir.serde.deserialize_model(onnx.load(out)).graph
    for node in graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0].producer() is not None \
                and node.inputs[0].producer().op_type == "QuantizeLinear":
            assert {u.node.op_type for u in node.outputs[0].uses()} <= {"MatMul", "Gemm"}
    (o,) = report["verification"]["outputs"]
    assert o["mean_cosine"] >= 0.99
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(None, encoder_feeds(4, seed=1))[0]).all()


@pytest.mark.parametrize("mask", ["inf", "finfo"])
def test_mask_carrying_tensors_get_no_range_and_say_why(encoder, mask):
    _, paths = encoder
    model = ir.serde.deserialize_model(onnx.load(paths[mask]))
    left: dict[str, str] = {}
    ranges = collect_ranges(model, ["additive_mask", "scores"], [encoder_feeds(8)], ["CPUExecutionProvider"],
                            left_float=left)
    assert list(ranges) == ["scores"] and list(left) == ["additive_mask"]
    assert ("-inf" in left["additive_mask"]) if mask == "inf" else ("sentinel" in left["additive_mask"])


def test_mixed_precision_on_an_encoder_uses_the_cosine_loss(encoder, tmp_path):
    d, paths = encoder
    out = tmp_path / "q.onnx"
    report = _quantize(paths["inf"], out, d / "calib.npz", "--avg-bits", "4", "--fidelity-samples", "0",
                       "--refine-rounds", "0", "--probe-size", "32")
    assert report["allocation"]["loss"] == "cosine" and report["allocation"]["output_kind"] == "embedding"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (emb,) = sess.run(None, encoder_feeds(4, seed=1))
    assert emb.shape == (4, 32) and np.isfinite(emb).all()


def test_nan_in_the_input_data_is_still_a_one_line_input_error(encoder, tmp_path):
    d, paths = encoder
    feeds = encoder_feeds(8)
    feeds["input_ids"] = feeds["input_ids"].astype(np.float32)
    feeds["input_ids"][0, 0] = np.nan
    np.savez(tmp_path / "bad.npz", **feeds)
    res = invoke("quantize", paths["inf"], "-o", tmp_path / "q.onnx", "--calib", tmp_path / "bad.npz")
    assert res.exit_code == 2 and "Traceback" not in res.output and not (tmp_path / "q.onnx").exists()


def _tied_encoder(stored: str) -> onnx.ModelProto:
    """tiny_encoder's tied LM head as exports write it: ``Transpose(E)`` (torch's dynamo exporter) or
    a second, transposed copy of the table (the TorchScript exporter, or onnxsim's folding)."""
    model = tiny_encoder(tied_head=True)
    if stored == "copy":
        table = next(t for t in model.graph.initializer if t.name == "word_embeddings")
        transpose = next(n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] == "word_embeddings")
        model.graph.node.remove(transpose)
        model.graph.initializer.append(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(table).T.copy(), "head_t"))
    return model


@pytest.mark.parametrize("stored", ["transpose", "copy"])
@pytest.mark.parametrize("flags, kernel, count", [
    ((), "DynamicQuantizeMatMul", 4),  # o_proj, ffn_in, ffn_out and the LM head (q, k, v: MatMulIntegerToFloat)
    (("--weight-bits", "4", "--block-size", "16"), "GatherBlockQuantized", 2)])  # word and position tables
def test_a_tied_lm_head_is_one_quantized_table_for_both_uses(encoder, tmp_path, stored, flags, kernel, count):
    d, _ = encoder
    path, out = tmp_path / "tied.onnx", tmp_path / "q.onnx"
    onnx.save(_tied_encoder(stored), path)
    report = _quantize(path, out, d / "calib.npz", "--act-mode", "dynamic", *flags)
    names = [w["name"] for w in report["weights"]]
    assert "word_embeddings" in names and "head_t" not in names and not report["skipped_weights"]
    tables = [t for t in onnx.load(out).graph.initializer if sorted(t.dims) == [32, 50]]
    assert len(tables) == 1 and tables[0].data_type in (TensorProto.INT8, TensorProto.INT4, TensorProto.UINT4)
    assert _optimized_ops(out, tmp_path).count(kernel) == count
    feeds = encoder_feeds(8, seed=1)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    cos = (ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)
    assert cos > (0.99 if not flags else 0.95)
