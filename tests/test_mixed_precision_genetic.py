"""GeneticSearcher: exact optimum against brute force, budget respected, errors, determinism."""
import itertools
import random
import re

import numpy as np
import pytest

from mmbrecq.mixed_precision import GeneticSearcher, SearchResult
from mmbrecq.registry import SEARCHERS, build_from

BITS = [2, 4, 8]


def _problem(seed, n):
    """Size-like additive cost, sensitivities falling with the bits, budget in between."""
    r = random.Random(seed)
    params = [r.randint(1, 100) for _ in range(n)]
    candidates = [list(BITS) for _ in range(n)]
    sensitivity = []
    for _ in range(n):
        base = r.uniform(0.1, 5)
        sensitivity.append(sorted((base * r.uniform(0.5, 2) / 2 ** b for b in BITS),
                                  reverse=True))
    costs = [[p * b for b in BITS] for p in params]

    def cost_fn(choice):
        return float(sum(costs[i][j] for i, j in enumerate(choice)))

    budget = r.uniform(cost_fn([0] * n), cost_fn([2] * n))
    return candidates, sensitivity, cost_fn, budget, costs


def _brute_force(sensitivity, costs, budget, allowed=None):
    """Least total sensitivity within budget, over every combination (3**10 at most)."""
    n = len(sensitivity)
    allowed = allowed or [range(len(s)) for s in sensitivity]
    idx = np.array(list(itertools.product(*allowed)))
    s = sum(np.asarray(sensitivity[i])[idx[:, i]] for i in range(n))
    c = sum(np.asarray(costs[i], dtype=float)[idx[:, i]] for i in range(n))
    return s[c <= budget].min()


def _search(problem, **kwargs):
    candidates, sensitivity, cost_fn, budget, _ = problem
    kwargs.setdefault('patience', 20)
    return GeneticSearcher(**kwargs).search(candidates, sensitivity, cost_fn, budget)


@pytest.mark.parametrize('seed,n', [(0, 6), (1, 10), (2, 8), (3, 10), (4, 5), (5, 10)])
def test_finds_exact_optimum(seed, n):
    problem = _problem(seed, n)
    res = _search(problem, seed=seed)
    _, sensitivity, cost_fn, budget, costs = problem
    assert res.sensitivity == pytest.approx(_brute_force(sensitivity, costs, budget), rel=1e-9)
    assert res.cost == cost_fn(res.choice) <= budget
    assert res.options == [BITS[j] for j in res.choice]


# problems where the greedy seeds of generation 0 are not optimal: the generations must
# do the work (local search off, so crossover / mutation / selection alone get there)
@pytest.mark.parametrize('seed,n', [(27, 10), (93, 10), (219, 10), (262, 7)])
def test_generations_improve_on_greedy_start(seed, n):
    problem = _problem(seed, n)
    _, sensitivity, _, budget, costs = problem
    optimum = _brute_force(sensitivity, costs, budget)
    res = _search(problem, seed=seed, local_search=False)
    assert res.history[0]['best_sensitivity'] > optimum * (1 + 1e-9), 'greedy start optimal'
    assert res.sensitivity == pytest.approx(optimum, rel=1e-9)


def test_without_repair_still_optimal_and_feasible():
    problem = _problem(11, 8)
    _, sensitivity, _, budget, costs = problem
    res = _search(problem, seed=0, repair=False, patience=None, generations=150)
    assert res.cost <= budget
    assert res.sensitivity == pytest.approx(_brute_force(sensitivity, costs, budget), rel=1e-9)
    assert any(h['feasible_fraction'] < 1 for h in res.history)  # infeasible ones did occur


def test_budget_never_exceeded():
    r = random.Random(0)
    for seed in range(8):
        candidates, sensitivity, cost_fn, _, _ = _problem(100 + seed, 6)
        lo, hi = cost_fn([0] * 6), cost_fn([2] * 6)
        for budget in (lo, r.uniform(lo, hi), hi):
            res = GeneticSearcher(seed=seed, generations=15, patience=5).search(
                candidates, sensitivity, cost_fn, budget)
            assert res.cost == cost_fn(res.choice) <= budget
    # at the cheapest cost exactly, the cheapest choice is the only feasible one
    res = GeneticSearcher(generations=5).search(candidates, sensitivity, cost_fn, lo)
    assert res.choice == [0] * 6


def test_infeasible_budget_reports_smallest_cost():
    candidates, sensitivity, cost_fn, _, _ = _problem(0, 5)
    smallest = cost_fn([0] * 5)
    with pytest.raises(ValueError, match=re.escape(f'smallest achievable cost is {smallest:g}')):
        GeneticSearcher().search(candidates, sensitivity, cost_fn, smallest - 1)
    # fixed groups raise the smallest cost
    fixed_cost = cost_fn([2, 0, 0, 0, 0])
    with pytest.raises(ValueError, match=re.escape(f'is {fixed_cost:g}')):
        GeneticSearcher().search(candidates, sensitivity, cost_fn, fixed_cost - 1, fixed={0: 2})


def test_deterministic_with_seed():
    problem = _problem(7, 10)
    a, b = _search(problem, seed=3), _search(problem, seed=3)
    assert (a.choice, a.sensitivity, a.cost, a.history) == (b.choice, b.sensitivity, b.cost,
                                                            b.history)


def test_fixed_groups_honoured():
    candidates, sensitivity, _, budget, costs = _problem(21, 8)
    # first / last layer at 8 bits: once via `fixed`, once via a single candidate
    candidates[7], sensitivity[7], costs[7] = [8], [sensitivity[7][2]], [costs[7][2]]

    def cost_fn(choice):
        return float(sum(costs[i][j] for i, j in enumerate(choice)))

    budget = cost_fn([2] + [0] * 7) + 0.4 * (cost_fn([2] * 7 + [0]) - cost_fn([2] + [0] * 7))
    res = GeneticSearcher(seed=0, patience=20).search(candidates, sensitivity, cost_fn, budget,
                                                      fixed={0: 2})
    assert res.choice[0] == 2 and res.choice[7] == 0
    assert res.options[0] == res.options[7] == 8
    allowed = [[2]] + [range(3)] * 6 + [[0]]
    assert res.sensitivity == pytest.approx(_brute_force(sensitivity, costs, budget, allowed),
                                            rel=1e-9)
    assert all(h['best_cost'] <= budget for h in res.history)


def test_all_groups_fixed():
    candidates, sensitivity = [[8], [2, 4, 8]], [[0.5], [3.0, 1.0, 0.1]]
    res = GeneticSearcher().search(candidates, sensitivity, lambda c: float(sum(c)), 10,
                                   fixed={1: 1})
    assert res.choice == [0, 1] and res.options == [8, 4] and res.sensitivity == 1.5
    assert len(res.history) == 2  # generation 0 and the (empty) local search


def test_result_and_history():
    problem = _problem(5, 4)
    res = _search(problem, seed=0, generations=10, patience=None)
    assert isinstance(res, SearchResult)
    ga = [h for h in res.history if h['stage'] == 'ga']
    assert [h['generation'] for h in ga] == list(range(11))
    assert res.history[-1]['stage'] == 'local_search'
    best = [h['best_sensitivity'] for h in ga]
    assert best == sorted(best, reverse=True)  # elitism: the best never gets worse
    assert set(ga[0]) >= {'best_sensitivity', 'best_cost', 'mean_sensitivity',
                          'feasible_fraction'}


def test_general_options_and_registry():
    # options are any objects, e.g. (w_bits, a_bits) pairs searched together
    candidates = [[(4, 4), (8, 8)], [(2, 4), (4, 4), (8, 8)]]
    sensitivity = [[1.0, 0.1], [3.0, 1.0, 0.2]]

    def cost_fn(choice):
        return float(sum(w * a for w, a in (candidates[i][j] for i, j in enumerate(choice))))

    searcher = build_from(SEARCHERS, dict(type='GeneticSearcher', population_size=10, seed=1))
    assert SEARCHERS.get('mmbrecq.GeneticSearcher') is GeneticSearcher
    res = searcher.search(candidates, sensitivity, cost_fn, budget=80)
    assert res.options == [(8, 8), (4, 4)] and res.cost == 80  # exactly at the budget


@pytest.mark.parametrize('candidates,sensitivity,kwargs', [
    ([[2, 4]], [[1.0, 0.5], [1.0]], {}),
    ([[2, 4]], [[1.0]], {}),
    ([[]], [[]], {}),
    ([[2, 4]], [[1.0, 0.5]], dict(fixed={0: 2})),
    ([[2, 4]], [[1.0, 0.5]], dict(budget=float('nan'))),
])
def test_bad_inputs(candidates, sensitivity, kwargs):
    kwargs.setdefault('budget', 100.0)
    with pytest.raises(ValueError):
        GeneticSearcher().search(candidates, sensitivity, lambda c: 0.0, **kwargs)
