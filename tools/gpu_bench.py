"""Probe throughput on CPU and on CUDA with the same settings: ``cet-onnx analyze`` per model and device.

    python tools/gpu_bench.py [--devices cpu,cuda] [--out PREFIX] [--large-gb 0.1] [--large-width 2048]

Models: the bundled digits CNN, and a synthetic MLP written by ``tools/make_large_model.py``
(``--large-gb`` of float32 weights in layers of ``--large-width``², so the GPU has work; 0 skips it).
Every run is a fresh ``cet-onnx analyze`` process with ``--no-cache`` (the probes really run),
round-to-nearest candidates (``--rounding rtn``: the time is the probes', not major-axis rounding's)
and no fidelity check. The table: model, device, probe forward passes, passes/s, probe s, wall s
(the whole process), and for CUDA the ratio of its passes/s to CPU's. Written to stdout and, with
``--out``, to ``PREFIX.md`` and ``PREFIX.json``. Exits 1 when a run fails or a ``cuda`` run's
probes did not run on CUDA.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def cli() -> list[str]:
    """The ``cet-onnx`` of this interpreter's environment (the installed package), else ``-m cet_onnx.cli``."""
    script = Path(sys.executable).with_name("cet-onnx")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cet_onnx.cli"]


def run_analyze(model: Path, calib: Path, device: str, probe_size: int, out_dir: Path) -> dict:
    prefix = out_dir / f"{model.parent.name}.{device}"
    cmd = cli() + ["analyze", str(model), "--calib", str(calib), "--device", device, "--probe-size", str(probe_size),
                   "--rounding", "rtn", "--fidelity-samples", "0", "--no-cache", "-q", "--json", "-o", str(prefix)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"gpu_bench: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    r = json.loads(proc.stdout)
    return {"device_asked": device, "device": r["device"], "probe_runs": r["probe_runs"],
            "probe_seconds": r["probe_seconds"], "passes_per_s": r["forward_passes_per_second"],
            "wall_s": round(wall, 2), "probe_samples": r["probe_samples"]}


def table(rows: list[dict]) -> str:
    lines = ["| model | device | probe samples | probe forward passes | passes/s | probe s | wall s | CUDA/CPU passes/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['model']} | {r['device']} | {r['probe_samples']} | {r['probe_runs']} | "
                     f"{r['passes_per_s']} | {r['probe_seconds']} | {r['wall_s']} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--probe-size", type=int, default=64)
    ap.add_argument("--large-gb", type=float, default=0.1)
    ap.add_argument("--large-width", type=int, default=2048)
    ap.add_argument("--out", default=None, metavar="PREFIX")
    args = ap.parse_args()
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    with tempfile.TemporaryDirectory(prefix="cet-gpu-bench-") as tmp:
        tmp = Path(tmp)
        models = [("digits", ROOT / "models" / "digits" / "model.onnx", ROOT / "models" / "digits" / "calib.npz")]
        if args.large_gb > 0:
            from make_large_model import write_model
            model, calib, nbytes = write_model(tmp / "mlp", args.large_gb, args.large_width,
                                                samples=2 * args.probe_size)  # a quarter is held out
            models.append((f"mlp {nbytes / 1e6:.0f} MB w{args.large_width}", model, calib))
        rows = []
        for name, model, calib in models:
            base = None
            for device in devices:
                r = {"model": name, **run_analyze(model, calib, device, args.probe_size, tmp)}
                if device == "cuda" and r["device"] != "cuda":
                    print(table(rows + [r]))
                    print(f"gpu_bench: --device cuda probes ran on {r['device']}", file=sys.stderr)
                    return 1
                if device == "cpu":
                    base = r
                r["ratio"] = (r["passes_per_s"] / base["passes_per_s"]) if device != "cpu" and base else None
                rows.append(r)
                print(f"{name} on {r['device']}: {r['probe_runs']} passes, {r['passes_per_s']}/s, wall {r['wall_s']} s",
                      file=sys.stderr)
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text + "\n")
        Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
