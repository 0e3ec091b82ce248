"""Wall time and memory of each named pipeline stage (the report's ``timings_s`` and ``peak_rss_mb``)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (10^6 bytes); None where the OS does not say."""
    try:
        import resource
    except ImportError:   # Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1e6 if sys.platform == "darwin" else 1e3), 1)   # macOS reports bytes


class Timer:
    """Seconds per named stage (a stage entered again adds to its total), and the process's peak
    RSS when each stage last ended, in the order they last ended: the first stage whose figure
    equals the final peak is the one that reached it."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - t0, 4)
            peak = peak_rss_mb()
            if peak is not None:
                self.peak_mb.pop(name, None)   # keeps the order of the last ends
                self.peak_mb[name] = peak
