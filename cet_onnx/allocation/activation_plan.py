"""Activation precision per tensor: 8-bit, 16-bit or float, chosen by probes and an exact solve (``--act-precision``).

Static 8-bit activations destroy some models (a wide-range tensor, a LayerNorm statistic) while
most of their activations take 8 bits without harm. An activation quantizer's error is a known
perturbation, so it is measured like a weight's, and the exact solver picks each tensor's precision:

* ``uniform``: every planned tensor at ``--act-bits`` (cet-onnx before this choice existed);
* ``auto`` (default): ``uniform`` when the model as it will be written (its quantized weights, every planned
  tensor at ``--act-bits``) meets the target on the probe samples; per tensor otherwise;
* ``solve``: per tensor always (the fastest assignment that meets the target).

The **target** is the output metric of :mod:`cet_onnx.verify` on every float output, measured on the probe
samples (the first ``--probe-size`` calibration samples, never the held-out ones): top-1 agreement ≥
``min_agreement`` for logits and probabilities, mean cosine ≥ ``min_cosine`` for embeddings, SQNR ≥
``min_sqnr_db`` for other tensors.

**Per tensor**, for every planned tensor ``t``:

1. ``delta_loss[t, b]``: the probe loss (``--loss``, else the label-free loss the output's kind calls for)
   of the float model with ``t`` alone quantized at ``b`` bits (8 and 16; 16-bit ranges calibrated on their
   own), against the float model's outputs (:mod:`.activation_probes`);
2. ``delta_ms[t, ·]``: the model as it will be written with every tensor at 8 bits, timed against the same
   model with ``t`` at 16 bits and with ``t`` float (interleaved runs at ``--latency-batch``); 8 bits cost 0.
   A measured *speed-up* is not believed: one tensor off 8 bits only adds work or breaks a fusion, and on a
   shared CPU the per-tensor differences are noise of several ms either way (PP-OCRv4 rec, a 15 ms model:
   −10 … +5 ms, whose sum predicted a model 100 ms faster than the all-8-bit one); so each off-8-bit choice
   costs its measured slow-down, at least ``TIE_MS`` (which keeps the fewest tensors off 8 bits on a tie).
   A 16-bit form no faster than float is dominated (float loses nothing) and gets no loss probe;
3. the exact solve (:func:`~cet_onnx.allocation.solver.solve_loss_budget`, HiGHS): least ``Σ delta_ms``
   with ``Σ delta_loss ≤ τ``, one precision per tensor;
4. closed loop: the largest ``τ`` of a geometric grid (from the smallest positive ``delta_loss`` to the
   all-8-bit sum) whose solution, written with the real quantized weights, *measures* within the target is
   found by bisection; that assignment is kept.

When every activation float still misses the target, the quantized weights cause the loss (checked before
any probe: one more run of the probe samples) and no activation choice can reach it: the target is lowered to
what the weights alone give as an all-8-bit model would hold them (±63 codes where integer kernels would read
them, activations float; one more run), less ``SLACK`` (half a point of top-1 agreement, 0.001 of cosine, 1 dB
of SQNR),
and the plan above runs against that; the summary says loudly that the weights miss (the ``--verify-min-*``
gates turn that into exit 1), and ``met`` is false. Without timing
(``--latency-batch 0``) the solve keeps the fewest tensors off 8 bits.

Every check runs the weights the candidate would be written with: an INT8 weight that a u8 × s8 kernel
reads takes ±63 codes (:mod:`cet_onnx.graph.integer_kernels`), and when a candidate leaves its layer's
input float no such kernel reads it, so it is rounded again with ±127 codes (:class:`FullRange`; the
plan's ``full_range`` holds those of the chosen assignment).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from cet_onnx.allocation.activation_probes import activation_ranges
from cet_onnx.allocation.losses import default_loss, is_probability, loss_value
from cet_onnx.allocation.solver import Infeasible, solve_loss_budget
from cet_onnx.calibration import padding
from cet_onnx.calibration.probe_batches import probe_batches
from cet_onnx.graph.act_mode import ACT_PRECISIONS  # noqa: F401  (the choices, re-exported)
from cet_onnx.graph.integer_kernels import integer_kernel_weights
from cet_onnx.graph.output_kind import output_kinds
from cet_onnx.graph.rewriter import rewrite
from cet_onnx.io import external_data
from cet_onnx.latency import interleaved_ms, latency_feed
from cet_onnx.prepared import Prepared
from cet_onnx.progress import Progress
from cet_onnx.quant.quantizer import SATURATION_SAFE_BITS, ActivationParams, QuantizedWeight, activation_params
from cet_onnx.runner import concat_outputs, make_session, run_batches
from cet_onnx.verify import OutputMetrics, compare_outputs

#: candidate precisions of one tensor, in the solver's column order
PRECISIONS = ("int8", "int16", "float")
#: the least latency cost of a tensor off 8 bits (step 2 of the module docstring)
TIE_MS = 1e-3
#: points of the τ grid the closed loop bisects
TAU_POINTS = 24
#: what activations may lose beyond the quantized weights alone where those miss the target (``Target.below_weights``)
SLACK = {"agreement": 0.005, "cosine": 0.001, "sqnr_db": 1.0}
#: timing of one variant pair: fewer rounds than a whole-model comparison (there is one per tensor)
VARIANT_ROUNDS = (5, 40, 0.5)


@dataclass(frozen=True)
class Target:
    """What the written model's outputs must keep, measured on the probe samples."""

    min_agreement: float = 0.98
    min_cosine: float = 0.99
    min_sqnr_db: float = 20.0

    def below_weights(self, weights_alone: Sequence[OutputMetrics]) -> "Target":
        """This target, lowered where the quantized weights alone (every activation float) miss it: to what they
        give, less the slack activations may add (``SLACK``), so activations are held to the weights' level."""
        agree = [m.top1_agreement for m in weights_alone if m.top1_agreement is not None]
        cos = [m.mean_cosine for m in weights_alone if m.top1_agreement is None and m.mean_cosine is not None]
        sqnr = [m.sqnr_db for m in weights_alone if m.top1_agreement is None and m.mean_cosine is None
                and not np.isnan(m.sqnr_db)]
        return Target(min(self.min_agreement, min(agree, default=1.0) - SLACK["agreement"]),
                      min(self.min_cosine, min(cos, default=1.0) - SLACK["cosine"]),
                      min(self.min_sqnr_db, min(sqnr, default=np.inf) - SLACK["sqnr_db"]))

    def misses(self, metrics: Sequence[OutputMetrics]) -> list[str]:
        """One line per float output below its target (empty: the target is met)."""
        out = []
        for m in metrics:
            if m.top1_agreement is not None:
                if m.top1_agreement < self.min_agreement:
                    out.append(f"{m.name}: top-1 agreement {100 * m.top1_agreement:.2f} % < {100 * self.min_agreement:g} %")
            elif m.mean_cosine is not None:
                if m.mean_cosine < self.min_cosine:
                    out.append(f"{m.name}: mean cosine {m.mean_cosine:.5f} < {self.min_cosine:g}")
            elif not np.isnan(m.sqnr_db) and m.sqnr_db < self.min_sqnr_db:
                out.append(f"{m.name}: SQNR {m.sqnr_db:.2f} dB < {self.min_sqnr_db:g} dB")
        return out


def describe(metrics: Sequence[OutputMetrics]) -> str:
    """The metric each output's target reads, in a few words."""
    parts = []
    for m in metrics:
        if m.top1_agreement is not None:
            parts.append(f"{m.name} agreement {100 * m.top1_agreement:.2f} %")
        elif m.mean_cosine is not None:
            parts.append(f"{m.name} cosine {m.mean_cosine:.5f}")
        elif not np.isnan(m.sqnr_db):
            parts.append(f"{m.name} SQNR {m.sqnr_db:.2f} dB")
    return ", ".join(parts)


class OutputCheck:
    """The float model's outputs on the probe batches; scores any model against them (loss and target)."""

    def __init__(self, model: ir.Model, batches: Sequence[Any], providers: Sequence[str], loss: str | None,
                 loss_output: str, samples: int) -> None:
        self.batches, self.providers = list(batches), list(providers)
        session = make_session(model, providers)
        self.names = [o.name for o in session.get_outputs()]
        self.reference = concat_outputs(run_batches(session, self.batches, "activation plan: float outputs"))
        self.kinds = output_kinds(model.graph)
        self.mask = padding.batch_mask(self.batches)
        self.loss_index = self.names.index(loss_output)
        ref = self.reference[self.loss_index]
        self.loss_name = loss or default_loss(ref, False, self.kinds.get(loss_output))
        self.positions = padding.real_positions(self.mask, ref)
        self.probabilities = is_probability(ref)
        self.runs = 0
        self.samples = samples   # how many samples the batches hold

    def outputs(self, model: ir.Model) -> list[np.ndarray]:
        """Every output of ``model`` on the probe batches (a session dropped after)."""
        session = make_session(model, self.providers)
        self.runs += 1
        return concat_outputs(run_batches(session, self.batches, "activation plan: a candidate", self.names))

    def loss(self, outputs: Sequence[np.ndarray]) -> float:
        ref = padding.select(self.reference[self.loss_index], self.positions)
        return loss_value(self.loss_name, ref, padding.select(outputs[self.loss_index], self.positions),
                          probabilities=self.probabilities)

    def metrics(self, outputs: Sequence[np.ndarray]) -> list[OutputMetrics]:
        return compare_outputs(self.names, self.reference, outputs, self.kinds, self.mask)


@dataclass
class ActivationPlan:
    """The activation precisions to write (None: weight-only), the tensors the plan leaves float (why), its report,
    and the INT8 weights to write at full range instead (no integer kernel reads them under this plan)."""

    params: dict[str, ActivationParams] | None
    left_float: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    full_range: dict[str, QuantizedWeight] = field(default_factory=dict)


class FullRange:
    """The quantized weights an assignment of activations is written with (module docstring, last paragraph)."""

    def __init__(self, p: Prepared, opts: Any, qweights: Mapping[str, QuantizedWeight]) -> None:
        self.p, self.qweights, self.clip = p, qweights, opts.weights.clip
        self.enabled = not opts.weights.int8_full_range
        self.wide: dict[str, QuantizedWeight] = {}

    def freed(self, chosen: Mapping[str, ActivationParams]) -> dict[str, QuantizedWeight]:
        """The ±63 weights no integer kernel reads under ``chosen``, rounded again at ±127."""
        if not self.enabled:
            return {}
        still = integer_kernel_weights(self.p.model.graph, self.p.weights, "static", chosen)
        out = {}
        for w in self.p.weights:
            qw = self.qweights.get(w.name)
            if w.integer_kernel and w.name not in still and qw is not None and qw.fmt.bits == SATURATION_SAFE_BITS:
                if w.name not in self.wide:
                    from cet_onnx.rounding.plan import quantize_weights   # rounding imports the stages that call this
                    self.wide.update(quantize_weights(self.p.values, [replace(w, integer_kernel=False)],
                                                      {w.name: replace(qw.fmt, bits=8)}, self.clip, self.p.roundings))
                out[w.name] = self.wide[w.name]
        return out

    def weights(self, chosen: Mapping[str, ActivationParams]) -> dict[str, QuantizedWeight]:
        return {**self.qweights, **self.freed(chosen)}


def output_check(p: Prepared, opts: Any) -> tuple[OutputCheck, Target]:
    """The float model's outputs on the probe samples (the first ``--probe-size`` calibration samples) and the
    target the written model must keep on them."""
    from cet_onnx.allocation.stage import loss_output   # the stage imports this module's callers
    probe = probe_batches(p, min(opts.allocation.probe_size, len(p.calib_samples)))
    check = OutputCheck(p.model, probe.batches, p.providers, opts.allocation.loss,
                        loss_output(p.model, opts.allocation.loss_output), probe.samples)
    acts = opts.activations
    return check, Target(acts.min_agreement, acts.min_cosine, acts.min_sqnr_db)


def plan_activations(p: Prepared, opts: Any, qweights: Mapping[str, QuantizedWeight]) -> ActivationPlan:
    """Each planned activation's precision (module docstring). ``opts``: the :class:`~cet_onnx.options.QuantizeOptions`."""
    acts = opts.activations
    if p.act_mode != "static" or not p.act_params:
        return ActivationPlan(p.act_params, report={"precision": "uniform", "why": "no static activations"})
    params = dict(p.act_params)
    if acts.precision == "uniform":
        return ActivationPlan(params, report={"precision": "uniform", "why": "--act-precision uniform"})
    if external_data.data_dir(p.model) is not None:
        return ActivationPlan(params, report={"precision": "uniform", "why": "not checked: the model's weights stay "
                                              "on disk (too large to run the written model beside the float one)"})
    check, target = output_check(p, opts)
    full = FullRange(p, opts, qweights)

    def written(chosen: Mapping[str, ActivationParams]) -> list[OutputMetrics]:
        return check.metrics(check.outputs(rewrite(p.model, p.weights, full.weights(chosen), dict(chosen)).model))

    uniform = written(params)
    base = {"probe_samples": check.samples, "target": vars(target), "uniform": describe(uniform)}
    if acts.precision == "auto" and not target.misses(uniform):
        return ActivationPlan(params, report={"precision": "uniform", **base, "checks": check.runs,
                                              "why": f"auto: every planned tensor at {acts.bits} bits meets the target "
                                                     f"({describe(uniform)})"})
    missed = target.misses(uniform)
    floats = written({}) if missed else None
    weights_miss = floats is not None and bool(target.misses(floats))
    if weights_miss:   # no activation choice can reach the target: hold activations to the weights' own level
        level = floats if not full.freed({}) else check.metrics(check.outputs(
            rewrite(p.model, p.weights, dict(qweights), {}).model))
        target = target.below_weights(level)
        base["weights_alone"], base["target_below_weights"] = describe(level), vars(target)
    if weights_miss and acts.precision == "auto" and not target.misses(uniform):
        plan = ActivationPlan(params, report={"precision": "uniform", **base, "checks": check.runs,
                                              "why": f"auto: every planned tensor at {acts.bits} bits keeps the level "
                                                     f"of the weights alone ({describe(uniform)})"})
    else:
        plan = _per_tensor(p, opts, qweights, check, target, params, written, base, missed, floats)
    if weights_miss:
        plan.report["why"] += "; the weights alone miss it too, so activations are held to their level"
        plan.report["met_weights_level"] = plan.report.get("met", True)
        plan.report["met"] = False
        plan.report["warning"] = _weights_warning(describe(floats), p, qweights)
    plan.full_range = full.freed(plan.params or {})
    if plan.full_range:
        plan.report["full_range"] = sorted(plan.full_range)
    return plan


def _weights_warning(floats: str, p: Prepared, qweights: Mapping[str, QuantizedWeight]) -> str:
    """The loud line when the quantized weights alone miss the target."""
    narrow = any(w.integer_kernel and w.name in qweights and qweights[w.name].fmt.bits == SATURATION_SAFE_BITS
                 for w in p.weights)
    hint = " (or --int8-full-range where the server's CPU has VNNI: +-127 codes instead of +-63)" if narrow else ""
    return (f"the quantized weights alone miss the activation target (every activation float: {floats}); "
            f"activations were held to that level (at most {100 * SLACK['agreement']:g} pt of agreement, "
            f"{SLACK['cosine']:g} of cosine or {SLACK['sqnr_db']:g} dB below it); give the weights more bits{hint}")


def _per_tensor(p: Prepared, opts: Any, qweights: Mapping[str, QuantizedWeight], check: OutputCheck, target: Target,
                params: dict[str, ActivationParams], written: Any, base: dict[str, Any], missed: list[str],
                floats: list[OutputMetrics] | None) -> ActivationPlan:
    """Probes, timings, the solve and its closed loop (module docstring, steps 1–4)."""
    acts = opts.activations
    names = list(params)
    wide = _wide_params(p, acts, names)
    delta_ms = _timings(p, opts, qweights, params, wide) if opts.run.latency_batch else None
    if delta_ms is None:   # no timing: the fewest tensors off 8 bits
        delta_ms = np.array([[0.0, 1.0, 1.0]] * len(names))
    else:                  # no speed-up believed from leaving a tensor off 8 bits (module docstring, step 2)
        delta_ms[:, 1:] = np.maximum(delta_ms[:, 1:], 0.0) + TIE_MS
    delta_ms[[names.index(t) for t in names if t not in wide], 1] = np.inf
    dominated = np.isfinite(delta_ms[:, 1]) & (delta_ms[:, 1] >= delta_ms[:, 2])
    delta_ms[dominated, 1] = np.inf
    costs = _sensitivities(p, check, params, wide, names, np.isfinite(delta_ms[:, 1]))
    costs[~np.isfinite(delta_ms)] = np.inf
    choice, history = _closed_loop(costs, delta_ms, names, params, wide, written, target, floats)
    chosen = _params_of(choice, names, params, wide)
    left = {t: "activation plan: float (its 8-bit quantizer alone costs "
               f"{costs[i, 0]:.4g} of {check.loss_name})" for i, t in enumerate(names) if PRECISIONS[choice[i]] == "float"}
    final = history[-1]
    report = {"precision": "per tensor", **base,
              "why": ("--act-precision solve" if acts.precision == "solve" else
                      "auto: every planned tensor at 8 bits misses the target (" + "; ".join(missed) + ")"),
              "loss": check.loss_name, "latency_measured": bool(opts.run.latency_batch),
              "tensors": [{"tensor": t, "chosen": PRECISIONS[choice[i]],
                           "delta_loss": {PRECISIONS[j]: _num(costs[i, j]) for j in range(3)},
                           "delta_ms": {PRECISIONS[j]: _num(delta_ms[i, j]) for j in range(3)}}
                          for i, t in enumerate(names)],
              "counts": {k: int(sum(PRECISIONS[c] == k for c in choice)) for k in PRECISIONS},
              "closed_loop": history, "met": final["met"], "checks": check.runs}
    if "warning" in final:
        report["warning"] = final["warning"]
    return ActivationPlan(chosen, left, report)


def _all_float_step(n: int, measured: str, met: bool) -> dict[str, Any]:
    """The closed-loop entry of every activation float (the kept fallback), with the warning when it misses too."""
    step = {"tau": None, "counts": {"int8": 0, "int16": 0, "float": n}, "measured": measured, "met": met, "kept": True}
    if not met:
        step["warning"] = (f"no activation precision meets the target: with every activation float the quantized "
                           f"weights alone give {measured}; activations are left float, give the weights more bits")
    return step


def _num(x: float) -> float | None:
    return round(float(x), 8) if np.isfinite(x) else None


def _wide_params(p: Prepared, acts: Any, names: Sequence[str]) -> dict[str, ActivationParams]:
    """16-bit parameters of each planned tensor, from its own 16-bit range."""
    ranges, _ = activation_ranges(p, acts.method, acts.symmetric, 16)
    return {t: activation_params(*ranges[t], 16, acts.symmetric) for t in names if t in ranges}


def _timings(p: Prepared, opts: Any, qweights: Mapping[str, QuantizedWeight], params: dict[str, ActivationParams],
             wide: dict[str, ActivationParams]) -> np.ndarray:
    """``[tensors, 3]`` ms: the written model (every tensor 8-bit) against it with one tensor 16-bit / float."""
    feed = latency_feed(p.verify_batches or p.calib_batches, opts.run.latency_batch, p.inputs)
    threads = opts.run.latency_threads

    def session(chosen: dict[str, ActivationParams]) -> Any:
        return make_session(rewrite(p.model, p.weights, dict(qweights), chosen, widen=opts.run.widen_low_bit).model,
                            p.providers, threads=threads)

    base = session(params)
    out = np.zeros((len(params), 3))
    bar = Progress(len(params), "activation plan: timing each tensor", "tensor")
    try:
        for i, t in enumerate(params):
            rest = {k: v for k, v in params.items() if k != t}
            variants = [base, session({**rest, t: wide[t]}) if t in wide else None, session(rest)]
            timed = [s for s in variants if s is not None]
            ms, _ = interleaved_ms(timed, feed, *VARIANT_ROUNDS)
            it = iter(ms)
            b = next(it)
            out[i] = [0.0, next(it) - b if variants[1] is not None else np.inf, next(it) - b]
            bar.update()
    finally:
        bar.close()
    return out


def _sensitivities(p: Prepared, check: OutputCheck, params: dict[str, ActivationParams],
                   wide: dict[str, ActivationParams], names: Sequence[str], probe16: np.ndarray) -> np.ndarray:
    """``[tensors, 3]`` ΔL: each tensor alone at 8 / 16 bits in the float model (weights float too); float 0."""
    costs = np.zeros((len(names), 3))
    base = check.loss(check.reference)
    jobs = [(i, 0, params[t]) for i, t in enumerate(names)] + \
           [(i, 1, wide[t]) for i, t in enumerate(names) if probe16[i]]
    costs[:, 1] = np.inf
    bar = Progress(len(jobs), "activation plan: probing each tensor", "probe")
    try:
        for i, j, prm in jobs:
            model = rewrite(p.model, p.weights, {}, {names[i]: prm}).model
            costs[i, j] = check.loss(check.outputs(model)) - base
            bar.update()
    finally:
        bar.close()
    return costs


def _params_of(choice: np.ndarray, names: Sequence[str], params: dict[str, ActivationParams],
               wide: dict[str, ActivationParams]) -> dict[str, ActivationParams]:
    picked = {"int8": params, "int16": wide}
    return {t: picked[PRECISIONS[c]][t] for t, c in zip(names, choice) if PRECISIONS[c] != "float"}


def _closed_loop(costs: np.ndarray, delta_ms: np.ndarray, names: Sequence[str], params: dict[str, ActivationParams],
                 wide: dict[str, ActivationParams], written: Any, target: Target, floats: list[OutputMetrics] | None
                 ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The fastest solution whose written model meets the target, by bisection over the τ grid; else all float
    (``floats``: the all-float model's metrics when already measured)."""
    finite = np.where(np.isfinite(costs), costs, np.nan)
    positive = finite[finite > 0]
    top = float(np.nansum(np.clip(finite[:, 0], 0, None)))
    grid = [0.0] + (list(np.geomspace(positive.min(), max(top, positive.min()), TAU_POINTS)) if positive.size else [])
    history: list[dict[str, Any]] = []
    entries: dict[tuple, dict[str, Any]] = {}

    def trial(tau: float) -> tuple[np.ndarray, dict[str, Any]] | None:
        try:
            sol = solve_loss_budget(costs, delta_ms, tau)
        except Infeasible:
            return None
        key = tuple(int(c) for c in sol.choice)
        if key not in entries:
            metrics = written(_params_of(sol.choice, names, params, wide))
            entries[key] = {"tau": tau, "predicted_loss": sol.cost, "predicted_ms": sol.size,
                            "counts": {k: int(sum(PRECISIONS[c] == k for c in sol.choice)) for k in PRECISIONS},
                            "measured": describe(metrics), "met": not target.misses(metrics)}
            history.append(entries[key])
        return sol.choice, entries[key]

    best = None
    lo, hi = 0, len(grid) - 1
    first = trial(grid[0])
    if first is not None and first[1]["met"]:
        best = first
        while lo < hi:   # invariant: grid[lo] met the target
            mid = (lo + hi + 1) // 2
            got = trial(grid[mid])
            if got is not None and got[1]["met"]:
                lo, best = mid, got
            else:
                hi = mid - 1
    if best is None:
        choice = np.full(len(names), PRECISIONS.index("float"))
        metrics = written({}) if floats is None else floats
        history.append(_all_float_step(len(names), describe(metrics), not target.misses(metrics)))
        return choice, history
    history.append({**best[1], "kept": True})
    return best[0], history
