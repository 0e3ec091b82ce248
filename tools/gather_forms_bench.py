#!/usr/bin/env python
"""Latency of the ways to write a quantized embedding lookup, in stock onnxruntime (CPU).

A 30522 × 384 table (BERT's vocabulary and MiniLM's width, random values) and ids of shape
16 × 64. Forms, each a one-op-chain model, ORT_ENABLE_EXTENDED, default threads; median of 30
runs after 3 warm-up runs, with the ops onnxruntime actually runs (its optimised graph):

* ``float``: ``Gather`` over the float table;
* ``DQ→Gather int8/row``, ``DQ→Gather int4/b32``: what a plain QDQ rewrite writes;
* ``Gather→Cast→Mul int8/row``: codes and row scales gathered, then dequantized (cet-onnx's INT8 form);
* ``Gather→DQ int8/b32``: codes and block scales gathered, then a blocked DequantizeLinear;
* ``GatherBlockQuantized int4/b32``: onnxruntime's contrib kernel (cet-onnx's INT4 form).

    python tools/gather_forms_bench.py

Writes ``tools/results/gather_forms.md``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

RESULTS = Path(__file__).resolve().parent / "results"
V, H, B = 30522, 384, 32
RNG = np.random.default_rng(0)
TABLE = (RNG.normal(size=(V, H)) * 0.05).astype(np.float32)
IDS = RNG.integers(0, V, size=(16, 64)).astype(np.int64)


def _model(nodes, inits, domains=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TP.INT64, list(IDS.shape))],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), *domains])


def _codes(bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(TABLE.reshape(V, H // block, block)).max(2) / qmax
    q = np.clip(np.rint(TABLE / np.repeat(scale, block, 1)), -qmax - 1, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


def forms() -> dict[str, onnx.ModelProto]:
    q8, s8 = _codes(8, H)
    q8b, s8b = _codes(8, B)
    q4, s4 = _codes(4, B)
    int4 = helper.make_tensor("q", TP.INT4, [V, H], q4.flatten().tolist())
    mk = helper.make_node
    return {
        "float": _model([mk("Gather", ["E", "ids"], ["y"])], [numpy_helper.from_array(TABLE, "E")]),
        "DQ→Gather int8/row": _model(
            [mk("DequantizeLinear", ["q", "s"], ["E"], axis=0), mk("Gather", ["E", "ids"], ["y"])],
            [numpy_helper.from_array(q8, "q"), numpy_helper.from_array(s8[:, 0], "s")]),
        "DQ→Gather int4/b32": _model(
            [mk("DequantizeLinear", ["q", "s"], ["E"], axis=1, block_size=B), mk("Gather", ["E", "ids"], ["y"])],
            [int4, numpy_helper.from_array(s4, "s")]),
        "Gather→Cast→Mul int8/row": _model(
            [mk("Gather", ["q", "ids"], ["qr"]), mk("Gather", ["s", "ids"], ["sr"]), mk("Cast", ["qr"], ["qf"], to=TP.FLOAT),
             mk("Unsqueeze", ["sr", "axis"], ["sc"]), mk("Mul", ["qf", "sc"], ["y"])],
            [numpy_helper.from_array(q8, "q"), numpy_helper.from_array(s8[:, 0], "s"),
             numpy_helper.from_array(np.array([-1], np.int64), "axis")]),
        "Gather→DQ int8/b32": _model(
            [mk("Gather", ["q", "ids"], ["qr"]), mk("Gather", ["s", "ids"], ["sr"]),
             mk("DequantizeLinear", ["qr", "sr"], ["y"], axis=-1, block_size=B)],
            [numpy_helper.from_array(q8b, "q"), numpy_helper.from_array(s8b, "s")]),
        "GatherBlockQuantized int4/b32": _model(
            [mk("GatherBlockQuantized", ["q", "ids", "s"], ["y"], domain="com.microsoft", block_size=B,
                gather_axis=0, quantize_axis=1)],
            [int4, numpy_helper.from_array(s4, "s")], [helper.make_opsetid("com.microsoft", 1)]),
    }


def measure(model: onnx.ModelProto, folder: Path) -> tuple[float, float, list[str]]:
    """(median ms, max |error| against the float lookup, ops onnxruntime runs)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(folder / "optimized.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    y = sess.run(None, {"ids": IDS})[0]
    for _ in range(3):
        sess.run(None, {"ids": IDS})
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        sess.run(None, {"ids": IDS})
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), float(np.abs(y - TABLE[IDS]).max()), ops


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, model in forms().items():
            ms, err, ops = measure(model, Path(d))
            rows.append(f"| {name} | {ms:.3f} | {err:.4f} | {', '.join(ops)} |")
    md = ("# Quantized embedding lookups in onnxruntime\n\n`python tools/gather_forms_bench.py`: a 30522 × 384 "
          "table, ids 16 × 64, CPU, median of 30 runs.\n\n| form | median ms | max abs error | ops run |\n"
          "|---|---|---|---|\n" + "\n".join(rows) + "\n")
    (RESULTS / "gather_forms.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
