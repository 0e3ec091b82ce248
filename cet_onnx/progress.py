"""What a run tells the user on stderr: warnings, and a dependency-free progress bar with rate and ETA.

On a terminal the bar redraws one line; elsewhere (CI logs) it prints a line at most
every few seconds so logs stay short. ``quiet=True`` silences the bars (never the warnings).
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar of this process."""
    global _quiet
    _quiet = quiet


def warn(msg: str) -> None:
    """Print a warning line on stderr."""
    print(f"WARNING: {msg}", file=sys.stderr)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60:d}:{s % 60:02d}"


class Progress:
    """Counts work units and shows ``desc  n/total  rate/s  ETA`` on stderr."""

    def __init__(self, total: int | None, desc: str, unit: str = "it") -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.start = time.perf_counter()
        self._last_draw = self.start if not sys.stderr.isatty() else 0.0
        self._tty = sys.stderr.isatty()
        self._drawn_n = -1

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        interval = 0.1 if self._tty else 5.0
        if now - self._last_draw >= interval:
            self._draw(now)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.n / elapsed if elapsed > 0 else 0.0

    def _draw(self, now: float, final: bool = False) -> None:
        if _quiet:
            return
        self._last_draw = now
        self._drawn_n = self.n
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else 0.0
            text = (f"{self.desc}: {self.n}/{self.total} {self.unit} "
                    f"[{_fmt_seconds(elapsed)}<{_fmt_seconds(eta)}, {rate:.1f} {self.unit}/s]")
        else:
            text = f"{self.desc}: {self.n} {self.unit} [{_fmt_seconds(elapsed)}, {rate:.1f} {self.unit}/s]"
        if self._tty:
            sys.stderr.write("\r" + text + ("\n" if final else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if (self.n or self.total) and (self._tty or self._drawn_n != self.n):
            self._draw(time.perf_counter(), final=True)


def track(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Yield from ``iterable`` while drawing a progress bar."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = Progress(total, desc, unit)
    try:
        for item in iterable:
            yield item
            bar.update()
    finally:
        bar.close()
