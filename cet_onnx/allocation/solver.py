"""Exact bit allocation: a multiple-choice knapsack solved with ``scipy.optimize.milp`` (HiGHS).

Every weight ``i`` picks exactly one candidate format ``f`` (a bit-width and a scale
granularity), with a real byte cost ``s[i,f]`` (codes + scales + zero points) and a predicted
loss change ``c[i,f]``. Layer costs add up, so

* under a size budget ``B``: minimise ``Σ c[i,f] x[i,f]`` s.t. ``Σ s[i,f] x[i,f] ≤ B``;
* under a loss budget ``E``: minimise ``Σ s[i,f] x[i,f]`` s.t. ``Σ c[i,f] x[i,f] ≤ E``;

with ``x`` binary and ``Σ_f x[i,f] = 1`` for each ``i``; any :class:`Limit` (the measured latency
of each format, ``--max-latency``) adds one more row ``Σ t[i,f] x[i,f] ≤ T`` to either problem. Costs may be negative (a first-order
term that lowers the loss); the solver uses that. Unavailable candidates carry ``inf`` cost.
Pure functions: arrays in, choice indices out.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array


class Infeasible(ValueError):
    """No assignment meets the budget."""


@dataclass
class Solution:
    choice: np.ndarray     # format index per weight
    size: float            # total bytes
    cost: float            # total predicted loss change


def _one_hot_rows(n: int, k: int) -> coo_array:
    rows = np.repeat(np.arange(n), k)
    cols = np.arange(n * k)
    return coo_array((np.ones(n * k), (rows, cols)), shape=(n, n * k))


@contextlib.contextmanager
def _c_stdout_silenced():
    """HiGHS prints debug lines straight to file descriptor 1; keep them out of ``--json`` output."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


@dataclass(frozen=True)
class Limit:
    """One more resource row of the MILP: ``Σ cost[i,f] x[i,f] ≤ bound`` (measured latency, say)."""

    cost: np.ndarray    # [weights, formats]; ignored where a format is unavailable
    bound: float
    name: str = "latency"

    def total(self, choice: np.ndarray) -> float:
        return float(np.asarray(self.cost)[np.arange(len(choice)), choice].sum())

    def holds(self, choice: np.ndarray) -> bool:
        return self.total(choice) <= self.bound + 1e-9


def _solve(objective: np.ndarray, constraint: np.ndarray, bound: float, n: int, k: int,
           available: np.ndarray, limits: Sequence[Limit] = ()) -> np.ndarray:
    ub = available.astype(float).ravel()
    cons = [LinearConstraint(_one_hot_rows(n, k), 1, 1),
            LinearConstraint(constraint.reshape(1, -1), -np.inf, bound)]
    cons += [LinearConstraint(np.where(available, np.asarray(lim.cost, np.float64), 0.0).reshape(1, -1), -np.inf,
                              lim.bound) for lim in limits]
    with _c_stdout_silenced():
        res = milp(objective, integrality=np.ones(n * k), bounds=Bounds(0, ub), constraints=cons,
                   options={"mip_rel_gap": 1e-9, "time_limit": 120})
    if res.x is None:
        raise Infeasible(res.message)
    return np.argmax(res.x.reshape(n, k), axis=1)


def _prepare(costs: np.ndarray, sizes: np.ndarray):
    costs = np.asarray(costs, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    if costs.shape != sizes.shape or costs.ndim != 2:
        raise ValueError("costs and sizes must both be [weights, formats]")
    available = np.isfinite(costs) & np.isfinite(sizes)
    if not available.any(axis=1).all():
        raise ValueError("every weight needs at least one available format")
    return np.where(available, costs, 0.0), np.where(available, sizes, 0.0), available


def _pack(choice: np.ndarray, costs: np.ndarray, sizes: np.ndarray) -> Solution:
    idx = np.arange(len(choice))
    return Solution(choice, float(sizes[idx, choice].sum()), float(costs[idx, choice].sum()))


def min_size(sizes: np.ndarray, available: np.ndarray | None = None) -> float:
    """Smallest total size any assignment reaches."""
    s = np.where(available if available is not None else np.isfinite(sizes), sizes, np.inf)
    return float(s.min(axis=1).sum())


def solve_size_budget(costs: np.ndarray, sizes: np.ndarray, budget: float, limits: Sequence[Limit] = ()) -> Solution:
    """Least predicted loss with total size ≤ ``budget`` bytes (and every one of ``limits``)."""
    c, s, avail = _prepare(costs, sizes)
    n, k = c.shape
    if min_size(s, avail) > budget + 1e-9:
        raise Infeasible(f"the smallest assignment needs {min_size(s, avail):.0f} bytes, budget is {budget:.0f}")
    # tiny size tie-break: among equal-loss assignments prefer the smaller one
    scale = max(np.abs(c[avail]).max(initial=0.0), 1e-30) * 1e-9 / max(s.max(), 1.0)
    choice = _solve((c + scale * s).ravel(), s.ravel(), budget, n, k, avail, limits)
    return _pack(choice, c, s)


def solve_loss_budget(costs: np.ndarray, sizes: np.ndarray, max_cost: float, limits: Sequence[Limit] = ()) -> Solution:
    """Smallest total size with predicted loss change ≤ ``max_cost`` (and every one of ``limits``)."""
    c, s, avail = _prepare(costs, sizes)
    n, k = c.shape
    best = float(np.where(avail, c, np.inf).min(axis=1).sum())
    if best > max_cost:
        raise Infeasible(f"the least predicted loss change is {best:.4g}, above the budget {max_cost:.4g}")
    choice = _solve(s.ravel(), c.ravel(), max_cost, n, k, avail, limits)
    return _pack(choice, c, s)


def pareto_front(costs: np.ndarray, sizes: np.ndarray, points: int = 16, limits: Sequence[Limit] = ()) -> list[Solution]:
    """Optimal (size, predicted loss) pairs across the whole budget range, smallest first (under ``limits``:
    the front of the assignments that meet them; budgets no assignment meets are left out)."""
    c, s, avail = _prepare(costs, sizes)
    lo = min_size(s, avail)
    hi = float(np.where(avail, s, -np.inf).max(axis=1).sum())
    front: list[Solution] = []
    for budget in np.linspace(lo, hi, points):
        try:
            sol = solve_size_budget(np.where(avail, c, np.inf), np.where(avail, s, np.inf), float(budget), limits)
        except Infeasible:
            continue
        if not front or sol.cost < front[-1].cost - 1e-15 or sol.size < front[-1].size:
            front.append(sol)
    return front
