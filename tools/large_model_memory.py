"""Peak memory of ``cet-onnx quantize`` on a synthetic model over 2 GB, against onnxruntime running it.

Builds the model with ``tools/make_large_model.py`` (an MLP of 8192 × 8192 MatMuls, float32
weights in external data), then runs each configuration in a fresh process and reads that
process's peak RSS (``ru_maxrss`` from ``os.wait4``):

* ``ort-run`` (baseline): an onnxruntime session on the float model, one batch of 16 — what
  merely serving the model costs;
* ``int8``: the default command, ``cet-onnx quantize M -o Q --calib calib.npz`` (INT8 per
  channel, 8-bit activations, round-to-nearest, verification on held-out samples);
* ``int4``: ``--weight-bits 4 --block-size 32`` (major-axis rounding: layer Hessians are
  collected in chunks of at most 1 GiB);
* ``mixed``: ``--avg-bits 3`` with default probe settings (every weight quantized in the six
  candidate formats, codes kept on disk; layer Hessians collected and dropped one chunk at a
  time; probes, exact solve, closed loop, fidelity check).

    python tools/large_model_memory.py [--gb 2.5] [--configs ort-run,int8,int4,mixed] [--dir DIR]
                                       [--out tools/results/large_model] [--max-ratio 2.0]

``--max-ratio R`` exits with status 1 when a cet-onnx run's peak RSS exceeds R × the weight
bytes (CI runs the int8, int4 and mixed configurations with R = 2).

Writes ``OUT.md`` and ``OUT.json``. The model (and outputs) go to ``--dir`` or a temporary
folder removed at the end; the disk needs about 2 × the model size.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from bench_common import model_file_bytes, report_path, run_measured
from bench_data import RESULTS
from make_large_model import write_model

ORT_RUN = """
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])["input"][:16]
print(s.run(None, {"input": x})[0].shape)
"""

CONFIGS = {
    "int8": [],
    "int4": ["--weight-bits", "4", "--block-size", "32"],
    "mixed": ["--avg-bits", "3"],
}


def measure(folder: Path, configs: list[str], gb: float) -> dict:
    model_path = folder / "model.onnx"
    calib = folder / "calib.npz"
    meta = folder / "meta.json"
    if model_path.exists() and meta.exists() and json.loads(meta.read_text()).get("gb") == gb:
        weight_bytes = json.loads(meta.read_text())["weight_bytes"]
        print(f"reusing {model_path}")
    else:
        print(f"writing a {gb} GB model to {folder} ...", flush=True)
        model_path, calib, weight_bytes = write_model(folder, gb)
        meta.write_text(json.dumps({"gb": gb, "weight_bytes": weight_bytes}))
    rows = []
    for name in configs:
        log = folder / f"{name}.log"
        if name == "ort-run":
            cmd = [sys.executable, "-c", ORT_RUN, str(model_path), str(calib)]
            out = None
        else:
            out = folder / f"q_{name}.onnx"
            cmd = [sys.executable, "-m", "cet_onnx.cli", "quantize", str(model_path), "-o", str(out),
                   "--calib", str(calib), "--device", "cpu", "--no-cache", *CONFIGS[name]]
        print(f"{name}: {' '.join(cmd[2:]) if name != 'ort-run' else 'onnxruntime session + one batch'}", flush=True)
        res = run_measured(cmd, log)
        row = {"config": name, "args": CONFIGS.get(name, []), **res,
               "peak_rss_over_weight_bytes": round(res["peak_rss_mb"] * 1e6 / weight_bytes, 3)}
        if out is not None:
            report = json.loads(report_path(out).read_text())
            row.update({"file_bytes": model_file_bytes(out), "avg_bits": report["totals"]["avg_bits"],
                        "min_sqnr_db": report["verification"]["min_sqnr_db"],
                        "top1_agreement": report["verification"]["min_top1_agreement"],
                        "stages_s": report["timings_s"], "stages_peak_rss_mb": report.get("peak_rss_mb")})
            for p in out.parent.glob(f"{out.stem}*"):
                p.unlink()
        rows.append(row)
        print(f"  peak RSS {res['peak_rss_mb']:.0f} MB = {row['peak_rss_over_weight_bytes']:.2f} x weight bytes, "
              f"{res['wall_s']:.0f} s", flush=True)
    base = next((r for r in rows if r["config"] == "ort-run"), None)
    for r in rows:
        r["peak_rss_over_ort_run"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 3) if base else None
    return {"weight_bytes": weight_bytes, "model_gb": gb, "machine": f"{platform.machine()}, "
            f"{__import__('os').cpu_count()} cores", "rows": rows}


def write_md(result: dict, path: Path) -> None:
    lines = [f"# Peak memory on a {result['weight_bytes'] / 1e9:.2f} GB model (float32 weights in external data)",
             "", "`python tools/large_model_memory.py` — each row a fresh process, peak RSS = its `ru_maxrss`.",
             f"Machine: {result['machine']}.", "",
             "| run | peak RSS MB | × weight bytes | × onnxruntime run | wall s | output bytes | avg bits | SQNR dB | top-1 agr. |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        name = r["config"] if r["config"] == "ort-run" else f"cet-onnx {r['config']} {' '.join(r['args'])}".strip()
        fmt = lambda k, f: "" if r.get(k) is None else format(r[k], f)  # noqa: E731
        lines.append(f"| {name} | {r['peak_rss_mb']:.0f} | {r['peak_rss_over_weight_bytes']:.2f} | "
                     f"{fmt('peak_rss_over_ort_run', '.2f')} | {r['wall_s']:.0f} | {fmt('file_bytes', ',')} | "
                     f"{fmt('avg_bits', '.2f')} | {fmt('min_sqnr_db', '.2f')} | {fmt('top1_agreement', '.4f')} |")
    stages = [(r, r.get("stages_peak_rss_mb")) for r in result["rows"] if r.get("stages_peak_rss_mb")]
    if stages:
        lines += ["", "Running peak RSS (MB, × weight bytes) at the end of each stage (the report's `peak_rss_mb`):", ""]
        for r, peaks in stages:
            per = ", ".join(f"{k} {v:.0f} ({v * 1e6 / result['weight_bytes']:.2f}×)" for k, v in peaks.items())
            lines.append(f"- {r['config']}: {per}")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.5)
    ap.add_argument("--configs", default="ort-run,int8,int4")
    ap.add_argument("--dir", type=Path, help="folder for the model and outputs (kept); default: a temporary one")
    ap.add_argument("--out", type=Path, default=RESULTS / "large_model")
    ap.add_argument("--max-ratio", type=float, help="fail when a cet-onnx run's peak RSS exceeds this × weight bytes")
    ap.add_argument("--min-sqnr", type=float, help="fail when a cet-onnx run's output SQNR (dB, held-out samples) is "
                                                   "below this: a destroyed model passes no memory check")
    args = ap.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c != "ort-run" and c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from ort-run, {', '.join(CONFIGS)}")
    folder = args.dir or Path(tempfile.mkdtemp(prefix="cet-large-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(folder, configs, args.gb)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_md(result, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())
    failures = []
    for r in result["rows"]:
        if r["config"] == "ort-run":
            continue
        if args.max_ratio is not None and r["peak_rss_over_weight_bytes"] > args.max_ratio:
            failures.append(f"{r['config']}: peak RSS {r['peak_rss_over_weight_bytes']:.2f} x weight bytes "
                            f"> --max-ratio {args.max_ratio}")
        if args.min_sqnr is not None and not r["min_sqnr_db"] >= args.min_sqnr:
            failures.append(f"{r['config']}: output SQNR {r['min_sqnr_db']} dB < --min-sqnr {args.min_sqnr}")
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
