#!/usr/bin/env python
"""Real-model benchmark: FP32, onnxruntime INT8 and cet-onnx (uniform, hawq, cet), side by side, in one run.

Per model, on calibration samples and disjoint held-out evaluation samples:

* ``fp32``: the model as shipped.
* ``ort-minmax`` / ``ort-entropy``: onnxruntime ``quant_pre_process`` + ``quantize_static`` (QDQ,
  per-channel, activations QUInt8, weights QInt8, MinMax or Entropy calibration), the recipe of
  ``tools/baseline_ort.py``, run by ``tools/ort_quantize.py``.
* ``cet-w8`` / ``cet-w4`` / ``cet-w2``: ``cet-onnx quantize --weight-bits 8`` (per channel),
  ``--weight-bits 4 --block-size 32``, ``--weight-bits 2 --block-size 32``.
* ``hawq@X`` / ``cet@X``: ``cet-onnx quantize --allocator hawq|cet --avg-bits X`` for X = 4, 3, 2.5.
* diagnostics (not in ``--quick``): ``cet-w4-wo`` / ``cet@3-wo``, the same as ``cet-w4`` / ``cet@3``
  with ``--weight-only`` (activations left in float), to separate the weight error from the
  8-bit activation error.

Everything else is cet-onnx's default (major-axis rounding, MSE clipping and asymmetric grids at
4 bits and below; candidate formats 2/4/8 bits per channel or in blocks of 32), except
``--device cpu``, ``--verify-size 0`` (nothing held back: cet-onnx calibrates on exactly the
samples onnxruntime gets; evaluation is done here, on separate data), ``--batch-size``,
``--probe-size`` and ``--fidelity-samples`` (recorded in the output).

Quantize time and peak memory: every onnxruntime run, every uniform cet-onnx run and the
``@3``-bit hawq and cet runs (``--quick``: every run) are made in a fresh subprocess
(``python -m cet_onnx.cli quantize ...`` / ``python tools/ort_quantize.py ...``, started with
``subprocess.Popen`` and reaped with ``os.wait4``): the wall time includes interpreter start-up
and imports, the peak RSS is that child's ``ru_maxrss``. The other budgets are quantized
in-process with ``cet_onnx.pipeline.quantize(..., prepared=...)`` on one shared
``prepare(..., mixed=True)`` (calibration and layer Hessians done once) and with the probe results
the subprocess runs left in a fresh, run-local probe cache: their time is the incremental cost of
one more budget, and they have no peak-RSS figure.

Metrics: task metric (digits / orientation: top-1 accuracy vs labels; ocr: character error rate
vs the rendered text), agreement with FP32 (top-1, or for ocr exact decoded-string equality),
file bytes, weight compression (FP32 weight bytes / emitted weight bytes with scales and zero
points; cet-onnx: its report's ``totals``; onnxruntime: counted from the weight initializers of
the file, and the same count is made on every cet-onnx file as a cross-check), median latency of
``session.run`` at batch 1 on the CPU (onnxruntime ORT_ENABLE_ALL, intra_op_num_threads=1, the
same SessionOptions for every model, runs of all models interleaved).

    python tools/bench.py [--models digits,orientation,ocr] [--quick] [--out tools/results/bench]

Writes ``OUT.md``, ``OUT.json``, ``OUT.png`` and ``OUT_readme_snippet.md`` (default OUT:
``tools/results/bench``, with ``--quick`` ``tools/results/bench_quick``). Third-party models are
fetched with pip into ``tools/results/cache/`` (git-ignored). Exits non-zero on any error.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _blas_threads_arg(argv: list[str]) -> str:
    """``--blas-threads`` (default 1), read before numpy is imported: OpenBLAS reads its thread count at load."""
    val = "1"
    for i, a in enumerate(argv):
        if a == "--blas-threads" and i + 1 < len(argv):
            val = argv[i + 1]
        elif a.startswith("--blas-threads="):
            val = a.split("=", 1)[1]
    return val


BLAS_THREADS = _blas_threads_arg(sys.argv[1:])
if BLAS_THREADS.isdigit() and int(BLAS_THREADS) > 0:
    # inherited by every subprocess too; onnxruntime's own thread pools are not affected
    for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = BLAS_THREADS

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import bench_common as common  # noqa: E402  (cet-onnx's API, sessions, interleaved latency, subprocess runs)
import bench_data  # noqa: E402  (the models and their data)
from bench_common import ROOT, rel as _rel  # noqa: E402
from bench_data import CACHE, MODELS, RESULTS  # noqa: E402

BUDGETS = (4.0, 3.0, 2.5)
REPRESENTATIVE = 3.0          # the budget whose hawq / cet runs are timed in a fresh subprocess
BLOCK = 32                    # block size of the uniform 4- and 2-bit runs

#: samples and probe effort per mode and model (recorded in the output)
SETTINGS = {
    "full": {
        "digits": dict(calib_n=256, eval_n=500, batch=16, probe_size=128, fidelity_samples=12, repeats=100),
        "orientation": dict(calib_n=128, eval_n=400, batch=16, probe_size=16, fidelity_samples=8, repeats=100),
        "ocr": dict(calib_n=32, eval_n=150, batch=16, probe_size=4, fidelity_samples=4, repeats=30),
    },
    "quick": {
        "digits": dict(calib_n=128, eval_n=500, batch=16, probe_size=32, fidelity_samples=6, repeats=20),
        "orientation": dict(calib_n=32, eval_n=100, batch=16, probe_size=8, fidelity_samples=4, repeats=20),
        "ocr": dict(calib_n=16, eval_n=40, batch=16, probe_size=2, fidelity_samples=2, repeats=5),
    },
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- methods

@dataclasses.dataclass
class Method:
    key: str
    family: str                     # FP32 | ORT INT8 | cet uniform | hawq | cet
    label: str
    kind: str                       # fp32 | ort | cli | inproc
    ort_method: str | None = None
    weight_bits: int | None = None
    block: int | None = None
    allocator: str | None = None
    avg_bits: float | None = None
    weight_only: bool = False       # diagnostic: activations left in float


def methods_for(quick: bool) -> list[Method]:
    ms = [Method("fp32", "FP32", "FP32", "fp32"),
          Method("ort-minmax", "ORT INT8", "ORT INT8 QDQ per-channel, MinMax", "ort", ort_method="minmax")]
    if quick:
        b = REPRESENTATIVE
        return ms + [Method(f"uniform@{b:g}", "cet uniform", f"cet-onnx uniform, avg ≤ {b:g} bits", "cli",
                            allocator="uniform", avg_bits=b),
                     Method(f"hawq@{b:g}", "hawq", f"cet-onnx hawq, avg {b:g} bits", "cli", allocator="hawq", avg_bits=b),
                     Method(f"cet@{b:g}", "cet", f"cet-onnx cet, avg {b:g} bits", "cli", allocator="cet", avg_bits=b)]
    ms.append(Method("ort-entropy", "ORT INT8", "ORT INT8 QDQ per-channel, Entropy", "ort", ort_method="entropy"))
    ms += [Method("cet-w8", "cet uniform", "cet-onnx uniform W8 (per channel)", "cli", weight_bits=8),
           Method("cet-w4", "cet uniform", f"cet-onnx uniform W4 (block {BLOCK})", "cli", weight_bits=4, block=BLOCK),
           Method("cet-w2", "cet uniform", f"cet-onnx uniform W2 (block {BLOCK})", "cli", weight_bits=2, block=BLOCK)]
    for alloc in ("hawq", "cet"):
        for b in BUDGETS:
            ms.append(Method(f"{alloc}@{b:g}", alloc, f"cet-onnx {alloc}, avg {b:g} bits",
                             "cli" if b == REPRESENTATIVE else "inproc", allocator=alloc, avg_bits=b))
    # diagnostics: the same weights with activations left in float (--weight-only), to separate the two errors
    ms += [Method("cet-w4-wo", "weight-only", f"cet-onnx uniform W4 (block {BLOCK}), weight-only", "cli",
                  weight_bits=4, block=BLOCK, weight_only=True),
           Method(f"cet@{REPRESENTATIVE:g}-wo", "weight-only", f"cet-onnx cet, avg {REPRESENTATIVE:g} bits, weight-only",
                  "cli", allocator="cet", avg_bits=REPRESENTATIVE, weight_only=True)]
    return ms


# --------------------------------------------------------------------------- data

def model_data(name: str, cfg: dict) -> bench_data.ModelData:
    """The model with its first ``calib_n`` calibration and ``eval_n`` evaluation samples (``bench_data``; the
    orientation data is built once at the full size, 128 / 400, and sliced for ``--quick``)."""
    return bench_data.load(name, cfg["calib_n"], cfg["eval_n"])


# --------------------------------------------------------------------------- weight bytes in a file

_BITS = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.BFLOAT16: 16,
         onnx.TensorProto.DOUBLE: 64, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8,
         onnx.TensorProto.INT16: 16, onnx.TensorProto.UINT16: 16, onnx.TensorProto.INT32: 32,
         onnx.TensorProto.UINT32: 32, onnx.TensorProto.INT64: 64, onnx.TensorProto.UINT64: 64}
for _n, _b in (("INT4", 4), ("UINT4", 4), ("INT2", 2), ("UINT2", 2)):
    if hasattr(onnx.TensorProto, _n):
        _BITS[getattr(onnx.TensorProto, _n)] = _b
_PASS_THROUGH = ("Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Cast")


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return math.ceil(int(np.prod(t.dims, dtype=np.int64)) * _BITS[t.data_type] / 8)


def weight_bytes_in_file(path: Path) -> dict:
    """FP32 and stored bytes of the weight operands of Conv / ConvTranspose / Gemm / MatMul in a file.

    A weight is a constant operand (initializer or Constant node, possibly behind Identity / Reshape /
    Transpose / Squeeze / Unsqueeze / Cast); if it comes out of a DequantizeLinear of a constant, its
    stored bytes are the packed integer codes plus the scale and zero-point tensors, plus any constant
    side input on the way (the int64 target shape of a Reshape, which cet-onnx's count includes too).
    Each constant is counted once.
    """
    m = onnx.load(str(path))
    consts = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    producer = {o: n for n in m.graph.node for o in n.output}

    def resolve(name: str):
        """(kind, tensor or DequantizeLinear node, bytes of constant side inputs passed on the way)."""
        side = 0
        for _ in range(8):
            if name in consts:
                return ("float", consts[name], side) if consts[name].data_type in (1, 10, 11, 16) else None
            n = producer.get(name)
            if n is None:
                return None
            if n.op_type == "DequantizeLinear":
                return ("dq", n, side) if n.input[0] in consts else None
            if n.op_type not in _PASS_THROUGH:
                return None
            side += sum(_tensor_bytes(consts[i]) for i in n.input[1:] if i in consts)  # e.g. Reshape's shape
            name = n.input[0]
        return None

    seen: set[str] = set()
    res = {"weights": 0, "quantized": 0, "params": 0, "bytes_fp32": 0, "bytes": 0, "code_types": collections.Counter()}
    for n in m.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or n.domain not in ("", "ai.onnx"):
            continue
        idxs = [1] if n.op_type in ("Conv", "ConvTranspose") else [1, 0]
        for idx in idxs:
            if idx >= len(n.input) or not n.input[idx]:
                continue
            r = resolve(n.input[idx])
            if r is None:
                continue
            kind, obj, side = r
            key = obj.input[0] if kind == "dq" else obj.name
            if key in seen:
                break
            seen.add(key)
            res["bytes"] += side
            res["weights"] += 1
            if kind == "float":
                numel = int(np.prod(obj.dims, dtype=np.int64))
                res["params"] += numel
                res["bytes_fp32"] += 4 * numel
                res["bytes"] += _tensor_bytes(obj)
            else:
                q = consts[obj.input[0]]
                numel = int(np.prod(q.dims, dtype=np.int64))
                res["quantized"] += 1
                res["params"] += numel
                res["bytes_fp32"] += 4 * numel
                res["bytes"] += _tensor_bytes(q) + sum(_tensor_bytes(consts[i]) for i in obj.input[1:3]
                                                       if i and i in consts)
                res["code_types"][onnx.TensorProto.DataType.Name(q.data_type)] += 1
            break
    res["code_types"] = dict(res["code_types"])
    res["compression"] = res["bytes_fp32"] / res["bytes"] if res["bytes"] else None
    res["avg_bits"] = 8 * res["bytes"] / res["params"] if res["params"] else None
    return res


# --------------------------------------------------------------------------- quantize runs

def cet_cli_command(m: Method, spec: bench_data.ModelData, calib: Path, cfg: dict, out: Path,
                    cache_dir: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "cet_onnx.cli", "quantize", _rel(spec.model), "-o", _rel(out),
           "--calib", _rel(calib), "--device", "cpu", "--verify-size", "0",
           "--batch-size", str(cfg["batch"]), "-q"] + (["--weight-only"] if m.weight_only else [])
    if m.weight_bits is not None:
        cmd += ["--weight-bits", str(m.weight_bits)] + (["--block-size", str(m.block)] if m.block else [])
    else:
        cmd += ["--allocator", m.allocator, "--avg-bits", f"{m.avg_bits:g}", "--probe-size", str(cfg["probe_size"]),
                "--fidelity-samples", str(cfg["fidelity_samples"])]
        cmd += ["--cache-dir", _rel(cache_dir)] if cache_dir is not None else ["--no-cache"]
    return cmd


def ort_command(m: Method, spec: bench_data.ModelData, calib: Path, cfg: dict, out: Path) -> list[str]:
    return [sys.executable, _rel(ROOT / "tools" / "ort_quantize.py"), _rel(spec.model), "-o", _rel(out),
            "--calib", _rel(calib), "--method", m.ort_method, "--batch-size", str(cfg["batch"])]


def _cet_summary(report: dict) -> dict:
    t = report["totals"]
    out = {"weight_params": t["weight_params"], "weight_bytes_fp32": t["weight_bytes_fp32"],
           "weight_bytes": t["weight_bytes"], "weight_compression": t["weight_compression"], "avg_bits": t["avg_bits"],
           "formats": dict(collections.Counter(w["format"] for w in report["weights"])),
           "skipped_weights": report.get("skipped_weights", {}), "rounding": report["rounding"]["method"],
           "round_to_nearest_fallback": len(report["rounding"].get("round_to_nearest_fallback", {})),
           "stages_s": report["timings_s"], "opset": report["opset"]}
    a = report.get("allocation")
    if a:
        f = a.get("fidelity") or {}
        out["allocation"] = {k: a.get(k) for k in ("allocator", "budget", "loss", "probe_samples", "base_loss",
                                                   "predicted_loss", "measured_loss", "probe_runs", "probe_seconds",
                                                   "closed_loop")}
        out["allocation"]["fidelity_spearman"] = f.get("spearman")
        out["allocation"]["fidelity_median_ratio"] = f.get("median_measured_over_predicted")
    return out


def quantize_all(spec: bench_data.ModelData, calib: Path, cfg: dict, methods: list[Method], work: Path,
                 quick: bool) -> dict[str, dict]:
    """Produce every method's model; return per method: path, command, timings, cet report summary."""
    common.quiet()
    probe_cache = Path(tempfile.mkdtemp(prefix="probe-cache-", dir=work))   # fresh: the first runs probe cold
    runs: dict[str, dict] = {}
    try:
        for m in methods:
            if m.kind == "fp32":
                runs[m.key] = {"path": Path(spec.model)}
            elif m.kind in ("ort", "cli"):
                out = work / f"{m.key.replace('@', '_at_')}.onnx"
                cmd = ort_command(m, spec, calib, cfg, out) if m.kind == "ort" else \
                    cet_cli_command(m, spec, calib, cfg, out, None if quick else probe_cache)
                log(f"{m.key}: {shlex.join([_rel(Path(c)) if c == sys.executable else c for c in cmd[1:]])}")
                meas = common.run_measured(cmd, out.with_suffix(".log"))
                run = {"path": out, "command": "python " + shlex.join(cmd[1:]), "subprocess": meas,
                       "quantize_s": meas["wall_s"], "peak_rss_mb": meas["peak_rss_mb"], "timing": "subprocess"}
                if m.kind == "ort":
                    run["ort"] = json.loads(out.with_suffix(".log").read_text().strip().splitlines()[-1])
                else:
                    run["cet"] = _cet_summary(json.loads(common.report_path(out).read_text()))
                runs[m.key] = run
                log(f"{m.key}: {meas['wall_s']:.1f} s, peak RSS {meas['peak_rss_mb']:.0f} MB")
        inproc = [m for m in methods if m.kind == "inproc"]
        if inproc:
            base = common.cet_options(device="cpu", verify_size=0, batch_size=cfg["batch"],
                                      probe_size=cfg["probe_size"], fidelity_samples=cfg["fidelity_samples"],
                                      cache_dir=str(probe_cache))
            t0 = time.perf_counter()
            prepared = common.prepare(spec.model, str(calib), base, mixed=True)
            prep_s = time.perf_counter() - t0
            log(f"shared prepare(mixed=True): {prep_s:.1f} s")
            for m in inproc:
                out = work / f"{m.key.replace('@', '_at_')}.onnx"
                opts = common.with_options(base, allocator=m.allocator, avg_bits=m.avg_bits)
                t0 = time.perf_counter()
                report = common.quantize(spec.model, out, str(calib), opts, prepared=prepared)
                dt_s = time.perf_counter() - t0
                runs[m.key] = {"path": out, "quantize_s": round(dt_s, 3), "peak_rss_mb": None, "timing": "in-process",
                               "shared_prepare_s": round(prep_s, 3), "cet": _cet_summary(report),
                               "command": "in-process: cet_onnx.pipeline.quantize(..., prepared=prepare(..., mixed=True)) "
                                          f"with allocator={m.allocator!r}, avg_bits={m.avg_bits:g}"}
                log(f"{m.key}: in-process {dt_s:.1f} s")
    finally:
        shutil.rmtree(probe_cache, ignore_errors=True)
    return runs


def same_activation_ranges(a: Path, b: Path) -> dict:
    """How many activation scales / zero points (scalar Q/DQ parameters) two ORT QDQ files share exactly."""
    def params(path):
        m = onnx.load(str(path))
        inits = {t.name: t for t in m.graph.initializer}
        out = {}
        for n in m.graph.node:
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[1] in inits:
                s_ = onnx.numpy_helper.to_array(inits[n.input[1]])
                z = onnx.numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] in inits else None
                out[n.input[0]] = (float(np.ravel(s_)[0]), None if z is None else int(np.ravel(z)[0]))
        return out
    pa, pb = params(a), params(b)
    both = set(pa) & set(pb)
    same = sum(pa[t] == pb[t] for t in both)
    return {"activation_tensors": len(both), "identical": int(same), "all_identical": bool(both) and same == len(both)}


# --------------------------------------------------------------------------- evaluation

def evaluate(path: Path, spec: bench_data.ModelData) -> dict:
    """Outputs on the evaluation set: the first output (classifiers) or decoded strings (ocr)."""
    sess = common.session(path)
    if spec.metric == "accuracy":
        return {"logits": common.run_model(sess, spec.input, spec.x_eval, 64)}
    import ocr_data
    return {"texts": ocr_data.ctc_greedy_decode(common.run_model(sess, spec.input, spec.x_eval, 32), spec.extra["chars"])}


def metrics(res: dict, ref: dict, spec: bench_data.ModelData) -> dict:
    if spec.metric == "accuracy":
        return {"metric": common.accuracy(res["logits"], spec.labels),
                "agreement": common.top1_agreement(ref["logits"], res["logits"])}
    import ocr_data
    t, r = res["texts"], spec.texts
    return {"metric": ocr_data.cer(t, r), "agreement": float(np.mean([a == b for a, b in zip(t, ref["texts"])])),
            "exact_lines": float(np.mean([a == b for a, b in zip(t, r)]))}


def bench_model(name: str, cfg: dict, methods: list[Method], quick: bool) -> dict:
    t_model = time.perf_counter()
    work = CACHE / "work" / ("bench_quick" if quick else "bench") / name
    if work.exists():
        shutil.rmtree(work)
    spec = model_data(name, cfg)
    calib = spec.save_calib(work / "calib.npz")
    log(f"{name}: calibration {spec.calib.shape}, evaluation {spec.x_eval.shape}")
    runs = quantize_all(spec, calib, cfg, methods, work, quick)
    outs = {m.key: evaluate(runs[m.key]["path"], spec) for m in methods}
    rows = {}
    for m in methods:
        run = runs[m.key]
        path = run["path"]
        wf = weight_bytes_in_file(path)
        row = {"method": m.key, "family": m.family, "label": m.label, "kind": m.kind,
               **metrics(outs[m.key], outs["fp32"], spec),
               "file_bytes": int(path.stat().st_size), "weights_in_file": wf,
               "quantize_s": run.get("quantize_s"), "peak_rss_mb": run.get("peak_rss_mb"),
               "timing": run.get("timing"), "command": run.get("command")}
        for k in ("subprocess", "ort", "cet", "shared_prepare_s"):
            if k in run:
                row[k] = run[k]
        if "cet" in run:
            c = run["cet"]
            row.update(weight_bytes_fp32=c["weight_bytes_fp32"], weight_bytes=c["weight_bytes"],
                       weight_compression=c["weight_compression"], avg_bits=c["avg_bits"],
                       weight_bytes_source="cet-onnx report totals")
            row["file_count_matches_report"] = bool(wf["bytes"] == c["weight_bytes"]
                                                    and wf["bytes_fp32"] == c["weight_bytes_fp32"])
        else:
            row.update(weight_bytes_fp32=wf["bytes_fp32"], weight_bytes=wf["bytes"],
                       weight_compression=wf["compression"], avg_bits=wf["avg_bits"],
                       weight_bytes_source="weight initializers of the file")
        if spec.metric == "cer":
            import ocr_data
            fonts = spec.extra["fonts"]
            by_font = {}
            for f in sorted(set(fonts)):
                idx = [i for i, g in enumerate(fonts) if g == f]
                by_font[f] = round(ocr_data.cer([outs[m.key]["texts"][i] for i in idx], [spec.texts[i] for i in idx]), 5)
            row["cer_by_font"] = by_font
        rows[m.key] = row
        log(f"{name} {m.key}: {spec.metric} {row['metric']:.4f}, agreement {row['agreement']:.4f}, "
            f"{row['avg_bits']:.2f} bits/weight, {row['file_bytes']:,} B")
    # latency: batch 1, one thread, every model's runs interleaved
    sessions = {m.key: common.session(runs[m.key]["path"], 1) for m in methods}
    load0 = os.getloadavg()[0]
    lat = common.interleaved_latency(sessions, spec.input, spec.x_eval[:1], cfg["repeats"])
    load1 = os.getloadavg()[0]
    for k, v in lat.items():
        rows[k]["latency"] = v
        rows[k]["latency_ms"] = v["median_ms"]
    del sessions
    ort_same = None
    if "ort-minmax" in runs and "ort-entropy" in runs:
        ort_same = same_activation_ranges(runs["ort-minmax"]["path"], runs["ort-entropy"]["path"])
    if spec.metric == "cer":
        errors = [{"ref": r, "fp32": p} for r, p in zip(spec.texts, outs["fp32"]["texts"]) if r != p]
    else:
        errors = None
    return {"model": _rel(Path(spec.model)), "model_info": spec.extra.get("model_info"), "data": spec.extra["source"],
            "metric": spec.metric, "settings": {**cfg, "calib_samples": int(len(spec.calib)),
                                                "eval_samples": int(len(spec.x_eval))},
            "rows": rows, "loadavg_during_latency": [load0, load1], "fp32_errors": errors,
            "ort_entropy_vs_minmax": ort_same,
            "seconds": round(time.perf_counter() - t_model, 1)}


# --------------------------------------------------------------------------- report

def _metric_name(metric: str) -> str:
    return "top-1 accuracy" if metric == "accuracy" else "CER (lower is better)"


def _fmt_metric(metric: str, v: float) -> str:
    return f"{100 * v:.2f} %"


def _fmt_q(row: dict) -> str:
    if row["quantize_s"] is None:
        return "—"
    return f"{row['quantize_s']:.1f}" + ("" if row["timing"] == "subprocess" else " ‡")


def model_table(r: dict) -> list[str]:
    metric = r["metric"]
    agree = "agreement with FP32 (top-1)" if metric == "accuracy" else "exact-line agreement with FP32"
    head = ["method", _metric_name(metric), agree, "file bytes", "weight compression", "bits/weight",
            "quantize s", "latency ms", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in r["rows"].values():
        lines.append("| " + " | ".join([
            row["label"], _fmt_metric(metric, row["metric"]), f"{100 * row['agreement']:.2f} %", f"{row['file_bytes']:,}",
            f"{row['weight_compression']:.2f}×", f"{row['avg_bits']:.2f}", _fmt_q(row),
            f"{row['latency_ms']:.3f}", "—" if row["peak_rss_mb"] is None else f"{row['peak_rss_mb']:.0f}"]) + " |")
    return lines


def _num(v) -> float | None:
    """A finite float, or None (cet-onnx's report writes non-finite floats as strings)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _g(v, spec: str = ".4g") -> str:
    f = _num(v)
    return "—" if f is None else format(f, spec)


def allocation_table(r: dict) -> list[str]:
    lines = ["| method | formats chosen (weights) | loss measured / predicted | Spearman (fidelity) | "
             "probe batch runs | cet-onnx stages (s) |", "|---|---|---|---:|---:|---|"]
    for row in r["rows"].values():
        c = row.get("cet")
        if not c:
            continue
        a = c.get("allocation") or {}
        fmts = ", ".join(f"{k} ×{v}" for k, v in sorted(c["formats"].items()))
        lm = "—" if not a else f"{_g(a.get('measured_loss'))} / {_g(a.get('predicted_loss'))}"
        stages = ", ".join(f"{k} {v:.1f}" for k, v in c["stages_s"].items() if k != "total" and v >= 0.05)
        lines.append(f"| {row['label']} | {fmts} | {lm} | {_g(a.get('fidelity_spearman'), '.2f')} | "
                     f"{a.get('probe_runs', '—') if a else '—'} | {stages} |")
    return lines


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# cet-onnx benchmark{' (--quick)' if meta['quick'] else ''}: FP32, onnxruntime INT8, cet-onnx", "",
             f"- date: {meta['date']}", f"- command: `{meta['command']}` (wall time {meta['runtime_s']:.0f} s)",
             f"- machine: {meta['cpu']}, {meta['cores']} cores; onnxruntime {meta['onnxruntime']}, onnx {meta['onnx']}, "
             f"numpy {meta['numpy']}, python {meta['python']}; {meta['cet_onnx']}"
             + (f" at commit {meta['git']['commit']}" + (" + uncommitted changes in "
                + ", ".join(meta['git']['cet_onnx_uncommitted']) if meta['git'].get('cet_onnx_uncommitted') else "")
                if (meta.get("git") or {}).get("commit") else ""),
             "- ORT INT8: `quant_pre_process` (default arguments; fallbacks per model below) + `quantize_static` (QDQ, per_channel=True, "
             "activations QUInt8, weights QInt8, MinMax or Entropy, no extra_options), via `tools/ort_quantize.py`",
             "- cet-onnx: `cet-onnx quantize` with its defaults (major-axis rounding, MSE clipping and asymmetric grids "
             "at ≤ 4 bits; mixed-precision candidates INT2/INT4/INT8 per channel or in blocks of 32) plus `--device cpu "
             "--verify-size 0` (no held-back samples: calibrates on exactly the samples ORT gets) and the batch / probe "
             "settings below. Uniform W4 / W2 use `--block-size 32` (weights with fewer than 32 input channels stay per "
             "channel); `hawq` / `cet` rows: `--allocator hawq|cet --avg-bits X`",
             "- weight-only rows (diagnostic): the same command with `--weight-only` (activations stay float), to "
             "separate the error of the weights from that of the 8-bit activations",
             "- bits/weight and weight compression count scales and zero points: cet-onnx rows from its report "
             "(`totals`), FP32 / ORT rows from the weight initializers of the file (the same count on every cet-onnx "
             "file matches the report: "
             + ("yes" if all(row.get("file_count_matches_report", True) for r in results.values()
                              for row in r["rows"].values()) else "**NO**, see bench.json") + ")",
             "- BLAS threads: " + ", ".join(f"{k}={v}" for k, v in meta["blas_threads"].items() if v) + (
                 " (`--blas-threads`, default 1: cet-onnx's layer-Hessian step was up to 40× slower with multi-threaded "
                 "OpenBLAS on this busy 2-core machine; onnxruntime's thread pools are not affected)"
                 if any(meta["blas_threads"].values()) else "environment as it is (`--blas-threads 0`)"),
             "- latency: median `session.run` ms at batch 1, CPU, ORT_ENABLE_ALL, intra_op_num_threads=1, the same "
             "SessionOptions for all models, runs of all models of a table interleaved",
             "- quantize s / peak RSS: a fresh subprocess per run (`python -m cet_onnx.cli quantize ...` or "
             "`python tools/ort_quantize.py ...`; wall time incl. interpreter start-up and imports; peak RSS = the "
             "child's `ru_maxrss` from `os.wait4`). ‡ = in-process `quantize(..., prepared=...)` on one shared "
             "`prepare(mixed=True)` with the probe results of the subprocess runs cached: the extra time of one more "
             "budget, excluding loading, calibration, layer Hessians and probes; no RSS figure",
             ""]
    lines += ["| model | calibration samples | evaluation samples | batch | probe_size | fidelity_samples | latency runs |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        s = r["settings"]
        lines.append(f"| {name} | {s['calib_samples']} | {s['eval_samples']} | {s['batch']} | {s['probe_size']} | "
                     f"{s['fidelity_samples']} | {s['repeats']} |")
    for name, r in results.items():
        lines += ["", f"## {name}: {_metric_name(r['metric'])}", "", f"- model: `{r['model']}`"
                  + (f" ({r['model_info']['wheel']}, sha256 {r['model_info']['model_sha256'][:16]}…)"
                     if r.get("model_info") else ""), f"- data: {r['data']}",
                  f"- 1-min load average before / after the latency runs: {r['loadavg_during_latency'][0]:.1f} / "
                  f"{r['loadavg_during_latency'][1]:.1f}; model wall time {r['seconds']:.0f} s", ""]
        ort_notes = []
        for row in r["rows"].values():
            o = row.get("ort") or {}
            if o.get("opset_upgraded_from") is not None:
                ort_notes.append(f"opset {o['opset_upgraded_from']} → 13 with onnx.version_converter first "
                                 "(quantize_static wrote an invalid per-channel model at opset 12)")
            if o.get("preprocess_fallback_reason"):
                ort_notes.append(f"quant_pre_process failed with default arguments ({o['preprocess_fallback_reason']}); "
                                 "run with skip_symbolic_shape=True")
        oe = r.get("ort_entropy_vs_minmax")
        if oe and oe.get("all_identical"):
            ort_notes.append(f"Entropy gave exactly MinMax's activation ranges ({oe['identical']}/{oe['activation_tensors']} "
                             "scales and zero points identical): quantize_static builds its EntropyCalibrater with "
                             "num_bins = num_quantized_bins = 128 and passes no extra option to change them, so the "
                             "KL threshold search has a single candidate, the full range")
        if ort_notes:
            lines.insert(len(lines) - 1, "- ORT recipe on this model: " + "; ".join(dict.fromkeys(ort_notes)))
        lines += model_table(r)
        alloc = allocation_table(r)
        if len(alloc) > 2:
            lines += ["", "cet-onnx allocation details:", ""] + alloc
        if r["metric"] == "cer":
            fp = r["rows"]["fp32"]
            lines += ["", f"FP32 reads {100 * fp['exact_lines']:.1f} % of the evaluation lines exactly (CER "
                      f"{100 * fp['metric']:.2f} %); its misreadings: "
                      + "; ".join(f"`{e['ref']}` → `{e['fp32']}`" for e in (r["fp32_errors"] or [])[:8])]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    styles = {"ORT INT8": ("tab:gray", "s"), "cet uniform": ("tab:blue", "o"), "hawq": ("tab:orange", "^"),
              "cet": ("tab:green", "D"), "weight-only": ("tab:purple", "x")}
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        rows = list(r["rows"].values())
        fp = r["rows"]["fp32"]
        scale = 100
        ax.axhline(scale * fp["metric"], color="black", ls="--", lw=1, label=f"FP32 ({fp['avg_bits']:.0f} bits)")
        for fam, (color, marker) in styles.items():
            pts = sorted((row["avg_bits"], scale * row["metric"], row["method"]) for row in rows if row["family"] == fam)
            if not pts:
                continue
            if fam == "weight-only":
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, ls="none", ms=8,
                        mew=2, label="weight-only (float activations)")
                for x, y, k in pts:
                    ax.annotate(k.replace("-wo", "").replace("cet-", ""), (x, y), textcoords="offset points",
                                xytext=(5, -10), fontsize=7, color=color)
            elif fam == "ORT INT8":
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, ls="none", ms=10,
                        mfc="none", mew=1.5, label=fam)
                for n_, (x, y, k) in enumerate(pts):
                    ax.annotate(k.replace("ort-", ""), (x, y), textcoords="offset points",
                                xytext=(-30, 8 if n_ % 2 == 0 else -14), fontsize=7, color=color)
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, ls="-", label=fam)
        ax.set_xscale("log", base=2)
        ticks = [2, 2.5, 3, 4, 6, 8]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.set_xlabel("bits per weight (scales, zero points incl.)")
        ax.set_ylabel(("top-1 accuracy" if r["metric"] == "accuracy" else "character error rate") + " (%)")
        if r["metric"] == "cer":
            ax.set_yscale("symlog", linthresh=1)
            ax.set_ylim(0, 110)
        ax.set_title(f"{name} ({r['settings']['eval_samples']} eval samples)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def findings(results: dict) -> list[str]:
    """Plain comparisons computed from the results (where cet-onnx loses, and by how much)."""
    out = []
    for name, r in results.items():
        rows = r["rows"]
        acc = r["metric"] == "accuracy"
        better = (lambda a, b: a > b) if acc else (lambda a, b: a < b)
        mname = "accuracy" if acc else "CER"
        f = lambda row: f"{100 * row['metric']:.2f} %"  # noqa: E731
        for b in BUDGETS:
            h, c = rows.get(f"hawq@{b:g}"), rows.get(f"cet@{b:g}")
            if not (h and c):
                continue
            if not better(c["metric"], h["metric"]):
                s = (f"{name}, avg {b:g} bits: hawq {'matches' if h['metric'] == c['metric'] else 'beats'} cet "
                     f"({mname} {f(h)} vs {f(c)})")
                la, lh = (c.get("cet") or {}).get("allocation") or {}, (h.get("cet") or {}).get("allocation") or {}
                mc, mh = _num(la.get("measured_loss")), _num(lh.get("measured_loss"))
                if mc is not None and mh is not None and mc < mh:
                    s += (f", although cet's allocation has the lower loss on the probe samples ({la['loss']} "
                          f"{mc:.3g} vs {mh:.3g})")
                out.append(s + ".")
        u = rows.get(f"uniform@{REPRESENTATIVE:g}")
        c = rows.get(f"cet@{REPRESENTATIVE:g}")
        if u and c and not better(c["metric"], u["metric"]):
            out.append(f"{name}: uniform at ≤ {REPRESENTATIVE:g} bits {'matches' if u['metric'] == c['metric'] else 'beats'} "
                       f"cet ({mname} {f(u)} vs {f(c)}).")
        for key in ("cet-w4", "cet-w2"):
            w = rows.get(key)
            if not w:
                continue
            for b in BUDGETS:
                c = rows.get(f"cet@{b:g}")
                if c and c["avg_bits"] >= w["avg_bits"] - 1e-9 and not better(c["metric"], w["metric"]):
                    out.append(f"{name}: {w['label'].replace('cet-onnx ', '')} at {w['avg_bits']:.2f} bits is as good as "
                               f"cet at {c['avg_bits']:.2f} bits ({mname} {f(w)} vs {f(c)}).")
        o, fp = rows.get("ort-minmax"), rows["fp32"]
        low = [row for row in rows.values() if row["family"] in ("cet uniform", "hawq", "cet", "weight-only")
               and row["avg_bits"] < 8]
        if o and low:
            lo, hi = min(x["latency_ms"] for x in low), max(x["latency_ms"] for x in low)
            if lo > o["latency_ms"]:
                out.append(f"{name}: every cet-onnx model below 8 bits is slower than ORT INT8 at batch 1 on one thread "
                           f"({lo:.2f}–{hi:.2f} ms vs {o['latency_ms']:.2f} ms; FP32 {fp['latency_ms']:.2f} ms): onnxruntime's "
                           "CPU provider has no kernel for INT4/INT2 weights in blocks (per-channel ones run in its INT8 "
                           "kernels), so their DequantizeLinear runs on every inference (README, \"Speed\").")
            elif hi > 1.1 * o["latency_ms"]:
                out.append(f"{name}: cet-onnx models below 8 bits take {lo:.2f}–{hi:.2f} ms at batch 1 on one thread vs "
                           f"{o['latency_ms']:.2f} ms for ORT INT8 (FP32 {fp['latency_ms']:.2f} ms).")
            if fp["latency_ms"] < o["latency_ms"]:
                out.append(f"{name}: FP32 itself is faster than ORT INT8 here ({fp['latency_ms']:.2f} vs "
                           f"{o['latency_ms']:.2f} ms), so no quantized model is a latency win.")
        w8 = rows.get("cet-w8")
        if o and w8 and better(o["metric"], w8["metric"]):
            out.append(f"{name}: at INT8, ORT MinMax is better than cet-onnx W8 ({mname} {f(o)} vs {f(w8)}, "
                       f"agreement {100 * o['agreement']:.1f} % vs {100 * w8['agreement']:.1f} %) and faster "
                       f"({o['latency_ms']:.2f} vs {w8['latency_ms']:.2f} ms)." if o["latency_ms"] < w8["latency_ms"] else
                       f"{name}: at INT8, ORT MinMax is better than cet-onnx W8 ({mname} {f(o)} vs {f(w8)}).")
        for q, wo in ((rows.get("cet-w4"), rows.get("cet-w4-wo")), (rows.get(f"cet@{REPRESENTATIVE:g}"),
                                                                   rows.get(f"cet@{REPRESENTATIVE:g}-wo"))):
            if q and wo and better(wo["metric"], q["metric"]) and abs(wo["metric"] - q["metric"]) >= 0.01:
                out.append(f"{name}: 8-bit activations cost more than the weights: {q['label'].replace('cet-onnx ', '')} "
                           f"{mname} {f(q)}, the same with float activations (--weight-only) {f(wo)}.")
        cs = [row for row in rows.values() if row["timing"] == "subprocess" and row["family"] == "cet"]
        if o and cs and o.get("quantize_s"):
            out.append(f"{name}: quantizing with the cet allocator took {cs[0]['quantize_s']:.0f} s and "
                       f"{cs[0]['peak_rss_mb']:.0f} MB peak RSS vs {o['quantize_s']:.0f} s / {o['peak_rss_mb']:.0f} MB "
                       "for ORT INT8 MinMax (fresh processes, same calibration samples).")
    return out


def snippet(results: dict, meta: dict) -> str:
    lines = ["### Benchmark: FP32 vs onnxruntime INT8 vs cet-onnx", "",
             f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores), onnxruntime {meta['onnxruntime']}; "
             "full details (settings, allocation, per-run commands) in `tools/results/bench.md`. Regenerate with:", "",
             "```bash", meta["command"], "```", "",
             "Bits/weight and compression count scales and zero points; latency is the median at batch 1 on one CPU "
             "thread; quantize time and peak RSS are from a fresh process (‡: an extra budget in-process, sharing "
             "calibration and probes; no RSS).", ""]
    for name, r in results.items():
        lines += [f"**{name}** ({_metric_name(r['metric'])}; {r['settings']['eval_samples']} held-out samples)", ""]
        lines += model_table(r) + [""]
    lines += ["Where cet-onnx does not win (computed from these numbers):", ""]
    lines += [f"- {s}" for s in findings(results)] or ["- (nothing)"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Default --out: tools/results/bench (tools/results/bench_quick with --quick).")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--quick", action="store_true",
                    help="few samples, one budget (avg 3 bits: uniform, hawq, cet, ORT MinMax), fewer latency runs")
    ap.add_argument("--out", type=Path, default=None, help="output prefix (writes PREFIX.md/.json/.png)")
    ap.add_argument("--from-json", type=Path, default=None, metavar="PREFIX.json",
                    help="rewrite the .md / .png / snippet from an existing results JSON (no measurement)")
    ap.add_argument("--blas-threads", default="1", metavar="N",
                    help="OPENBLAS_NUM_THREADS / MKL_NUM_THREADS for every run, in-process and subprocess "
                         "(default 1; 0 keeps the environment as it is). cet-onnx's layer-Hessian step makes "
                         "hundreds of tiny matrix products per depthwise conv; with multi-threaded OpenBLAS on a "
                         "busy 2-core machine it ran 40x slower (67.7 s vs 1.7 s for 16 orientation samples)")
    args = ap.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    bad = [m for m in names if m not in MODELS]
    if bad or not names:
        ap.error(f"unknown model(s) {', '.join(bad) or '(none)'}; choose from {', '.join(MODELS)}")
    if not args.blas_threads.isdigit():
        ap.error(f"--blas-threads: expected a non-negative integer, got '{args.blas_threads}'")
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        write_reports(data["results"], data["meta"], args.out or args.from_json.with_suffix(""))
        return 0
    out = args.out or RESULTS / ("bench_quick" if args.quick else "bench")
    mode = "quick" if args.quick else "full"
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python tools/bench.py" + "".join(f" {shlex.quote(a)}" for a in
                                                         (sys.argv[1:] if argv is None else argv)),
            "quick": args.quick, "cpu": common.cpu_name(), "cores": os.cpu_count(), "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "cet_onnx": f"cet-onnx {common.CET_VERSION}", "budgets_avg_bits": [REPRESENTATIVE] if args.quick else list(BUDGETS),
            "settings": {n: SETTINGS[mode][n] for n in names},
            "blas_threads": {v: os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")}}
    meta["git"] = _git_state()
    t0 = time.perf_counter()
    methods = methods_for(args.quick)
    results = {}
    for name in names:
        log(f"=== {name} ({mode}) ===")
        results[name] = bench_model(name, SETTINGS[mode][name], methods, args.quick)
    meta["runtime_s"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta["plot"] = _rel(out.with_suffix(".png"))
    # the measurements first, so that a failure while formatting loses nothing (see --from-json)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2,
                                                   default=common.json_default))
    print(write_reports(json.loads(out.with_suffix(".json").read_text())["results"], meta, out))
    log(f"done in {meta['runtime_s']:.0f} s: {_rel(out)}.md / .json / .png / _readme_snippet.md")
    return 0


def write_reports(results: dict, meta: dict, out: Path) -> str:
    """``OUT.md``, ``OUT.png`` and ``OUT_readme_snippet.md`` from the results; returns the Markdown."""
    note = plot(results, out.with_suffix(".png"))
    if note:
        log(note)
    md = markdown(results, meta)
    out.with_suffix(".md").write_text(md)
    Path(str(out) + "_readme_snippet.md").write_text(snippet(results, meta))
    return md


def _git_state() -> dict:
    """The commit the tree is at and whether cet_onnx/ has uncommitted changes (read-only git calls)."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    changed = git("status", "--porcelain", "--", "cet_onnx")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "cet_onnx_uncommitted": None if changed is None else [ln[3:] for ln in changed.splitlines()]}


if __name__ == "__main__":
    sys.exit(main())
