"""Deployed speed: the float and the quantized model timed side by side in onnxruntime.

Both sessions are built with the same options (the execution providers of ``--device``,
``threads`` intra-op threads, every graph optimisation) and run in turns on the same feed, so
that load changes on a shared machine hit both alike; the figure is the median per model and
their ratio. Interleaving needs both sessions at once, so the caller skips models too large to
hold twice.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from cet_onnx.runner import Feed, make_session

WARMUP = 3
#: runs per turn: the first is run untimed, so that the previous session's still-spinning thread pool
#: (onnxruntime's default threads spin after each run) does not land on a timed one
BLOCK = 4
MIN_ROUNDS = 5
MAX_ROUNDS = 1000
SECONDS = 1.0   # past MIN_ROUNDS, rounds go on this long: a sub-millisecond model's median needs many runs


def latency_feed(batches: Sequence[Feed], samples: int, inputs: list | None = None) -> Feed:
    """The first ``samples`` samples of ``batches`` as one feed (inputs sliced along axis 0; an input whose
    first axis is not the batch, such as a scalar, is taken from the first batch as it is). With the model's
    ``inputs``: the batch size the model fixes instead of ``samples``, and where feeds are runs that cannot
    be stacked (:func:`~cet_onnx.calibration.data.run_reason`) the first run as it is."""
    samples, runs = _timed_samples(inputs, samples)
    first = batches[0]
    if runs:
        return dict(first)
    n = len(next(iter(first.values())))
    feed = {}
    for name, value in first.items():
        if np.ndim(value) == 0 or len(value) != n:
            feed[name] = value
            continue
        parts, have = [], 0
        for b in batches:
            parts.append(b[name][: samples - have])
            have += len(parts[-1])
            if have >= samples:
                break
        joined = np.concatenate(parts)
        while len(joined) < samples:   # fewer samples than asked for: repeat them
            joined = np.concatenate([joined, joined[: samples - len(joined)]])
        feed[name] = joined
    return feed


def interleaved_ms(sessions: Sequence[ort.InferenceSession], feed: Feed | Sequence[Feed], min_rounds: int = MIN_ROUNDS,
                   max_rounds: int = MAX_ROUNDS, seconds: float = SECONDS) -> tuple[list[float], int]:
    """Median milliseconds of ``session.run`` per session, and the rounds run. Each round every session takes a
    turn of :data:`BLOCK` runs (the order rotated each round); at least ``min_rounds`` rounds, then more until
    ``seconds`` have passed or ``max_rounds`` are run. ``feed``: one for all, or one per session."""
    feeds = list(feed) if isinstance(feed, (list, tuple)) else [feed] * len(sessions)
    for s, f in zip(sessions, feeds):
        for _ in range(WARMUP):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    rounds = 0

    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < seconds):
        for j in range(len(sessions)):
            k = (rounds + j) % len(sessions)
            sessions[k].run(None, feeds[k])
            for _ in range(BLOCK - 1):
                t0 = time.perf_counter()
                sessions[k].run(None, feeds[k])
                times[k].append(time.perf_counter() - t0)
        rounds += 1
    return [float(np.median(t) * 1e3) for t in times], rounds


def _timed_samples(inputs: list | None, requested: int) -> tuple[int, bool]:
    """(samples per timed run, whether a run's feed is timed as it is): the batch size the model fixes, if
    any (it runs no other), else ``requested``."""
    if inputs is None:
        return requested, False
    from cet_onnx.calibration.data import fixed_batch, run_reason

    if run_reason(inputs) is not None:
        return requested, True
    return fixed_batch(inputs) or requested, False


def compare_latency(model: Any, qmodel: Any, batches: Sequence[Feed], providers: Sequence[str],
                    samples: int = 1, threads: int = 0, inputs: list | None = None) -> dict[str, Any]:
    """Median latency of the float model and the quantized one on ``samples`` samples (with the model's
    ``inputs``, as :func:`latency_feed` takes them), and their ratio."""
    feed = latency_feed(batches, samples, inputs)
    samples, runs = _timed_samples(inputs, samples)
    sessions = [make_session(model, providers, threads=threads), make_session(qmodel, providers, threads=threads)]
    (fp32, quant), rounds = interleaved_ms(sessions, feed)
    return {"batch": "one run's feed" if runs else samples, "threads": threads or "onnxruntime default", "provider": sessions[0].get_providers()[0],
            "fp32_ms": round(fp32, 4), "quantized_ms": round(quant, 4), "ratio": round(quant / fp32, 4),
            "interleaved_runs": rounds * (BLOCK - 1)}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what the platform says), and on x86 whether it has VNNI
    (onnxruntime's u8 × s8 kernels saturate without it): timings are only comparable on one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")),
                platform.processor() or "unknown CPU")
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    if flags & {"avx512_vnni", "avx_vnni"}:
        return f"{name} (VNNI)"
    return f"{name} (AVX2, no VNNI)" if "avx2" in flags else name
