"""Probe batches of a transformer export run without their padding, only where that changes nothing."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cet_onnx import pipeline
from cet_onnx.allocation import stage
from cet_onnx.allocation.probes import ProbeSession
from cet_onnx.calibration import padding
from cet_onnx.calibration.data import batched
from cet_onnx.calibration.probe_batches import probe_batches
from cet_onnx.options import QuantizeOptions
from models import encoder_feeds, tiny_encoder


def test_trim_cuts_the_mask_and_its_inputs_after_the_last_token():
    feed = {"input_ids": np.arange(12).reshape(2, 6), "attention_mask": np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]),
            "pixel": np.ones((2, 6)), "scale": np.ones(2)}
    assert padding.sequence_inputs(feed) == ["input_ids", "attention_mask", "pixel"]
    cut = padding.trim(feed, ["input_ids"])
    assert cut["attention_mask"].shape == (2, 3) and cut["input_ids"].tolist() == [[0, 1, 2], [6, 7, 8]]
    assert cut["pixel"].shape == (2, 6) and cut["scale"] is feed["scale"]       # only the inputs named
    left = {"attention_mask": np.array([[0, 0, 1], [0, 1, 1]])}                 # left padding: nothing trails
    assert padding.trim(left, [])["attention_mask"].shape == (2, 3)
    assert padding.lengths([{"attention_mask": m[None]} for m in feed["attention_mask"]]).tolist() == [2, 3]
    assert padding.lengths([{"x": np.ones((1, 6))}]) is None


def _prepared(tmp_path, model: onnx.ModelProto, feeds: dict, labels: np.ndarray | None = None):
    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, path)
    np.savez(calib, **feeds)
    opts = QuantizeOptions.of(device="cpu", avg_bits=5.0, batch_size=8, probe_size=32)
    p = pipeline.prepare(path, str(calib), opts, mixed=True)
    p.labels = labels
    return p, opts


def test_a_pooled_encoder_runs_its_probe_batches_longest_first_and_cut_with_the_same_loss(tmp_path):
    feeds = encoder_feeds(48, seq=12)
    p, opts = _prepared(tmp_path, tiny_encoder(), feeds, labels=np.arange(48))
    probe = probe_batches(p, 32)
    widths = [b["attention_mask"].shape[1] for b in probe.batches]
    assert widths == sorted(widths, reverse=True) and widths[-1] < 12
    assert probe.positions == sum(b["attention_mask"].size for b in probe.batches) < probe.padded == 32 * 12
    # labels follow their samples: each batch's labels are the calibration rows it holds
    rows = [row for b in probe.batches for row in b["input_ids"]]
    assert len(rows) == len(probe.labels) == 32
    for row, label in zip(rows, probe.labels):
        assert np.array_equal(feeds["input_ids"][label][:len(row)], row)
    p.labels = None   # the loss stays the label-free one of an embedding
    session, info = stage.probe_session(p, opts)
    assert info["probe_padding"] == {"cut_after_last_token": True, "positions": probe.positions, "of": 384}
    uncut = ProbeSession(p.model, p.weights, p.values, None, batched(p.calib_samples[:32], 8, inputs=p.inputs),
                         p.providers, info["loss"], info["loss_output"])
    w = next(w for w in p.weights if w.name == "w1")
    noisy = p.values[w.name] + np.random.default_rng(0).normal(0, 0.05, p.values[w.name].shape).astype(np.float32)
    assert session.loss({w.name: noisy}) > 0
    np.testing.assert_allclose(session.loss({w.name: noisy}), uncut.loss({w.name: noisy}), rtol=1e-4)


def test_a_token_level_output_keeps_the_padding(tmp_path):
    p, _ = _prepared(tmp_path, tiny_encoder(tied_head=True), encoder_feeds(48, seq=12))
    probe = probe_batches(p, 32)
    assert probe.positions is None and all(b["attention_mask"].shape[1] == 12 for b in probe.batches)
    assert probe.report() == {"cut_after_last_token": False, "why": "output 'logits' follows the sequence length"}


def _mean_of_every_position() -> onnx.ModelProto:
    """Embeddings averaged over all positions, padding included: the padding reaches the output."""
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.normal(size=(50, 8)).astype(np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["tok"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["m", "one"], ["count"], keepdims=0),
             helper.make_node("ReduceMean", ["tok"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("Unsqueeze", ["count", "one"], ["count2"]),
             helper.make_node("Mul", ["pooled", "count2"], ["out"])]
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "T"]) for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "mean_all", ints, [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8])],
                              [emb, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_padding_that_reaches_the_output_is_kept(tmp_path):
    feeds = encoder_feeds(32, seq=12)
    feeds["input_ids"] = feeds["input_ids"] + 1 - feeds["attention_mask"]   # padding ids differ from token 0
    p, _ = _prepared(tmp_path, _mean_of_every_position(), feeds)
    probe = probe_batches(p, 32)
    assert probe.positions is None
    assert probe.report()["why"] == "output 'out' changes when the padding is cut (the padding reaches the tokens)"
