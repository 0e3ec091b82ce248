#!/usr/bin/env python
"""Deployed speed: FP32 vs onnxruntime's quantizers vs cet-onnx, latency side by side in one run.

For each model (``--models``, default ``digits,orientation,ocr,minilm``), every quantizer runs
once in a fresh process with its default settings:

* onnxruntime ``quantize_static`` (INT8 QDQ, MinMax, per channel, after ``quant_pre_process``),
  ``quantize_dynamic`` and ``MatMulNBitsQuantizer`` (4 bits) — ``tools/ort_quantize.py``;
* ``cet-onnx quantize M -o OUT --calib C`` (no budget), ``... --avg-bits 4`` and
  ``... --avg-bits 4 --max-latency-ratio 1.0`` (the same probes: one probe cache per model, as a
  user's second budget would reuse them). Where the measured latencies make that budget
  infeasible, cet-onnx's error line is recorded and the run it suggests (``--avg-bits X
  --max-latency-ratio 1.0``, the smallest size within the latency budget) is added. MiniLM also runs
  ``--avg-bits 4 --max-latency-ratio 0.6`` (the deployed-speed issue's transformer target).

Then every model's sessions are timed together: median of interleaved runs
(``bench_common.interleaved_latency``: the models take turns in blocks, order rotated) at batch
1 and batch 16 of evaluation samples, on 1 intra-op thread and on onnxruntime's default thread
count, CPU provider, ``ORT_ENABLE_ALL``. Quality on the evaluation set against the task metric
and FP32 (top-1 accuracy and agreement; CER and exact-line agreement for OCR; cosine of the
sentence embedding for MiniLM), file size with every byte the model needs, and the kernels
onnxruntime runs (``cet_onnx.kernels.inspect_kernels``: how many weights are still dequantized
on every run).

    python tools/latency_bench.py [--models digits,ocr] [--repeats 30] [--reuse]

Writes ``tools/results/latency_bench.md`` and ``.json``. ``--reuse`` keeps quantized models of an
earlier run found in ``tools/results/cache/latency_bench/`` (their recorded quantize timings are
kept; the latency is always measured again) and the earlier results of models not named in ``--models``. MiniLM needs torch and transformers (the export).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402
from cet_onnx.kernels import FAST_KERNELS, inspect_kernels  # noqa: E402

ROOT = common.ROOT
RESULTS = ROOT / "tools" / "results"
WORK = RESULTS / "cache" / "latency_bench"
CET = [sys.executable, "-c", "from cet_onnx.cli import main; main()"]
SETTINGS = [(1, 1), (1, 0), (16, 1), (16, 0)]   # (batch, intra-op threads; 0 = onnxruntime's default)
MODELS = ("digits", "orientation", "ocr", "minilm")
CET_RUNS = {"cet-default": [], "cet-avg4": ["--avg-bits", "4"],
            "cet-avg4-lat1.0": ["--avg-bits", "4", "--max-latency-ratio", "1.0"]}
#: the deployed-speed issue's transformer target: batch-1 latency at most 0.6x FP32 at --avg-bits 4
MODEL_RUNS = {"minilm": {"cet-avg4-lat0.6": ["--avg-bits", "4", "--max-latency-ratio", "0.6"]}}


def log(msg: str) -> None:
    print(f"[latency_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data

class Data:
    """A model with its calibration file, evaluation feeds and task metric."""

    def __init__(self, name: str, work: Path):
        self.name = name
        if name == "minilm":
            import minilm_data
            info = minilm_data.build(minilm_data.DEFAULT_CACHE)
            self.model, self.calib = Path(info["model"]), Path(info["calib"])
            self.eval = dict(np.load(info["eval"]))
            self.metric, self.spec = "cosine", None
        else:
            import bench_data
            self.spec = bench_data.load(name)
            self.model, self.metric = Path(self.spec.model), self.spec.metric
            self.calib = self.spec.save_calib(work / "calib.npz")
            self.eval = {self.spec.input: self.spec.x_eval}

    def feed(self, batch: int) -> dict[str, np.ndarray]:
        return {k: v[:batch] for k, v in self.eval.items()}

    def outputs(self, path: Path):
        """What the metric compares: logits, decoded OCR strings, or sentence embeddings."""
        sess = common.session(path)
        n = len(next(iter(self.eval.values())))
        first = np.concatenate([sess.run(None, {k: v[i:i + 32] for k, v in self.eval.items()})[0]
                                for i in range(0, n, 32)])
        if self.metric == "cer":
            import ocr_data
            return ocr_data.ctc_greedy_decode(first, self.spec.extra["chars"])
        return first

    def quality(self, out, ref) -> dict[str, float]:
        if self.metric == "accuracy":
            return {"accuracy": common.accuracy(out, self.spec.labels), "agreement": common.top1_agreement(ref, out)}
        if self.metric == "cer":
            import ocr_data
            return {"cer": ocr_data.cer(out, self.spec.texts),
                    "agreement": float(np.mean([a == b for a, b in zip(out, ref)]))}
        import transformer_bench
        return transformer_bench.scores(ref, out)


# --------------------------------------------------------------------------- quantize runs

def commands(d: Data, work: Path) -> dict[str, list[str]]:
    """label → the command that writes ``work/<label>.onnx``."""
    ort_tool = [sys.executable, str(ROOT / "tools" / "ort_quantize.py"), str(d.model)]
    cmds = {"ort-static": [*ort_tool, "-o", str(work / "ort-static.onnx"), "--calib", str(d.calib)],
            "ort-dynamic": [*ort_tool, "-o", str(work / "ort-dynamic.onnx"), "--mode", "dynamic"],
            "ort-nbits4": [*ort_tool, "-o", str(work / "ort-nbits4.onnx"), "--mode", "nbits"]}
    for label, extra in {**CET_RUNS, **MODEL_RUNS.get(d.name, {})}.items():
        cmds[label] = [*CET, "quantize", str(d.model), "-o", str(work / f"{label}.onnx"), "--calib", str(d.calib),
                       *extra, "--json"]
    return cmds


def shown(cmd: list[str]) -> str:
    """The command as a user types it (``cet-onnx`` / ``python tools/...``, paths relative to the repository)."""
    words = ["cet-onnx", *cmd[3:]] if cmd[:3] == CET else ["python", *cmd[1:]]
    return shlex.join(common.rel(Path(w)) if w.startswith("/") else w for w in words)


def quantize(label: str, cmd: list[str], work: Path, reuse: bool) -> dict:
    """Run one quantizer (or reuse its earlier run); the row's quantize fields, or its error."""
    out, meta = work / f"{label}.onnx", work / f"{label}.run.json"
    if reuse and out.exists() and meta.exists():
        return json.loads(meta.read_text())
    log(f"{work.name}/{label}: {shown(cmd)}")
    row: dict = {"command": shown(cmd)}
    try:
        row["quantize"] = common.run_measured(cmd, work / f"{label}.log")
    except RuntimeError:
        lines = (work / f"{label}.log").read_text(errors="replace").splitlines()
        row["error"] = next((ln for ln in reversed(lines) if ln.startswith("error")), lines[-1] if lines else "")
        log(f"  failed: {row['error']}")
        out.unlink(missing_ok=True)
    if label.startswith("cet") and "error" not in row:
        rep = json.loads(common.report_path(out).read_text())
        a = rep.get("allocation") or {}
        row["cet"] = {"avg_bits": rep["totals"]["avg_bits"], "weight_compression": rep["totals"]["weight_compression"],
                      "activation_mode": rep.get("activation_mode"), "latency": rep.get("latency"),
                      "latency_budget": {k: v for k, v in (a.get("latency_budget") or {}).items() if k != "per_weight"},
                      "formats": _formats(rep)}
    meta.write_text(json.dumps(row, indent=1, default=common.json_default))
    return row


def _formats(rep: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for w in rep["weights"]:
        counts[w["format"]] = counts.get(w["format"], 0) + 1
    return counts


# --------------------------------------------------------------------------- measurements

def kernels(path: Path) -> dict:
    k = inspect_kernels(path, common.CPU).as_dict()
    return {"fast": {op: n for op, n in k["ops"].items() if op in FAST_KERNELS}, "dequantized": len(k["dequantized_at_run_time"])}


def latencies(paths: dict[str, Path], d: Data, repeats: int) -> dict[str, dict[str, dict]]:
    """label → setting ("b1 t1", ...) → interleaved latency of all of the model's sessions together."""
    out: dict[str, dict[str, dict]] = {label: {} for label in paths}
    for batch, threads in SETTINGS:
        key = f"b{batch} t{threads or 'all'}"
        log(f"{d.name}: latency {key}")
        sessions = {label: common.session(p, threads) for label, p in paths.items()}
        lat = common.interleaved_latency(sessions, None, d.feed(batch), repeats)
        for label, v in lat.items():
            out[label][key] = {**v, "ratio": v["median_ms"] / lat["fp32"]["median_ms"]}
    return out


def bench(name: str, repeats: int, reuse: bool) -> dict:
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    d = Data(name, work)
    os.environ["CET_ONNX_CACHE"] = str(work / "probe-cache")
    if not reuse:
        shutil.rmtree(work / "probe-cache", ignore_errors=True)
    rows = {"fp32": {"command": common.rel(d.model)}}
    for label, cmd in commands(d, work).items():
        rows[label] = quantize(label, cmd, work, reuse)
    hint = re.search(r"ask for --avg-bits ([0-9.]+)", rows["cet-avg4-lat1.0"].get("error", ""))
    if hint:   # what the error tells a user to do: the smallest size the latency budget allows
        label = "cet-lat1.0-smallest"
        cmd = [*CET, "quantize", str(d.model), "-o", str(work / f"{label}.onnx"), "--calib", str(d.calib),
               "--avg-bits", hint.group(1), "--max-latency-ratio", "1.0", "--json"]
        rows[label] = quantize(label, cmd, work, reuse)
    paths = {label: (d.model if label == "fp32" else work / f"{label}.onnx") for label, r in rows.items()
             if "error" not in r}
    ref = d.outputs(d.model)
    fp32_bytes = common.model_file_bytes(d.model)
    for label, p in paths.items():
        r = rows[label]
        r["bytes"] = common.model_file_bytes(p)
        r["compression"] = fp32_bytes / r["bytes"]
        r["quality"] = d.quality(d.outputs(p), ref)
        r["kernels"] = kernels(p)
    for label, lat in latencies(paths, d, repeats).items():
        rows[label]["latency"] = lat
    return {"model": common.rel(d.model), "metric": d.metric, "rows": rows}


# --------------------------------------------------------------------------- report

def _quality(metric: str, q: dict) -> str:
    if metric == "accuracy":
        return f"{100 * q['accuracy']:.2f} % | {100 * q['agreement']:.1f} %"
    if metric == "cer":
        return f"{100 * q['cer']:.2f} % | {100 * q['agreement']:.1f} %"
    return f"{q['mean_cosine']:.4f} | {100 * q['retrieval_agreement']:.1f} %"


_QUALITY_HEAD = {"accuracy": "top-1 accuracy | top-1 agreement", "cer": "CER | exact-line agreement",
                 "cosine": "mean cosine to FP32 | retrieval agreement"}


def table(name: str, r: dict) -> list[str]:
    keys = [f"b{b} t{t or 'all'}" for b, t in SETTINGS]
    lines = [f"## {name}", "", f"`{r['model']}`", "",
             f"| run | file MB | × smaller | {_QUALITY_HEAD[r['metric']]} | "
             + " | ".join(f"{k} ms (× FP32)" for k in keys) + " | fast kernels | weights dequantized per run | quantize s |",
             "|---" * (8 + len(keys)) + "|"]
    for label, row in r["rows"].items():
        if "error" in row:
            lines.append(f"| {label} | — | — | — | — | " + " | ".join("—" for _ in keys)
                         + f" | — | — | {row['error']} |")
            continue
        lat = " | ".join(f"{row['latency'][k]['median_ms']:.3g} ({row['latency'][k]['ratio']:.2f})" for k in keys)
        fast = ", ".join(f"{op} {n}" for op, n in row["kernels"]["fast"].items()) or "—"
        q = row.get("quantize", {}).get("wall_s", "")
        lines.append(f"| {label} | {row['bytes'] / 1e6:.3g} | {row['compression']:.2f} | "
                     f"{_quality(r['metric'], row['quality'])} | {lat} | {fast} | {row['kernels']['dequantized']} | {q} |")
    cmds = [f"- `{label}`: `{row['command']}`" for label, row in r["rows"].items() if label != "fp32"]
    return lines + ["", "Commands:", *cmds, ""]


def findings(results: dict) -> list[str]:
    """The acceptance checks of issue 13, read off the measured rows (batch 1, onnxruntime's default threads)."""
    out = []
    key = "b1 tall"
    for name, r in results.items():
        rows = r["rows"]
        avg4, lat = rows.get("cet-avg4", {}), rows.get("cet-avg4-lat1.0", {})
        if "error" in lat:
            out.append(f"- {name}: `--avg-bits 4 --max-latency-ratio 1.0`: {lat['error']}")
            lat = rows.get("cet-lat1.0-smallest", {})
        if "latency" in avg4:
            s = f"- {name}: `--avg-bits 4` runs at {avg4['latency'][key]['ratio']:.2f}× FP32 ({key})"
            if "latency" in rows.get("ort-dynamic", {}):
                s += f", onnxruntime `quantize_dynamic` at {rows['ort-dynamic']['latency'][key]['ratio']:.2f}×"
            out.append(s + ".")
        if "latency" in lat and "bytes" in avg4:
            out.append(f"- {name}: `{lat['command'].split(' --calib ')[1].split(' ', 1)[1].removesuffix(' --json')}` "
                       f"runs at {lat['latency'][key]['ratio']:.2f}× FP32 ({key}) and is "
                       f"{lat['bytes'] / avg4['bytes']:.2f}× the file size of `--avg-bits 4` alone.")
    return out


def write(results: dict, repeats: int) -> str:
    md = ["# Deployed latency: FP32 vs onnxruntime's quantizers vs cet-onnx", "",
          f"`python tools/latency_bench.py` on {common.cpu_name()} ({os.cpu_count()} logical CPUs), onnxruntime "
          f"{__import__('onnxruntime').__version__}, CPU provider, ORT_ENABLE_ALL. Latency: median of {repeats} "
          "interleaved runs per model and setting (all of one model's files taking turns), batch 1 / 16 evaluation "
          "samples, 1 intra-op thread (t1) or onnxruntime's default (tall). Quality on the evaluation set against "
          "the task labels and FP32. One quantize run each, default settings, in a fresh process.", "",
          "Findings (batch 1, default threads):", "", *findings(results), ""]
    for name, r in results.items():
        md += table(name, r)
    text = "\n".join(md)
    (RESULTS / "latency_bench.md").write_text(text)
    (RESULTS / "latency_bench.json").write_text(json.dumps(results, indent=1, default=common.json_default))
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--reuse", action="store_true", help="keep the quantized models of an earlier run")
    args = ap.parse_args()
    common.quiet()
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    earlier = RESULTS / "latency_bench.json"
    results = json.loads(earlier.read_text()) if args.reuse and earlier.exists() else {}   # other models kept
    for name in names:
        results[name] = bench(name, args.repeats, args.reuse)
        write(results, args.repeats)
    print(write(results, args.repeats))


if __name__ == "__main__":
    main()
