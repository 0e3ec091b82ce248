"""Streaming models: cet-onnx against onnxruntime's ``quantize_static`` on the synthetic voice-activity model.

The model (``tools/make_streaming_model.py``): scalar ``sr``, an ``If`` on it whose two branches hold six Convs
and a recurrent cell each (weights in ``Constant`` nodes), a state ``[2, batch, 128]`` with its batch on axis 1.
Calibration: 64 streamed runs at 16 kHz (``calib/``, one ``.npz`` feed per run, the state from the previous
run). Scored on 400 other streamed frames per sample rate, each model carrying its own state from frame to
frame: speech decisions (probability > 0.5) agreeing with the float model's, the largest probability error,
file size and latency (one frame, interleaved runs) against the float model.

Runs, all with default settings:

* cet-onnx ``quantize`` as a user runs it (``--calib calib/``), with ``--fix-input sr=16000`` (the 16 kHz
  model, the If folded away), with that and ``--keep-fixed-inputs``, mixed ``--avg-bits 6`` (the budget
  keeps the 8 kHz branch, which calibration never runs, at 8 bits) and ``--avg-bits 4`` (it cannot), with
  and without the fixed input;
* onnxruntime ``quantize_static`` (QDQ, per-channel, MinMax), fed the same runs by a
  ``CalibrationDataReader``.

    python tools/streaming_bench.py [--out tools/results/streaming] [--table tools/results/streaming.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from bench_common import CET_VERSION, ROOT, cpu_name, interleaved_ms, model_file_bytes, session
import make_streaming_model as vad

RUNS = {
    "cet default": [],
    "cet --fix-input sr=16000": ["--fix-input", "sr=16000"],
    "cet --fix-input sr=16000 --keep-fixed-inputs": ["--fix-input", "sr=16000", "--keep-fixed-inputs"],
    "cet --avg-bits 6": ["--avg-bits", "6"],
    "cet --avg-bits 4": ["--avg-bits", "4"],
    "cet --avg-bits 4 --fix-input sr=16000": ["--avg-bits", "4", "--fix-input", "sr=16000"],
}


def _cet(out: Path, name: str, args: list[str]) -> tuple[Path, dict, float]:
    dest = out / (name.replace(" ", "_").replace("=", "").replace("-", "") + ".onnx")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cet_onnx.cli", "quantize", str(out / "vad.onnx"), "-o", str(dest),
                    "--calib", str(out / "calib"), "-q", "--no-cache", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return dest, json.loads(dest.with_suffix(".report.json").read_text()), wall


def _ort_static(out: Path) -> tuple[Path, float]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Runs(CalibrationDataReader):
        def __init__(self) -> None:
            self.files = iter(sorted((out / "calib").glob("*.npz")))

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else dict(np.load(path))

    dest = out / "ort_static.onnx"
    t0 = time.perf_counter()
    quantize_static(str(out / "vad.onnx"), str(dest), Runs(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dest, time.perf_counter() - t0


def _ops(path: Path) -> dict[str, int]:
    """Op counts over the model and every subgraph."""
    counts: dict[str, int] = {}

    def visit(graph) -> None:
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.g.node:
                    visit(attr.g)

    visit(onnx.load(str(path)).graph)
    return counts


def _score(float_sess, sess, frames: np.ndarray, sr: int, fixed: bool, keep: bool) -> dict:
    ref, _ = vad.stream(float_sess, frames, sr)
    if fixed and not keep:
        probs = _stream_without_sr(sess, frames)
    else:
        probs, _ = vad.stream(sess, frames, sr)
    return {"agreement": float(np.mean((ref > 0.5) == (probs > 0.5))), "max_abs_err": float(np.abs(ref - probs).max()),
            "speech_fraction": float(np.mean(ref > 0.5))}


def _stream_without_sr(sess, frames: np.ndarray) -> np.ndarray:
    state = np.zeros((2, 1, vad.HIDDEN), np.float32)
    probs = []
    for frame in frames:
        prob, state = sess.run(None, {"input": frame[None], "state": state})
        probs.append(float(prob[0, 0]))
    return np.array(probs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tools/results/streaming")
    ap.add_argument("--table", type=Path, default=ROOT / "tools/results/streaming.md")
    args = ap.parse_args()
    out = args.out
    subprocess.run([sys.executable, str(ROOT / "tools/make_streaming_model.py"), str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    float_path = out / "vad.onnx"
    float_sess = session(float_path)
    evals = {sr: np.load(out / f"eval{sr // 1000}k.npy") for sr in vad.FRAME}
    rows = []
    for name, extra in RUNS.items():
        path, report, wall = _cet(out, name, extra)
        fixed, keep = "--fix-input" in extra, "--keep-fixed-inputs" in extra
        rows.append({"run": name, "path": path, "wall_s": wall, "fixed": fixed, "keep": keep,
                     "weights": len(report["weights"]), "skipped": report["skipped_weights"],
                     "kernels": report.get("kernels", {})})
    path, wall = _ort_static(out)
    rows.append({"run": "onnxruntime quantize_static", "path": path, "wall_s": wall, "fixed": False, "keep": False,
                 "weights": None, "skipped": {}})
    for row in rows:
        sess = session(row["path"])
        row["size_ratio"] = model_file_bytes(float_path) / model_file_bytes(row["path"])
        row["ops"] = _ops(row["path"])
        rates = [16000] if row["fixed"] else list(vad.FRAME)
        row["scores"] = {sr: _score(float_sess, sess, evals[sr], sr, row["fixed"], row["keep"]) for sr in rates}
        feed = {"input": evals[16000][:1], "state": np.zeros((2, 1, vad.HIDDEN), np.float32)}
        if not row["fixed"] or row["keep"]:
            feed["sr"] = np.array(16000, np.int64)
        float_feed = dict(feed, sr=np.array(16000, np.int64))
        (fp32_ms, q_ms), _ = interleaved_ms([float_sess, sess], [float_feed, feed])
        row["latency_ratio"] = q_ms / fp32_ms
    write_table(rows, args.table, out)


def write_table(rows: list[dict], table: Path, out: Path) -> None:
    lines = [f"# Streaming voice-activity model (synthetic, `tools/make_streaming_model.py`)", "",
             f"cet-onnx {CET_VERSION}, {cpu_name()}; `python tools/streaming_bench.py`. Decisions: probability > 0.5, "
             "each model streaming its own state over 400 frames per sample rate. Latency: one frame, "
             "median of interleaved runs (`cet_onnx.latency.interleaved_ms`), against the float model's.", "",
             "| run | weights quantized | file × smaller | 16 kHz agreement | 16 kHz max abs err | 8 kHz agreement "
             "| latency × float | wall s | quantize ops |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s16 = r["scores"][16000]
        s8 = r["scores"].get(8000)
        q_ops = {k: v for k, v in r["ops"].items() if k.startswith(("Q", "Dequantize", "Dynamic", "MatMul"))}
        s8_text = f"{s8['agreement']:.1%}" if s8 else "n/a (fixed 16 kHz)"
        lines.append(f"| {r['run']} | {r['weights'] if r['weights'] is not None else '—'} | {r['size_ratio']:.2f} "
                     f"| {s16['agreement']:.1%} | {s16['max_abs_err']:.4f} | {s8_text} "
                     f"| {r['latency_ratio']:.2f} | {r['wall_s']:.1f} | {q_ops} |")
    speech = rows[0]["scores"][16000]["speech_fraction"]
    lines += ["", f"The float model calls {speech:.1%} of the 16 kHz frames speech."]
    table.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
