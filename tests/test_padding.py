"""Token-level outputs count real tokens only: the probes' loss and the verification metrics skip padding."""

import json

import numpy as np
import onnx
from click.testing import CliRunner

from cet_onnx.calibration import padding
from cet_onnx.cli import main
from cet_onnx.verify import compare_outputs
from models import encoder_feeds, tiny_encoder


def test_only_outputs_shaped_like_the_mask_have_positions():
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    assert padding.real_positions(mask, np.zeros((2, 3, 4))).tolist() == [[True, True, False], [True, False, False]]
    assert padding.real_positions(mask, np.zeros((2, 4))) is None          # a pooled output: every row counts
    assert padding.real_positions(mask, np.zeros((2, 5, 4))) is None       # another sequence length
    assert padding.real_positions(np.zeros((2, 3)), np.zeros((2, 3, 4))) is None   # no token at all
    assert padding.real_positions(None, np.zeros((2, 3, 4))) is None
    assert padding.select(np.arange(24).reshape(2, 3, 4), mask.astype(bool)).shape == (3, 4)


def test_batch_mask_joins_the_batches_and_needs_one_width():
    b = [{"input_ids": np.ones((2, 3)), "attention_mask": np.ones((2, 3))}, {"attention_mask": np.zeros((1, 3))}]
    assert padding.batch_mask(b).shape == (3, 3)
    assert padding.batch_mask([{"attention_mask": np.ones((2, 3))}, {"attention_mask": np.ones((2, 4))}]) is None
    assert padding.batch_mask([{"x": np.ones((2, 3))}]) is None


def test_errors_at_padded_positions_do_not_count_in_the_metrics():
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    ref = rng.normal(size=(2, 4, 8)).astype(np.float32)
    test = ref.copy()
    test[mask == 0] = -ref[mask == 0]          # wrong only where nothing reads the output
    [m] = compare_outputs(["h"], [ref], [test], {"h": "embedding"}, mask)
    assert m.mean_cosine == 1.0 and m.sqnr_db == float("inf")
    [unmasked] = compare_outputs(["h"], [ref], [test], {"h": "embedding"})
    assert unmasked.min_cosine < -0.99


def test_a_token_level_output_is_probed_and_verified_on_its_tokens(tmp_path):
    model = tmp_path / "encoder.onnx"
    onnx.save(tiny_encoder(tied_head=True), model)
    feeds = encoder_feeds(64)
    np.savez(tmp_path / "calib.npz", **feeds)
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(main, ["quantize", str(model), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                                    "--avg-bits", "5", "--loss-output", "logits", "--verify-size", "16",
                                    "--probe-size", "48", "--fidelity-samples", "0"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_name("q.report.json").read_text())
    probe_mask = feeds["attention_mask"][:48]
    assert report["allocation"]["loss_positions"] == {"mask": "attention_mask", "counted": int(probe_mask.sum()),
                                                      "of": probe_mask.size}
    outputs = {o["name"]: o for o in report["verification"]["outputs"]}
    assert outputs["embedding"]["positions"] is None                          # pooled: one vector per sample
    held_out = feeds["attention_mask"][-16:]
    assert outputs["logits"]["positions"]["counted"] == int(held_out.sum()) < held_out.size
    assert f"over {int(held_out.sum())} of {held_out.size} positions (the tokens of 'attention_mask')" in res.output


def test_activation_ranges_and_layer_rows_see_real_tokens_only():
    from onnx import TensorProto, helper, numpy_helper
    import onnx_ir as ir

    from cet_onnx.calibration.observe import collect_ranges

    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    tokens = padding.token_mask({"attention_mask": mask})
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 4, 3)).astype(np.float32)
    x[mask == 0] = 100.0                      # padded positions: values no output reads
    assert padding.at_tokens(x, tokens).shape == (5, 3) and padding.at_tokens(x, tokens).max() <= 1
    assert padding.at_tokens(x.reshape(8, 3), tokens).shape == (5, 3)
    assert padding.at_tokens(x[:, :, 0, None].transpose(1, 0, 2), tokens).shape == (4, 2, 1)   # not by position
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "zero"], ["y"]), helper.make_node("Cast", ["attention_mask"], ["m"], to=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 3]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("m", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    lo, hi = collect_ranges(model, ["y"], [{"x": x, "attention_mask": mask}], ["CPUExecutionProvider"], "minmax")["y"]
    assert -1 <= lo < 0 < hi <= 1
