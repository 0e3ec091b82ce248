"""Activation precision per tensor (``--act-precision``) on the real benchmark models, side by side with the peers.

For each model of ``tools/bench_data.py`` (``digits``, ``orientation``, ``ocr``, ``magika``), default settings,
in one run:

* cet-onnx's default command (``--act-mode auto``: static activations for a CNN, dynamic for a graph with
  attention or LayerNorm; in static mode ``--act-precision auto``);
* cet-onnx ``--act-mode static`` (``--act-precision auto``: uniform 8-bit activations when the written model
  meets the target on the probe samples, else 8-bit / 16-bit / float per tensor by probes and an exact solve);
* cet-onnx ``--act-mode static --act-precision uniform`` (every planned activation at 8 bits: W8A8 as before);
* cet-onnx ``--act-mode static --act-precision solve`` (per tensor even where uniform meets the target);
* cet-onnx ``--act-mode static --int8-full-range`` (±127 weight codes: for servers whose CPU has VNNI);
* onnxruntime ``quantize_static`` (QDQ, per-channel, MinMax), the same with only Conv / MatMul / Gemm
  quantized, and ``quantize_dynamic``; a peer that fails on a model is a row with its error.

Scored on the held-out evaluation set: the task metric (top-1 accuracy, or CER of greedy CTC decoding),
agreement with FP32 (top-1, or exact strings), file size, batch-1 latency against FP32 (median of interleaved
runs, one process), and each quantizer's wall time (cet-onnx in a fresh process with ``--no-cache``).

    python tools/act_precision_bench.py [--models digits,orientation,ocr,magika] [--out tools/results/act_precision]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import bench
import bench_common as common
import bench_data
import ort_quantize

STATIC = ["--act-mode", "static"]
RUNS = {"cet-onnx default": [], "cet-onnx --act-mode static": STATIC,
        "cet-onnx --act-mode static --act-precision uniform": STATIC + ["--act-precision", "uniform"],
        "cet-onnx --act-mode static --act-precision solve": STATIC + ["--act-precision", "solve"],
        "cet-onnx --act-mode static --int8-full-range": STATIC + ["--int8-full-range"]}
PEERS = {"onnxruntime quantize_static": lambda m, o, c: ort_quantize.quantize(m, o, c),
         "onnxruntime quantize_static (Conv/MatMul only)":
             lambda m, o, c: ort_quantize.quantize(m, o, c, op_types=["Conv", "MatMul", "Gemm"]),
         "onnxruntime quantize_dynamic": lambda m, o, c: ort_quantize.quantize_dynamic(m, o)}


def run_model(name: str, work: Path) -> dict:
    spec = bench_data.load(name)
    calib = spec.save_calib(work / f"{name}_calib.npz")
    paths = {"fp32": Path(spec.model)}
    walls, plans, failed = {}, {}, {}
    for label, extra in RUNS.items():
        out = work / f"{name}_{len(paths)}.onnx"
        cmd = [sys.executable, "-m", "cet_onnx.cli", "quantize", str(spec.model), "-o", str(out), "--calib", str(calib),
               "--no-cache", "--quiet", *extra]
        walls[label] = common.run_measured(cmd, work / f"{name}_{len(paths)}.log")["wall_s"]
        report = json.loads(out.with_name(out.stem + ".report.json").read_text())
        plan = report.get("activation_precision") or {}
        plans[label] = {"mode": report["activation_mode"]["mode"],
                        **{k: plan.get(k) for k in ("precision", "why", "counts", "met", "met_weights_level")}}
        paths[label] = out
    for label, fn in PEERS.items():
        out = work / f"{name}_ort_{len(paths) + len(failed)}.onnx"
        t0 = time.perf_counter()
        try:
            fn(spec.model, out, calib)
        except Exception as exc:  # a peer that cannot quantize this model is a result, not a crash
            failed[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        walls[label] = round(time.perf_counter() - t0, 3)
        paths[label] = out
    outs = {k: bench.evaluate(p, spec) for k, p in paths.items()}
    sessions = {k: common.session(p) for k, p in paths.items()}
    lat = common.interleaved_latency(sessions, spec.input, spec.x_eval[:1], repeats=200)
    rows = []
    for k, p in paths.items():
        m = bench.metrics(outs[k], outs["fp32"], spec)
        rows.append({"run": k, "metric": m["metric"], "agreement": m["agreement"],
                     "file_bytes": common.model_file_bytes(p), "latency_ratio": lat[k]["median_ms"] / lat["fp32"]["median_ms"],
                     "latency_ms": lat[k]["median_ms"], "quantize_s": walls.get(k), "plan": plans.get(k)})
    rows += [{"run": k, "failed": why} for k, why in failed.items()]
    return {"model": name, "metric": spec.metric, "eval_samples": int(len(spec.x_eval)),
            "calib_samples": int(len(spec.calib)), "rows": rows}


def table(r: dict) -> list[str]:
    metric = "top-1 accuracy" if r["metric"] == "accuracy" else "CER"
    lines = [f"### {r['model']} ({r['eval_samples']} held-out samples, {r['calib_samples']} to calibrate)", "",
             f"| run | {metric} | agreement with FP32 | file × smaller | latency × FP32 (batch 1) | wall s | activations |",
             "|---|---|---|---|---|---|---|"]
    fp32 = next(x for x in r["rows"] if x["run"] == "fp32")["file_bytes"]
    for x in r["rows"]:
        if "failed" in x:
            lines.append(f"| {x['run']} | failed: {x['failed']} | | | | | |")
            continue
        acts = _activations(x["plan"] or {})
        wall = "" if x["quantize_s"] is None else f"{x['quantize_s']:.1f}"
        lines.append(f"| {x['run']} | {100 * x['metric']:.2f} % | {100 * x['agreement']:.1f} % | "
                     f"{fp32 / x['file_bytes']:.2f} | {x['latency_ratio']:.2f} | {wall} | {acts} |")
    return lines + [""]


def _activations(plan: dict) -> str:
    """The activation column: the mode, and for static mode the precision plan."""
    if not plan or plan.get("mode") != "static":
        return plan.get("mode", "")
    weights = " (the weights alone miss the target: held to their level)" if plan.get("met_weights_level") else ""
    if plan.get("precision") in (None, "uniform"):
        return "static, uniform 8-bit" + weights
    missed = "" if plan.get("met") or weights else " (target missed)"
    return "static, {int8} int8, {int16} int16, {float} float".format(**plan["counts"]) + missed + weights


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(bench_data.ALL_MODELS))
    ap.add_argument("--out", type=Path, default=bench_data.RESULTS / "act_precision")
    ap.add_argument("--work", type=Path, default=bench_data.CACHE / "act_precision")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    results = [run_model(m, a.work) for m in a.models.split(",")]
    head = [f"# Activation precision per tensor (`python tools/act_precision_bench.py --models {a.models}`)", "",
            f"cet-onnx {common.CET_VERSION}, onnxruntime {common.ort.__version__}, {common.cpu_name()}, "
            f"{time.strftime('%Y-%m-%d')}.", ""]
    a.out.with_suffix(".md").write_text("\n".join(head + [ln for r in results for ln in table(r)]))
    a.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=common.json_default))
    print("\n".join(head + [ln for r in results for ln in table(r)]))


if __name__ == "__main__":
    main()
