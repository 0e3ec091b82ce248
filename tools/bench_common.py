"""What the benchmark scripts in ``tools/`` share: cet-onnx's API, onnxruntime runs, timings.

Every ``cet_onnx`` name a tool uses is imported here, once, so that a change in the package's
layout is fixed in this file alone. The tools import the installed package (``pip install .``);
run as ``python tools/X.py``, ``tools/`` is ``sys.path[0]``, so this module and the other tools
import by name. What cet-onnx already has is reused: sessions and batched runs from
``cet_onnx.runner``, SQNR / top-1 agreement / accuracy from ``cet_onnx.verify``. What it lacks
lives here: interleaved latency of several sessions, onnxruntime's optimised graph, and a
command run in a fresh process with its peak RSS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np

from cet_onnx.latency import cpu_name, interleaved_ms  # noqa: F401  (re-exported for the tools)
import onnxruntime as ort

from cet_onnx import __version__ as CET_VERSION  # noqa: F401  (re-exported)
from cet_onnx.io.sizes import model_file_bytes  # noqa: F401  (re-exported)
from cet_onnx.pipeline import QuantizeOptions, analyze, prepare, quantize, report_path  # noqa: F401
from cet_onnx.progress import set_quiet
from cet_onnx.runner import concat_outputs, make_session, run_batches, select_providers
from cet_onnx.verify import accuracy, sqnr_db, top1_agreement  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["CET_VERSION", "ROOT", "QuantizeOptions", "accuracy", "analyze", "cet_options", "cpu_name", "extra_activation_ops", "interleaved_latency", "interleaved_ms",
           "json_default", "model_file_bytes", "option_names", "optimized_graph", "prepare", "quantize", "quiet",
           "rel", "report_path", "run_measured", "run_model", "session", "sqnr_db", "top1_agreement", "with_options"]


# --------------------------------------------------------------------------- cet-onnx options

def cet_options(**kw) -> QuantizeOptions:
    """``QuantizeOptions(**kw)``: every tool builds its options here."""
    return QuantizeOptions(**kw)


def with_options(opts: QuantizeOptions, **kw) -> QuantizeOptions:
    """A copy of ``opts`` with ``kw`` changed (``dataclasses.replace``)."""
    return dataclasses.replace(opts, **kw)


def option_names() -> set[str]:
    """The fields of ``QuantizeOptions`` in this cet-onnx version."""
    return {f.name for f in dataclasses.fields(QuantizeOptions)}


@contextlib.contextmanager
def extra_activation_ops(ops):
    """Diagnostic: ``cet_onnx.graph.rewriter.ACTIVATION_OPS`` with ``ops`` added, in this process, while inside."""
    from cet_onnx.graph import rewriter
    saved = rewriter.ACTIVATION_OPS
    rewriter.ACTIVATION_OPS = frozenset(saved | set(ops))
    try:
        yield
    finally:
        rewriter.ACTIVATION_OPS = saved


def quiet() -> None:
    """No progress bars from cet-onnx in this process."""
    set_quiet(True)


# --------------------------------------------------------------------------- onnxruntime

CPU = select_providers("cpu")


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """CPU session, ORT_ENABLE_ALL, ``threads`` intra-op threads (None / 0: onnxruntime's default)."""
    return make_session(path, CPU, threads=threads or 0)


def run_model(sess: ort.InferenceSession, name: str, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """The first output of ``sess`` on ``x``, fed as input ``name`` in batches of ``batch``."""
    return concat_outputs(run_batches(sess, [{name: x[i:i + batch]} for i in range(0, len(x), batch)]))[0]


def optimized_graph(path: Path, out: Path) -> Path:
    """Write the graph onnxruntime runs after its optimisations (ORT_ENABLE_ALL, CPU, 1 thread) to ``out``."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), so, providers=CPU)
    return out


def interleaved_latency(sessions: dict[str, ort.InferenceSession], name: str | None, feed: np.ndarray | dict,
                        repeats: int, block: int = 5, warmup: int = 5) -> dict[str, dict]:
    """Median / p25 / p75 ms of ``session.run`` per model (``feed``: the input ``name``, or a whole feed dict).

    The models take turns in blocks of ``block`` runs (order rotated every round) until each has
    ``repeats`` timed runs; the first run of every block is run but not timed, so that a
    previous model's idle, still-spinning thread pool (default threads) does not land on it.
    """
    keys = list(sessions)
    feed = feed if isinstance(feed, dict) else {name: feed}
    for k in keys:
        for _ in range(warmup):
            sessions[k].run(None, feed)
    times = {k: [] for k in keys}
    r = 0
    while min(len(v) for v in times.values()) < repeats:
        for j in range(len(keys)):
            k = keys[(r + j) % len(keys)]
            sessions[k].run(None, feed)
            for _ in range(block):
                t0 = time.perf_counter()
                sessions[k].run(None, feed)
                times[k].append(time.perf_counter() - t0)
        r += 1
    return {k: {"median_ms": 1e3 * float(np.median(v)), "p25_ms": 1e3 * float(np.percentile(v, 25)),
                "p75_ms": 1e3 * float(np.percentile(v, 75)), "runs": len(v)} for k, v in times.items()}


# --------------------------------------------------------------------------- processes, paths, machine

def run_measured(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd`` in a fresh process (from the repository root, this environment); wall time, and the
    child's peak RSS / CPU time from ``os.wait4``."""
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"command failed with exit code {p.returncode}: {shlex.join(cmd)}\n{tail}")
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(ru.ru_maxrss * 1024 / 1e6, 1),
            "cpu_user_s": round(ru.ru_utime, 2), "cpu_sys_s": round(ru.ru_stime, 2)}


def run_captured(cmd: list[str]) -> tuple[float, str]:
    """(wall seconds, stdout) of ``cmd`` in a fresh process from the repository root, with this checkout
    importable (``PYTHONPATH``); exits with the command's stderr when it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return wall, res.stdout


def rel(p: Path) -> str:
    """``p`` relative to the repository root where it lies inside it, else as given."""
    p = Path(p)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else str(p)


def json_default(o, path=rel):
    """``json.dumps(default=...)`` for paths (``path(o)``) and numpy values."""
    if isinstance(o, Path):
        return path(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))



