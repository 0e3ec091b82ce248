#!/usr/bin/env python
"""Cost of mixed precision: ``--probes full`` vs ``fast`` vs onnxruntime ``quantize_static``, side by side.

Per model, in one run and each in a fresh process (``OPENBLAS_NUM_THREADS`` as the caller has it):
``cet-onnx quantize --avg-bits X --no-cache --device cpu`` with ``--probes full`` and ``--probes fast``,
and ``tools/ort_quantize.py`` (INT8 QDQ ``quantize_static``, MinMax) on the same model and calibration
file. Recorded: wall time, the ratio to ``quantize_static``, forward passes (all of the allocation stage,
and of the sensitivities alone), the measured loss of the chosen assignment (``allocation.measured_loss``:
the loss of exactly the emitted weights on the probe samples) and the fidelity Spearman.

all-MiniLM-L6-v2 (``tools/minilm_data.py``: exported with ``torch.onnx.export``, needs torch and
transformers) runs the default command (dynamic activations, cosine loss, embedding tables included). PP-OCRv4 rec: ``full`` with default settings takes far longer than the rest together, so it runs at
``--probe-size 8`` and ``fast`` runs both at ``--probe-size 8`` (the loss comparison: same samples)
and at the defaults (the timing target). The 1-minute load average before each run is recorded: the
machine may be shared.

    python tools/probe_cost.py [--models digits,orientation,ocr,minilm]

Writes ``tools/results/probe_cost.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402
import bench_data  # noqa: E402

RESULTS = bench_data.RESULTS
WORK = Path(tempfile.mkdtemp(prefix="probe_cost_"))   # models, reports and calibration files of the runs
#: model → (calib samples, avg bits, runs: (label, extra cet-onnx arguments))
PLAN = {
    "digits": (256, 3.0, [("full", ["--probes", "full"]), ("fast", ["--probes", "fast"])]),
    "orientation": (128, 3.0, [("full", ["--probes", "full"]), ("fast", ["--probes", "fast"])]),
    "ocr": (32, 4.0, [("full @ probe-size 8", ["--probes", "full", "--probe-size", "8"]),
                      ("fast @ probe-size 8", ["--probes", "fast", "--probe-size", "8"]),
                      ("fast", ["--probes", "fast"])]),
    # the default command (dynamic activations, cosine loss, embedding tables included); full probes
    # (two-sided evaluations of every weight x format) take far longer and are not run
    "minilm": (128, 4.0, [("fast", ["--probes", "fast"])]),
}


def _calib(name: str, n: int) -> tuple[Path, Path]:
    """The model file and a calibration ``.npz`` of its first ``n`` samples."""
    if name == "minilm":   # three int64 inputs: tools/minilm_data.py writes the .npz itself
        import minilm_data
        info = minilm_data.build(bench_data.CACHE, n)
        return info["model"], info["calib"]
    d = bench_data.load(name, n, 40 if name == "ocr" else 100)
    return d.model, d.save_calib(WORK / f"{name}_calib_{n}.npz")


def measure(name: str) -> list[dict]:
    """Every run of one model (see :data:`PLAN`)."""
    n, avg, runs = PLAN[name]
    model, calib = _calib(name, n)
    rows = []
    load = os.getloadavg()[0]
    wall, out = bench_common.run_captured([sys.executable, "tools/ort_quantize.py", str(model), "-o", str(WORK / f"{name}.ort.onnx"),
                      "--calib", str(calib)])
    ort_wall = wall
    rows.append({"model": name, "run": "onnxruntime quantize_static (INT8)", "wall_s": round(wall, 1),
                 "load_before": load})
    for label, extra in runs:
        load = os.getloadavg()[0]
        cmd = [sys.executable, "-m", "cet_onnx.cli", "quantize", str(model), "-o", str(WORK / f"{name}.{extra[1]}.onnx"),
               "--calib", str(calib), "--avg-bits", f"{avg:g}", "--no-cache", "--device", "cpu", "--json", *extra]
        wall, out = bench_common.run_captured(cmd)
        rep = json.loads(out)
        a = rep["allocation"]
        rows.append({"model": name, "run": f"cet-onnx --avg-bits {avg:g} --probes {label}"
                     + (" --weight-only" if "--weight-only" in extra else ""), "wall_s": round(wall, 1),
                     "ratio_to_ort": round(wall / ort_wall, 1), "forward_passes": a["probe_runs"],
                     "sensitivity_passes": a.get("sensitivity_runs"), "probe_samples": a["probe_samples"],
                     "measured_loss": a["measured_loss"], "predicted_loss": a["predicted_loss"],
                     "spearman": a.get("fidelity", {}).get("spearman"), "avg_bits": rep["totals"]["avg_bits"],
                     "timings_s": rep["timings_s"], "load_before": load,
                     "command": " ".join(["cet-onnx", *cmd[3:]])})
    return rows


def table(rows: list[dict]) -> str:
    """The markdown table of all rows."""
    head = ("| model | run | wall s | × ORT | passes (sens.) | probe samples | measured loss | Spearman | "
            "hessians s | allocate s | load |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        t = r.get("timings_s", {})
        passes = str(r.get("forward_passes", ""))
        if r.get("sensitivity_passes"):
            passes += f" ({r['sensitivity_passes']})"
        loss = f"{r['measured_loss']:.4g}" if "measured_loss" in r else ""
        sp = "" if r.get("spearman") is None else f"{r['spearman']:.3f}"
        cells = [r["model"], r["run"], r["wall_s"], r.get("ratio_to_ort", ""), passes, r.get("probe_samples", ""),
                 loss, sp, t.get("hessians", ""), t.get("allocate", ""), f"{r['load_before']:.1f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(PLAN))
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    names = args.models.split(",")
    stamp = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
             "bench_command": "python tools/probe_cost.py --models " + args.models}
    rows = []
    for name in names:
        rows += [{**r, **stamp} for r in measure(name)]
        print(table([r for r in rows if r["model"] == name]), flush=True)
    # the models not measured now keep their rows (with the command, day and CPU that measured them)
    path = RESULTS / "probe_cost.json"
    kept = [r for r in json.loads(path.read_text()).get("rows", []) if r["model"] not in names] if path.exists() else []
    order = list(PLAN)
    rows = sorted(kept + rows, key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
    meta = {"cpus": os.cpu_count(), "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")}
    path.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    runs = sorted({(r.get("bench_command", "?"), r.get("measured", "?"), r.get("cpu", "?")) for r in rows
                   if "cpu" in r or "measured" in r})
    (RESULTS / "probe_cost.md").write_text(
        "# Mixed-precision cost: `--probes full` vs `fast` vs onnxruntime\n\n"
        f"On {meta['cpus']} CPUs; wall = the whole command in a fresh process; passes = forward passes of the "
        f"allocation stage (of the sensitivities alone in brackets); measured loss on the probe samples; "
        f"load = 1-minute load average before the run. Compare ratios to onnxruntime, which is measured "
        f"in the same run as each model's rows.\n\n"
        + "".join(f"- `{c}` on {d}, {cpu}\n" for c, d, cpu in runs) + "\n" + table(rows))


def cpu_name() -> str:
    """The CPU's model name and whether it has AVX-512 VNNI (it decides onnxruntime's integer and float kernels)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-512" if "avx512f" in flags else \
        "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa})"


if __name__ == "__main__":
    main()
