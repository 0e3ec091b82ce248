#!/usr/bin/env python
"""Latency of one transformer MatMul in every form cet-onnx and onnxruntime emit, side by side.

Why: the deployed-speed issue asks all-MiniLM-L6-v2 at ``--avg-bits 4`` to run at ≤ 0.6× FP32
latency. A batch-1 transformer run multiplies a *sequence* of tokens (M = 64 here) by each weight,
so its MatMuls are small GEMMs, not the matrix-vector products (M = 1) where 4-bit weights shine.
This script measures, for the MiniLM weight shapes (K × N = 384×384, 384×1536, 1536×384) at
M = 1 and M = 64 rows, the median of interleaved runs (:func:`cet_onnx.latency.interleaved_ms`) of:

* ``fp32``: the float MatMul;
* ``ort-dynamic``: onnxruntime ``quantize_dynamic`` with its defaults (fused to
  ``DynamicQuantizeMatMul``: INT8 weights, activations quantized at run time);
* ``cet w8 dynamic``: ``cet-onnx quantize --weight-bits 8 --act-mode dynamic``;
* ``cet w4 ch dynamic``: ``--weight-bits 4 --act-mode dynamic``: INT4 codes per channel in the file,
  widened to INT8 by a Cast onnxruntime folds at load, run by the same dynamic INT8 kernel;
* ``cet w4 b32`` / ``w4 b128`` / ``w2 b128``: ``cet-onnx quantize --weight-bits B --block-size S``
  (the plain ONNX form onnxruntime fuses into ``MatMulNBits``, accuracy level 4).

Each emitted file is the real output of the command; the kernels onnxruntime chose (from its
optimised graph) are listed beside each time. Writes ``tools/results/matmul_forms.{md,json}``.

    python tools/matmul_forms_bench.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cet_onnx.latency import cpu_name, interleaved_ms  # noqa: E402

RESULTS = ROOT / "tools" / "results"
SHAPES = [(384, 384), (384, 1536), (1536, 384)]
ROWS = [1, 64]
CET_FORMS = {
    "cet w8 dynamic": ["--weight-bits", "8", "--act-mode", "dynamic"],
    "cet w4 ch dynamic": ["--weight-bits", "4", "--act-mode", "dynamic"],
    "cet w4 b32": ["--weight-bits", "4", "--block-size", "32"],
    "cet w4 b128": ["--weight-bits", "4", "--block-size", "128"],
    "cet w2 b128": ["--weight-bits", "2", "--block-size", "128"],
}


def _matmul_model(k: int, n: int, path: Path) -> None:
    """x [1, M, K] @ W [K, N] with a normal(0, 0.05) weight, dynamic M."""
    w = np.random.default_rng(0).normal(0, 0.05, (k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "M", n])],
                              [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


def _forms(k: int, n: int, work: Path) -> dict[str, Path]:
    """Every form of the K × N MatMul as a file: float, onnxruntime dynamic, the cet-onnx commands."""
    from onnxruntime.quantization import quantize_dynamic

    float_path = work / f"fp32_{k}x{n}.onnx"
    _matmul_model(k, n, float_path)
    calib = work / f"calib_{k}.npz"
    np.savez(calib, x=np.random.default_rng(1).normal(0, 1, (64, 16, k)).astype(np.float32))
    forms = {"fp32": float_path, "ort-dynamic": work / f"ortdyn_{k}x{n}.onnx"}
    quantize_dynamic(str(float_path), str(forms["ort-dynamic"]))
    for label, args in CET_FORMS.items():
        out = work / f"{label.replace(' ', '_')}_{k}x{n}.onnx"
        subprocess.run([sys.executable, "-m", "cet_onnx.cli", "quantize", str(float_path), "-o", str(out),
                        "--calib", str(calib), "--latency-batch", "0", *args], check=True, capture_output=True, cwd=ROOT)
        forms[label] = out
    return forms


def _session(path: Path, optimized: Path) -> tuple[ort.InferenceSession, str]:
    """A session at onnxruntime's default optimisation, and the kernels of its optimised graph."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    return sess, ", ".join(f"{op}" if c == 1 else f"{op} x{c}" for op, c in sorted(ops.items()))


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="matmul_forms_") as tmp:
        work = Path(tmp)
        for k, n in SHAPES:
            forms = _forms(k, n, work)
            made = {label: _session(path, work / f"opt_{i}.onnx") for i, (label, path) in enumerate(forms.items())}
            for m in ROWS:
                feed = {"x": np.random.default_rng(2).normal(0, 1, (1, m, k)).astype(np.float32)}
                ms, rounds = interleaved_ms([s for s, _ in made.values()], feed, min_rounds=20, seconds=3.0)
                for (label, (_, kernels)), t in zip(made.items(), ms):
                    rows.append({"K": k, "N": n, "M": m, "form": label, "ms": round(t, 4),
                                 "x_fp32": round(t / ms[0], 3), "kernels": kernels, "rounds": rounds})
                print(f"K={k} N={n} M={m}: " + ", ".join(f"{r['form']} {r['x_fp32']:.2f}x"
                                                          for r in rows[-len(made):]), flush=True)
    _write(rows)


def _write(rows: list[dict]) -> None:
    meta = {"onnxruntime": ort.__version__, "cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": "onnxruntime default"}
    (RESULTS / "matmul_forms.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    forms = list(dict.fromkeys(r["form"] for r in rows))
    lines = ["# One MatMul in every emitted form: latency × FP32", "",
             f"`python tools/matmul_forms_bench.py`; onnxruntime {meta['onnxruntime']}, {meta['cpu']}, "
             f"{meta['cores']} cores, default threads; median of interleaved runs. M = rows of the "
             "activation (a batch-1 transformer run has M = sequence length).", "",
             "| K × N | M | " + " | ".join(forms) + " |", "|---|---|" + "---|" * len(forms)]
    for (k, n, m) in dict.fromkeys((r["K"], r["N"], r["M"]) for r in rows):
        cells = {r["form"]: r for r in rows if (r["K"], r["N"], r["M"]) == (k, n, m)}
        lines.append(f"| {k}×{n} | {m} | " + " | ".join(
            f"{cells[f]['x_fp32']:.2f}× ({cells[f]['ms']:.3f} ms)" for f in forms) + " |")
    lines += ["", "Kernels onnxruntime chose (optimised graph):", ""]
    for f in forms:
        lines.append(f"- {f}: {next(r['kernels'] for r in rows if r['form'] == f)}")
    (RESULTS / "matmul_forms.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'matmul_forms.md'}")


if __name__ == "__main__":
    main()
