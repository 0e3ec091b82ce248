"""Embedding tables in fast probes: lookups counted on the calibration data, costs scaled by ``Σ n_r ‖δ_r‖²``."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cet_onnx import pipeline
from cet_onnx.allocation.allocate import measure_cet, measure_cet_fast
from cet_onnx.allocation.stage import candidates, probe_session
from cet_onnx.options import QuantizeOptions
from cet_onnx.rounding.row_counts import RowCounts, quadratic_error

ROWS, HIDDEN, SEQ = 50, 64, 6


def test_counts_are_real_tokens_and_wrap_negative_indices():
    counts = RowCounts(5)
    ids = np.array([[1, 1, -1, 0], [2, 3, 3, 3]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    counts.update(ids, mask != 0)
    np.testing.assert_array_equal(counts.counts, [0, 2, 1, 1, 1])    # -1 is row 4; padding not counted
    counts.update(np.array([[0, 4]]), mask != 0)                      # laid out unlike the mask: all counted
    np.testing.assert_array_equal(counts.counts, [1, 2, 1, 1, 2])
    assert counts.seen == 7


def test_quadratic_form_is_the_lookup_error():
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(ROWS, HIDDEN))
    ids = rng.integers(0, ROWS, size=(4, SEQ))
    counts = RowCounts(ROWS)
    counts.update(ids, None)
    assert np.isclose(quadratic_error(delta, counts.counts), np.sum(delta[ids] ** 2), rtol=1e-12)


def _embedding_model(path: Path) -> Path:
    """``ids → Gather(E) → MatMul(Q)`` with ``Q`` orthogonal: the output error is exactly ``δ[ids] Q``."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.normal(size=(ROWS, HIDDEN)).astype(np.float32), "table")
    q = numpy_helper.from_array(np.linalg.qr(rng.normal(size=(HIDDEN, HIDDEN)))[0].astype(np.float32), "q")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["e"], name="lookup"),
                               helper.make_node("MatMul", ["e", "q"], ["y"], name="mm")], "embed",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", SEQ])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", SEQ, HIDDEN])], [table, q])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_table_formats_are_scaled_from_one_probe(tmp_path):
    model = _embedding_model(tmp_path / "embed.onnx")
    ids = np.random.default_rng(1).zipf(1.5, size=(64, SEQ)) % ROWS   # some rows often, many never
    np.savez(tmp_path / "calib.npz", ids=ids.astype(np.int64))
    options = QuantizeOptions(avg_bits=4, device="cpu", weight_only=True, loss="mse", verify_size=0,
                              probe_size=64, rounding="major-axis")
    p = pipeline.prepare(str(model), str(tmp_path / "calib.npz"), options, mixed=True)
    session, info = probe_session(p, options)
    cand = candidates(p, options, quadratic=True)
    table = [w.name for w in cand.weights].index("table")
    assert p.gathers["table"][0] == "ids" and cand.quadratic_forms(table) is not None
    fast, full = measure_cet_fast(session, cand), measure_cet(session, cand)
    formats = [j for j in range(len(cand.formats)) if cand.available[table, j]]
    scaled = [j for j in formats if not fast.details[table][cand.formats[j].label]["probed"]]
    assert len(formats) >= 2 and len(scaled) == len(formats) - 1    # one probe, the rest scaled from it
    # the loss is exactly quadratic in the lookup error: the scaled costs are the probed ones
    np.testing.assert_allclose(fast.costs[table, formats], full.costs[table, formats], rtol=2e-3)
