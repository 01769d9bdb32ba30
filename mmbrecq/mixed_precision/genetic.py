"""Genetic search of a per-group bit allocation under a hardware budget (BRECQ, sec. 3.4).

Each *group* (a reconstruction unit, or a single layer) picks one option among its
candidates (e.g. weight bits 2 / 4 / 8, or ``(w_bits, a_bits)`` pairs); the objective is
the sum of the groups' sensitivities (their reconstruction losses at that option, which
the block-diagonal Fisher approximation makes additive across blocks), subject to
``cost_fn(choice) <= budget``. The search knows nothing about layers or bits: it sees
option indices, a loss table and a black-box cost, so any cost model fits.

It is a generational GA (tournament selection, uniform crossover, per-gene mutation,
elitism, no duplicate children) whose children are repaired greedily into the budget and
then filled up to it, as in Chu & Beasley's knapsack GA, followed by a local search
around the best individual. The cheapest choice and the repaired least-sensitive choice
seed the population, so a feasible individual exists from the start and every returned
answer fits the budget; on tens of groups of three options the search takes a fraction
of a second.
"""
import dataclasses
import math
import random
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from mmbrecq.registry import SEARCHERS

Choice = Tuple[int, ...]


@dataclasses.dataclass
class SearchResult:
    """Outcome of a search.

    Attributes:
        choice: option index per group (``candidates[i][choice[i]]`` is the pick).
        options: the picked candidates themselves.
        sensitivity: sum of the picked sensitivities (the minimised objective).
        cost: ``cost_fn(choice)``, never above the budget.
        history: one dict per generation (``generation``, ``best_sensitivity``,
            ``best_cost``, ``mean_sensitivity``, ``feasible_fraction``), then one with
            ``stage='local_search'`` for the final polish; for logs and plots.
    """

    choice: List[int]
    options: list
    sensitivity: float
    cost: float
    history: List[dict]


class _Problem:
    """Validated inputs, memoised evaluations and the budget-repair heuristic."""

    def __init__(self, candidates, sensitivity, cost_fn, budget, fixed):
        if not candidates or len(candidates) != len(sensitivity):
            raise ValueError(f'need one sensitivity list per group: {len(candidates)} groups, '
                             f'{len(sensitivity)} sensitivity lists')
        for i, (opts, sens) in enumerate(zip(candidates, sensitivity)):
            if not opts or len(opts) != len(sens):
                raise ValueError(f'group {i}: {len(opts)} candidates but {len(sens)} '
                                 'sensitivities (need the same, at least one)')
        fixed = dict(fixed or {})
        for i, j in fixed.items():
            if not (0 <= i < len(candidates) and 0 <= j < len(candidates[i])):
                raise ValueError(f'fixed={{{i}: {j}}} is not a group / option index')
        if not math.isfinite(float(budget)):
            raise ValueError(f'budget must be a finite number, got {budget!r}')
        self.sens = [[float(s) for s in row] for row in sensitivity]
        self.cost_fn, self.budget = cost_fn, float(budget)
        # a group with one candidate (keep_8bit first / last layer) is fixed too
        self.allowed = [[fixed[i]] if i in fixed else list(range(len(opts)))
                        for i, opts in enumerate(candidates)]
        self.free = [i for i, a in enumerate(self.allowed) if len(a) > 1]
        self._cache: Dict[Choice, Tuple[float, float]] = {}

    def evaluate(self, c: Choice) -> Tuple[float, float]:
        """(sensitivity, cost) of a choice, memoised: the GA revisits many individuals."""
        if c not in self._cache:
            s = math.fsum(self.sens[i][j] for i, j in enumerate(c))
            self._cache[c] = (s, float(self.cost_fn(list(c))))
        return self._cache[c]

    def key(self, c: Choice) -> Tuple[float, float]:
        """Ranking (lower is better): budget excess first, then sensitivity (Deb's rule)."""
        s, cost = self.evaluate(c)
        return max(0.0, cost - self.budget), s

    def feasible(self, c: Choice) -> bool:
        return self.evaluate(c)[1] <= self.budget

    def cheapest(self) -> Choice:
        """Lowest-cost choice by coordinate descent: exact for costs that sum over groups.

        Starts from the least sensitive options so that among equally cheap options the
        less lossy one is kept.
        """
        c = [min(a, key=lambda j: self.sens[i][j]) for i, a in enumerate(self.allowed)]
        for _ in range(len(c) + 1):
            changed = False
            for i in self.free:
                best = min(self.allowed[i],
                           key=lambda j: (self.evaluate(_with(c, i, j))[1], self.sens[i][j]))
                if self.evaluate(_with(c, i, best))[1] < self.evaluate(tuple(c))[1]:
                    c[i], changed = best, True
            if not changed:
                break
        return tuple(c)

    def prepare_repair(self, base: Choice):
        """Cost of each option relative to ``base``: the repair's (additive) estimate."""
        self.base = base
        c0 = self.evaluate(base)[1]
        self.delta = {(i, j): self.evaluate(_with(base, i, j))[1] - c0
                      for i in self.free for j in self.allowed[i]}

    def repair(self, c: Choice) -> Choice:
        """Make ``c`` feasible by greedy downgrades: least sensitivity added per cost saved.

        Falls back on the cheapest choice (feasible, checked before the search) if the
        cost is not additive enough for the estimates to get there.
        """
        c = list(c)
        while not self.feasible(tuple(c)):
            best, best_score = None, math.inf
            for i in self.free:
                for j in self.allowed[i]:
                    saving = self.delta[i, c[i]] - self.delta[i, j]
                    if saving > 0:
                        score = (self.sens[i][j] - self.sens[i][c[i]]) / saving
                        if score < best_score:
                            best, best_score = (i, j), score
            if best is None:
                return self.base
            c[best[0]] = best[1]
        return self.improve(tuple(c))

    def improve(self, c: Choice) -> Choice:
        """Spend the budget left over: greedy upgrades, most sensitivity saved per cost first.

        The drop phase above overshoots (it stops at the first feasible point); filling the
        slack back is what makes repaired individuals competitive (Chu & Beasley's GA for
        the knapsack problem does the same).
        """
        c = list(c)
        while True:
            cost0 = self.evaluate(tuple(c))[1]
            moves = []
            for i in self.free:
                for j in self.allowed[i]:
                    gain = self.sens[i][c[i]] - self.sens[i][j]
                    if gain > 0:
                        extra = self.delta[i, j] - self.delta[i, c[i]]
                        moves.append((-gain / extra if extra > 0 else -math.inf, i, j))
            for _, i, j in sorted(moves):
                estimate = cost0 + self.delta[i, j] - self.delta[i, c[i]]
                if estimate <= self.budget and self.feasible(_with(c, i, j)):
                    c[i] = j
                    break
            else:
                return tuple(c)


def _with(c, i, j) -> Choice:
    c = list(c)
    c[i] = j
    return tuple(c)


@SEARCHERS.register_module()
class GeneticSearcher:
    """Genetic algorithm over per-group options, minimising summed sensitivity under a budget.

    Args:
        population_size: individuals per generation.
        generations: maximum number of generations.
        tournament_size: individuals drawn per tournament (selection pressure).
        crossover_prob: probability that a child mixes two parents (uniform crossover)
            rather than copying the first.
        mutation_prob: per-gene mutation probability; ``None`` is 1 / number of free
            groups (one mutation per child on average).
        elite: best individuals copied unchanged into the next generation, so the best
            found is never lost.
        patience: stop after this many generations without improvement (``None``: run
            all generations).
        repair: repair infeasible children by greedy downgrades and spend the budget left
            over by greedy upgrades (default). Without it, children stay as bred: an
            infeasible one loses every tournament against a feasible one.
        local_search: polish the best individual with 1- and 2-group changes at the end.
        seed: seed of the search's own ``random.Random``: same inputs, same answer.
    """

    def __init__(self, population_size: int = 50, generations: int = 200,
                 tournament_size: int = 3, crossover_prob: float = 0.9,
                 mutation_prob: Optional[float] = None, elite: int = 2,
                 patience: Optional[int] = 50, repair: bool = True, local_search: bool = True,
                 seed: int = 0):
        if population_size < 2 or not 0 <= elite < population_size or tournament_size < 1:
            raise ValueError('need population_size >= 2, 0 <= elite < population_size, '
                             'tournament_size >= 1')
        self.population_size, self.generations = population_size, generations
        self.tournament_size, self.crossover_prob = tournament_size, crossover_prob
        self.mutation_prob, self.elite, self.patience = mutation_prob, elite, patience
        self.repair, self.local_search, self.seed = repair, local_search, seed

    def search(self, candidates: Sequence[Sequence], sensitivity: Sequence[Sequence[float]],
               cost_fn: Callable[[List[int]], float], budget: float,
               fixed: Optional[Mapping[int, int]] = None) -> SearchResult:
        """Find the least sensitive choice vector whose cost fits the budget.

        Args:
            candidates: ``candidates[i]`` lists the options of group i (any objects, e.g.
                ``[2, 4, 8]``); a single option fixes the group.
            sensitivity: ``sensitivity[i][j]`` is the loss of group i at option j.
            cost_fn: ``cost_fn(choice) -> float`` for a list of option indices.
            budget: the largest acceptable cost.
            fixed: ``{group: option index}`` for groups that must not be searched.

        Raises:
            ValueError: if even the cheapest choice costs more than ``budget`` (the message
                gives that smallest achievable cost), or the inputs are inconsistent.
        """
        p = _Problem(candidates, sensitivity, cost_fn, budget, fixed)
        cheapest = p.cheapest()
        min_cost = p.evaluate(cheapest)[1]
        if min_cost > p.budget:
            raise ValueError(f'budget {p.budget:g} is infeasible: the smallest achievable cost '
                             f'is {min_cost:g} (every group at its cheapest option)')
        p.prepare_repair(cheapest)
        rng = random.Random(self.seed)
        pop = self._initial_population(p, rng, cheapest)
        history, best, stale = [], min(pop, key=p.key), 0
        self._log(history, 0, p, pop, best)
        for gen in range(1, (self.generations if p.free else 0) + 1):  # all fixed: done
            pop = self._next_generation(p, rng, pop)
            gen_best = min(pop, key=p.key)
            if p.key(gen_best) < p.key(best):
                best, stale = gen_best, 0
            else:
                stale += 1
            self._log(history, gen, p, pop, best)
            if self.patience is not None and stale >= self.patience:
                break
        if self.local_search:
            best = self._local_search(p, best)
            history.append(dict(self._stats(p, [best], best), stage='local_search'))
        s, cost = p.evaluate(best)
        return SearchResult(list(best), [candidates[i][j] for i, j in enumerate(best)], s, cost,
                            history)

    # -- GA steps ---------------------------------------------------------------------------
    def _fix(self, p, c):
        return p.repair(c) if self.repair else c

    def _random(self, p, rng):
        return tuple(rng.choice(a) for a in p.allowed)

    def _initial_population(self, p, rng, cheapest):
        least_sensitive = tuple(min(a, key=lambda j: p.sens[i][j]) for i, a in enumerate(p.allowed))
        pop = [cheapest, p.repair(least_sensitive)]
        while len(pop) < self.population_size:
            pop.append(self._fix(p, self._random(p, rng)))
        return pop[:self.population_size]

    def _tournament(self, p, rng, pop):
        return min((rng.choice(pop) for _ in range(self.tournament_size)), key=p.key)

    def _next_generation(self, p, rng, pop):
        elites = sorted(set(pop), key=lambda c: (p.key(c), c))[:self.elite]
        rate = self.mutation_prob if self.mutation_prob is not None else 1 / max(len(p.free), 1)
        children, seen, tries = list(elites), set(elites), 0
        while len(children) < self.population_size:
            tries += 1
            a, b = self._tournament(p, rng, pop), self._tournament(p, rng, pop)
            if rng.random() < self.crossover_prob:
                child = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
            else:
                child = list(a)
            for i in p.free:
                if rng.random() < rate:
                    child[i] = rng.choice([j for j in p.allowed[i] if j != child[i]])
            child = self._fix(p, tuple(child))
            # duplicates would let one individual take over the population (and end the
            # search early); give up on uniqueness only when the space is nearly exhausted
            if child not in seen or tries > 3 * self.population_size:
                children.append(child)
                seen.add(child)
        return children

    def _local_search(self, p, best):
        """Best-improvement descent over changes of one or two groups that stay feasible.

        Two-group moves matter under a tight budget: raising one group's bits is only
        possible by lowering another's, which no single change can do.
        """
        moves = [(i, j) for i in p.free for j in p.allowed[i]]
        while True:
            neighbours = [_with(best, i, j) for i, j in moves if best[i] != j]
            neighbours += [_with(_with(best, i, j), k, m) for n, (i, j) in enumerate(moves)
                           for k, m in moves[n + 1:] if i != k and best[i] != j and best[k] != m]
            candidate = min(neighbours, key=p.key, default=best)
            if p.key(candidate) >= p.key(best):
                return best
            best = candidate

    # -- logging ----------------------------------------------------------------------------
    @staticmethod
    def _stats(p, pop, best):
        s, cost = p.evaluate(best)
        return dict(best_sensitivity=s, best_cost=cost,
                    mean_sensitivity=math.fsum(p.evaluate(c)[0] for c in pop) / len(pop),
                    feasible_fraction=sum(p.feasible(c) for c in pop) / len(pop))

    def _log(self, history, gen, p, pop, best):
        history.append(dict(self._stats(p, pop, best), generation=gen, stage='ga'))
