"""One onnxruntime session that returns intermediate tensors, for every stage that observes them.

The tensors become extra graph outputs (:class:`~cet_onnx.graph.passes.extra_outputs.ExposeOutputsPass`);
those inside Loop / Scan bodies come out stacked over the iterations. onnxruntime refuses to stack a
tensor whose shape changes from one iteration to the next (a growing sequence), and fails the whole
run. Such a model is valid, so the session does not give up: when a run fails while tensors inside
Loop / Scan bodies are exposed, the tensors that break it are found by bisection (each test a session
that exposes only some of them), the session is rebuilt without those, they are listed in
:attr:`ExposedSession.dropped` with the reason, and the run is repeated. A failure that persists without
them is raised as it is.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import onnxruntime as ort

from cet_onnx.errors import first_line
from cet_onnx.graph import boundary
from cet_onnx.graph.boundary import Model
from cet_onnx.graph.passes._graph import values_by_name
from cet_onnx.graph.passes.extra_outputs import branch_owners, home_of, stack_depth, with_outputs
from cet_onnx.runner import Feed, make_session


def stacked(model: Model, names: Iterable[str]) -> list[str]:
    """Those of ``names`` whose tensor is inside a Loop / Scan body (it comes out stacked)."""
    graph = boundary.to_ir(model).graph
    owners = branch_owners(graph)
    values = values_by_name(graph, subgraphs=True)
    return [n for n in names if n in values and stack_depth(graph, home_of(values[n]), owners) > 0]


class ExposedSession:
    """``run(feed)`` → {name: value} of the model's tensors ``names`` (module docstring)."""

    #: session builds spent finding which Loop / Scan tensors break a run, before all the rest are dropped
    SEARCH_BUILDS = 16

    def __init__(self, model: Model, names: Iterable[str], providers: Sequence[str], typed: bool = True,
                 optimize: bool = False) -> None:
        self.model, self.providers, self.typed, self.optimize = model, providers, typed, optimize
        self.names = list(dict.fromkeys(names))
        self._stacked = set(stacked(model, self.names))
        self._quiet = ort.RunOptions()
        self._quiet.log_severity_level = 4   # a failure it recovers from is not an error to print
        #: tensor → why it is no longer returned
        self.dropped: dict[str, str] = {}
        self._session = self._build(self.names)

    def _build(self, names: list[str]):
        return make_session(with_outputs(self.model, names, self.typed), self.providers, self.optimize)

    def run(self, feed: Feed) -> dict[str, np.ndarray]:
        options = self._quiet if self._stacked else None
        try:
            return dict(zip(self.names, self._session.run(self.names, feed, options)))
        except Exception as exc:
            if not self._stacked:
                raise
            self._session = None   # one copy of the weights in onnxruntime at a time
            bad = self._breaking(sorted(self._stacked), feed, [self.SEARCH_BUILDS])
            if not bad:
                raise
            why = f"inside a Loop / Scan body whose iterations onnxruntime cannot stack ({_status(exc)})"
            self.dropped.update(dict.fromkeys(bad, why))
            self._stacked -= set(bad)
            self.names = [n for n in self.names if n not in bad]
            self._session = self._build(self.names)
            return self.run(feed)

    def _breaking(self, names: list[str], feed: Feed, builds: list[int]) -> list[str]:
        """Those of ``names`` (Loop / Scan tensors) whose exposure makes the run on ``feed`` fail, by bisection."""
        if not names:
            return []
        if builds[0] <= 0:
            return names
        builds[0] -= 1
        try:
            self._build(names).run(names, feed, self._quiet)
            return []
        except Exception:
            if len(names) == 1:
                return names
        half = len(names) // 2
        return self._breaking(names[:half], feed, builds) + self._breaking(names[half:], feed, builds)

    def close(self) -> None:
        """Let go of the onnxruntime session (it holds the model's weights)."""
        self._session = None


#: bytes of exposed tensors one run may return where a batch can run in pieces of fewer samples
RUN_MAX_BYTES = 2**27


def samples_per_run(feed: Feed, sessions: Sequence[ExposedSession]) -> int:
    """Samples whose exposed tensors in all ``sessions`` fit :data:`RUN_MAX_BYTES`, from one run of ``feed``'s
    first sample in each."""
    one = pieces(feed, 1)[0]
    per_sample = sum(np.asarray(v).nbytes for s in sessions for v in s.run(one).values())
    return max(1, int(RUN_MAX_BYTES // max(per_sample, 1)))


def pieces(feed: Feed, rows: int | None) -> list[Feed]:
    """``feed`` as runs of at most ``rows`` samples along axis 0 (``[feed]`` when ``rows`` is None or larger)."""
    n = int(np.shape(next(iter(feed.values())))[0]) if feed else 0
    if rows is None or rows >= n:
        return [feed]
    return [{k: v[i:i + rows] for k, v in feed.items()} for i in range(0, n, rows)]


def _status(exc: Exception) -> str:
    """onnxruntime's own message in ``exc``, without its prefix."""
    text = first_line(exc)
    return text.split("Status Message: ", 1)[-1].strip()
