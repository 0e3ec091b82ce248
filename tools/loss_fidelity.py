#!/usr/bin/env python
"""Which loss proxy makes the sum of single-weight probes predict multi-weight reality?

For each loss (kl, logmse, mse) this runs cet-onnx's probes on a model and compares the
additive prediction with the measured loss of random mixed assignments (Spearman rank
correlation and median measured/predicted ratio) — the measurement behind the default loss.

    python tools/loss_fidelity.py --models digits,orientation

Writes tools/results/loss_fidelity.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import bench_common as common
from bench_data import RESULTS
from compare_allocators import model_data


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits,orientation")
    ap.add_argument("--losses", default="logmse,kl,mse")
    ap.add_argument("--assignments", type=int, default=20)
    ap.add_argument("--probe-size", type=int, default=None, help="default: 128 digits, 16 orientation")
    ap.add_argument("--out", type=Path, default=RESULTS / "loss_fidelity")
    args = ap.parse_args(argv)
    common.quiet()
    rows = []
    calib_dir = Path(tempfile.mkdtemp(prefix="cet-calib-"))
    for mname in args.models.split(","):
        spec, calib, cfg = model_data(mname, calib_dir)
        for loss in args.losses.split(","):
            opts = common.cet_options(device="cpu", verify_size=0, batch_size=cfg["batch"], loss=loss,
                                      probe_size=args.probe_size or (128 if mname == "digits" else 16),
                                      fidelity_samples=args.assignments, cache_dir=tempfile.mkdtemp())
            r = common.analyze(spec.model, str(calib), opts)
            f = r["fidelity"]
            rows.append({"model": mname, "loss": loss, "spearman": f["spearman"],
                         "ratio": f["median_measured_over_predicted"], "assignments": len(f["assignments"]),
                         "probe_samples": r["probe_samples"], "rounding": "major-axis (<=4 bits)"})
            print(f"{mname} {loss}: Spearman {f['spearman']:.3f} ratio {f['median_measured_over_predicted']:.2f}",
                  file=sys.stderr)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python tools/loss_fidelity.py " + " ".join(argv or sys.argv[1:])}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Loss proxy fidelity: sum of single-weight probes vs measured loss of random assignments", "",
             f"- date: {meta['date']}", f"- command: `{meta['command']}`", "",
             "| model | loss | Spearman | median measured / predicted | assignments | probe samples |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['loss']} | {r['spearman']:.3f} | {r['ratio']:.2f} | {r['assignments']} | "
              f"{r['probe_samples']} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
