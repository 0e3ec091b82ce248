"""The exact multiple-choice knapsack against brute force."""

import itertools

import numpy as np
import pytest

from cet_onnx.allocation.solver import Infeasible, Limit, pareto_front, solve_loss_budget, solve_size_budget

RNG = np.random.default_rng(7)


def _brute(costs, sizes, budget=None, max_cost=None):
    n, k = costs.shape
    best = None
    for ch in itertools.product(range(k), repeat=n):
        c = sum(costs[i, j] for i, j in enumerate(ch))
        s = sum(sizes[i, j] for i, j in enumerate(ch))
        if not (np.isfinite(c) and np.isfinite(s)):
            continue
        if budget is not None and s <= budget and (best is None or c < best[0] - 1e-12):
            best = (c, s)
        if max_cost is not None and c <= max_cost and (best is None or s < best[1] - 1e-12):
            best = (c, s)
    return best


@pytest.mark.parametrize("trial", range(15))
def test_size_budget_matches_brute_force(trial):
    n, k = 5, 4
    costs = RNG.normal(size=(n, k))          # negative costs allowed: a loss can go down
    sizes = RNG.integers(1, 20, size=(n, k)).astype(float)
    costs[RNG.random((n, k)) < 0.15] = np.inf  # some formats unavailable
    costs[:, 0] = np.where(np.isfinite(costs[:, 0]), costs[:, 0], 0.0)
    budget = float(RNG.uniform(0.8 * sizes.min(axis=1).sum(), sizes.sum()))
    expect = _brute(costs, sizes, budget=budget)
    try:
        sol = solve_size_budget(costs, sizes, budget)
    except Infeasible:
        assert expect is None
        return
    assert expect is not None and np.isclose(sol.cost, expect[0]) and sol.size <= budget + 1e-9


@pytest.mark.parametrize("trial", range(10))
def test_loss_budget_matches_brute_force(trial):
    n, k = 5, 3
    costs = np.abs(RNG.normal(size=(n, k)))
    sizes = RNG.integers(1, 20, size=(n, k)).astype(float)
    max_cost = float(RNG.uniform(costs.min(1).sum(), costs.sum()))
    expect = _brute(costs, sizes, max_cost=max_cost)
    sol = solve_loss_budget(costs, sizes, max_cost)
    assert np.isclose(sol.size, expect[1]) and sol.cost <= max_cost + 1e-9


def test_negative_cost_is_used():
    costs = np.array([[-0.5, 0.0], [0.2, 0.0]])   # format 0 of weight 0 lowers the loss
    sizes = np.array([[1.0, 4.0], [1.0, 4.0]])
    sol = solve_size_budget(costs, sizes, 8.0)
    assert sol.choice[0] == 0 and sol.cost == pytest.approx(-0.5)


def test_infeasible_budgets_raise():
    with pytest.raises(Infeasible):
        solve_size_budget(np.zeros((2, 2)), np.ones((2, 2)) * 5, 3.0)
    with pytest.raises(Infeasible):
        solve_loss_budget(np.ones((2, 2)), np.ones((2, 2)), 0.5)


def test_pareto_front_is_monotone():
    costs = np.sort(np.abs(RNG.normal(size=(6, 3))), axis=1)[:, ::-1]   # more bytes, less loss
    sizes = np.tile([1.0, 2.0, 4.0], (6, 1))
    front = pareto_front(costs, sizes, points=10)
    assert len(front) >= 3
    sizes_f = [s.size for s in front]
    costs_f = [s.cost for s in front]
    assert sizes_f == sorted(sizes_f) and costs_f == sorted(costs_f, reverse=True)


def test_solver_prints_nothing_on_stdout(capfd):
    # HiGHS writes debug lines to file descriptor 1 on some problems; --json output must stay clean
    rng = np.random.default_rng(0)
    costs = np.sort(np.abs(rng.normal(size=(40, 6))), axis=1)[:, ::-1].copy()
    sizes = np.sort(rng.integers(100, 10000, size=(40, 6)).astype(float), axis=1)
    for budget in np.linspace(sizes.min(1).sum(), sizes.max(1).sum(), 30):
        solve_size_budget(costs, sizes, float(budget))
    assert capfd.readouterr().out == ""


def _brute_limited(costs, sizes, budget, lat, bound):
    n, k = costs.shape
    best = None
    for ch in itertools.product(range(k), repeat=n):
        idx = (np.arange(n), np.array(ch))
        c, s, t = costs[idx].sum(), sizes[idx].sum(), lat[idx].sum()
        if s <= budget and t <= bound and (best is None or c < best - 1e-12):
            best = c
    return best


@pytest.mark.parametrize("trial", range(12))
def test_latency_limit_is_a_third_exact_constraint(trial):
    n, k = 5, 4
    costs = np.abs(RNG.normal(size=(n, k)))
    sizes = RNG.integers(1, 20, size=(n, k)).astype(float)
    lat = RNG.normal(size=(n, k))             # measured deltas: a format may be faster than float
    budget = float(RNG.uniform(sizes.min(1).sum(), sizes.sum()))
    bound = float(RNG.uniform(lat.min(1).sum(), lat.max(1).sum()))
    limit = Limit(lat, bound)
    expect = _brute_limited(costs, sizes, budget, lat, bound)
    try:
        sol = solve_size_budget(costs, sizes, budget, [limit])
    except Infeasible:
        assert expect is None
        return
    assert expect is not None and np.isclose(sol.cost, expect) and limit.holds(sol.choice)
    loss_sol = solve_loss_budget(costs, sizes, sol.cost + 1e-9, [limit])
    assert limit.holds(loss_sol.choice) and loss_sol.size <= sol.size + 1e-9


def test_pareto_front_under_a_limit_keeps_only_assignments_that_meet_it():
    costs = np.array([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    sizes = np.array([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    lat = np.array([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])   # the middle format is slow
    front = pareto_front(costs, sizes, 8, [Limit(lat, 0.0)])
    assert front and all(1 not in s.choice for s in front)
