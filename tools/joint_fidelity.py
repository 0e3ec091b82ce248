#!/usr/bin/env python
"""Do the single probes of weights and of activations add up to the loss of both quantized together?

For each model of ``tools/bench_data.py`` this runs, in a fresh process with default settings,

    cet-onnx analyze MODEL --calib CALIB --activations --joint --fidelity-samples N --no-cache -q -o PREFIX

which probes every weight (each format alone) and every 8-bit / 16-bit activation point (each alone),
then writes random assignments of weight formats *and* 8-bit activation points together and compares
the measured probe loss with the summed prediction (``cet_onnx/allocation/joint_fidelity.py``). The table
gives the Spearman rank correlation and median measured / predicted of the joint check, beside the weight-only
and activation-only checks of the same run, and the activations' median share of the prediction (how much
of the ranking the activation terms carry).

    python tools/joint_fidelity.py [--models digits,orientation,ocr,magika] [--samples 20]
    python tools/joint_fidelity.py --models minilm --out tools/results/joint_fidelity_minilm   # torch needed

Writes tools/results/joint_fidelity.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

import bench_common as common
import bench_data


def model_and_calib(name: str, work: Path) -> tuple[Path, Path]:
    """A model of ``bench_data`` and its calibration ``.npz``, or ``minilm`` (``tools/minilm_data.py``: needs
    torch and transformers for the export)."""
    if name == "minilm":
        import minilm_data
        info = minilm_data.build(minilm_data.DEFAULT_CACHE)
        return Path(info["model"]), Path(info["calib"])
    spec = bench_data.load(name)
    return Path(spec.model), spec.save_calib(work / f"{name}_calib.npz")


def run_model(name: str, samples: int, work: Path) -> dict:
    model, calib = model_and_calib(name, work)
    prefix = work / f"{name}_joint"
    cmd = [sys.executable, "-m", "cet_onnx.cli", "analyze", str(model), "--calib", str(calib), "--activations",
           "--joint", "--fidelity-samples", str(samples), "--no-cache", "-q", "-o", str(prefix)]
    wall = common.run_measured(cmd, work / f"{name}_joint.log")["wall_s"]
    r = json.loads(prefix.with_suffix(".json").read_text())
    joint, acts, weights = r["joint_fidelity"], r["activations"].get("fidelity"), r["weights"].get("fidelity")
    share = [a["predicted_activations"] / a["predicted"] for a in joint["assignments"] if a["predicted"] > 0]
    return {"model": name, "wall_s": wall, "probe_samples": r["probe_samples"], "loss": r["loss"],
            "weights": joint["weights"], "activation_points": joint["activation_points"],
            "assignments": len(joint["assignments"]), "joint_spearman": joint["spearman"],
            "joint_ratio": joint["median_measured_over_predicted"],
            "activation_share": float(np.median(share)) if share else None,
            "weights_spearman": weights and weights["spearman"], "activations_spearman": acts and acts["spearman"],
            "joint": joint}


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None or not np.isfinite(x) else format(x, fmt)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(bench_data.ALL_MODELS))
    ap.add_argument("--samples", type=int, default=20, help="random assignments per check")
    ap.add_argument("--out", type=Path, default=bench_data.RESULTS / "joint_fidelity")
    ap.add_argument("--work", type=Path, default=bench_data.CACHE / "joint_fidelity")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        rows.append(run_model(name, args.samples, args.work))
        print(f"{name}: joint Spearman {_f(rows[-1]['joint_spearman'])}", file=sys.stderr)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python tools/joint_fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "cpu": common.cpu_name(), "onnxruntime": ort.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Joint fidelity: summed single probes of weights and activations vs measured loss of both together", "",
             f"- date: {meta['date']}, {meta['cpu']}, onnxruntime {meta['onnxruntime']}",
             f"- command: `{meta['command']}`", "",
             "| model | weights | 8-bit activation points | assignments | joint Spearman | joint measured / predicted "
             "| activations' share of the prediction (median) | weights-only Spearman | activations-only Spearman "
             "| probe samples | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['weights']} | {r['activation_points']} | {r['assignments']} | "
              f"{_f(r['joint_spearman'])} | {_f(r['joint_ratio'], '.2f')} | {_f(r['activation_share'], '.1%')} | "
              f"{_f(r['weights_spearman'])} | {_f(r['activations_spearman'])} | {r['probe_samples']} | "
              f"{r['wall_s']:.0f} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
