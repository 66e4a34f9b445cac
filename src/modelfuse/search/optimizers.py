"""Optimisers over a search space, asked for candidates and told their fitness (Optuna's samplers).

* ``cma``: CMA-ES (Optuna's ``CmaEsSampler``, the ``cmaes`` package); separable CMA above
  ``SEPARABLE_FROM`` dimensions, where a full covariance needs more evaluations than a search has. CMA-ES handles
  the numeric dimensions; a choice (the method) is drawn by Optuna's independent sampler beside it.
* ``tpe``: Optuna's TPE, which models choices natively (a space of mostly choices).
* ``random``: uniform draws (log-uniform where ``log``), the baseline.

Candidates come in batches of a fixed size, asked together and told in the order asked, so the sequence of
candidates depends only on the seed and the fitness values, not on how many workers evaluate them or in which
order they finish; a resumed search replays its log through the same steps and continues where it stopped.
Known-good points (``seeds``) are evaluated first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from modelfuse.errors import RecipeError
from modelfuse.search.space import Dimension, SearchSpace

OptimizerName = Literal["cma", "tpe", "random"]
OPTIMIZERS: tuple[OptimizerName, ...] = ("cma", "tpe", "random")
SEPARABLE_FROM = 40
"""Dimensions from which ``cma`` uses separable CMA-ES (a diagonal covariance)."""

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class Candidate:
    """A point to evaluate: its number (0, 1, ... in the order asked) and a value per dimension name."""

    number: int
    point: dict[str, Any]


def distribution(dimension: Dimension) -> BaseDistribution:
    """The Optuna distribution of a dimension."""
    if dimension.choices is not None:
        return CategoricalDistribution(list(dimension.choices))
    assert dimension.low is not None and dimension.high is not None
    if dimension.integer:
        return IntDistribution(math.ceil(dimension.low), math.floor(dimension.high), log=dimension.log)
    return FloatDistribution(dimension.low, dimension.high, log=dimension.log)


def _sampler(name: OptimizerName, seed: int, dimensions: int) -> optuna.samplers.BaseSampler:
    if name == "cma":
        return optuna.samplers.CmaEsSampler(seed=seed, use_separable_cma=dimensions >= SEPARABLE_FROM,
                                            warn_independent_sampling=False,
                                            independent_sampler=optuna.samplers.RandomSampler(seed=seed + 1))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise RecipeError(f"--optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")


class Optimizer:
    """Ask/tell over a space's dimensions with one of :data:`OPTIMIZERS`, seeded.

    Raises (constructor):
        RecipeError: For an unknown optimiser or a seed point outside the space.
    """

    def __init__(self, space: SearchSpace, name: OptimizerName = "cma", *, seed: int = 0,
                 seeds: Sequence[dict[str, Any]] = ()) -> None:
        self.name = name
        self.seed = seed
        self._distributions = {dimension.name: distribution(dimension) for dimension in space.dimensions}
        self._study = optuna.create_study(direction="maximize", sampler=_sampler(name, seed, len(space.dimensions)))
        self._trials: dict[int, optuna.trial.Trial] = {}
        for index, point in enumerate(seeds):
            missing = [name for name in self._distributions if name not in point]
            if missing:
                raise RecipeError(f"seed recipe {index + 1}: no value for {', '.join(missing)}")
            for dimension in space.dimensions:
                if not dimension.contains(point[dimension.name]):
                    raise RecipeError(f"seed recipe {index + 1}: {dimension.name} = {point[dimension.name]!r} is "
                                      "outside the space")
            self._study.enqueue_trial({name: point[name] for name in self._distributions})

    def ask(self) -> Candidate:
        """The next candidate."""
        trial = self._study.ask(self._distributions)
        self._trials[trial.number] = trial
        return Candidate(trial.number, dict(trial.params))

    def ask_batch(self, size: int) -> list[Candidate]:
        """The next ``size`` candidates, asked before any of them is told."""
        return [self.ask() for _ in range(size)]

    def tell(self, number: int, fitness: float | None) -> None:
        """The fitness of candidate ``number`` (higher is better); None or NaN: it failed."""
        trial = self._trials.pop(number)
        if fitness is None or not math.isfinite(fitness):
            self._study.tell(trial, state=TrialState.FAIL)
        else:
            self._study.tell(trial, fitness)


def best_of(results: Sequence[tuple[int, float | None]]) -> int | None:
    """The number of the candidate with the highest finite fitness (the earliest on a tie), None if none has one."""
    scored = [(fitness, -number) for number, fitness in results if fitness is not None and math.isfinite(fitness)]
    return -max(scored)[1] if scored else None


