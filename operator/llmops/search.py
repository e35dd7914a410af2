"""Hyperparameter search for Sweeps: grid, random and TPE sampling and the median stopping
rule, as pure functions of the sweep's spec and its trials so far (no Kubernetes, no kopf).

Every suggestion is a function of (spec, trial index, trials so far) and nothing else: the
operator keeps no search state in memory. Grid takes the index-th combination, random seeds a
generator with the seed and the index, and TPE rebuilds an in-memory Optuna study from the
trials (read back from the trial TrainingRuns) at every call, with running trials included
so that the constant-liar strategy steers parallel suggestions apart. A restarted operator
therefore suggests exactly what the old one would have.
"""

from __future__ import annotations

import math
import random
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from llmops.api.sweep import Parameter, SweepSpec

# Optuna (and the numpy it pulls in) is imported only where TPE needs it, so importing the
# controllers, and every grid or random sweep, does without it.
if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial

Value = int | float | bool | str
Params = dict[str, Value]
Direction = Literal["minimize", "maximize"]
DEFAULT_GRID_POINTS = 3
# Trials TPE draws at random before it starts modelling (Optuna's default is 10).
TPE_STARTUP_TRIALS = 4


@dataclass(frozen=True)
class Trial:
    """A trial as the search sees it: its parameters, state and objective values."""

    index: int
    params: Params
    state: Literal["Pending", "Running", "Succeeded", "Failed", "Pruned", "Suspended"]
    value: float | None = None
    intermediate: Sequence[tuple[int, float]] = field(default_factory=tuple)


def _int_values(parameter: Parameter) -> list[int]:
    assert parameter.min is not None and parameter.max is not None
    return list(range(int(parameter.min), int(parameter.max) + 1, parameter.step or 1))


def grid_axis(parameter: Parameter) -> list[Value]:
    """The grid points of one parameter, in order."""
    if parameter.type == "categorical":
        return parameter.choices()
    if parameter.type == "int":
        return list(_int_values(parameter))
    assert parameter.min is not None and parameter.max is not None
    points = parameter.grid_points or DEFAULT_GRID_POINTS
    low, high = parameter.min, parameter.max
    if parameter.type == "log-uniform":
        low, high = math.log(low), math.log(high)
    values = [low + (high - low) * i / (points - 1) for i in range(points)]
    if parameter.type == "log-uniform":
        values = [math.exp(v) for v in values]
        values[0], values[-1] = parameter.min, parameter.max  # exact ends, no rounding drift
    return list(dict.fromkeys(values))  # min == max gives one point


def grid_size(parameters: Sequence[Parameter]) -> int:
    return math.prod(len(grid_axis(p)) for p in parameters)


def grid_point(parameters: Sequence[Parameter], index: int) -> Params:
    """The index-th combination of the cartesian product, the last parameter varying
    fastest (as itertools.product orders it), without enumerating the others."""
    axes = [grid_axis(p) for p in parameters]
    size = math.prod(len(a) for a in axes)
    if not 0 <= index < size:
        raise IndexError(f"grid has {size} combinations, no index {index}")
    chosen: Params = {}
    for parameter, axis in reversed(list(zip(parameters, axes, strict=True))):
        index, position = divmod(index, len(axis))
        chosen[parameter.name] = axis[position]
    return {p.name: chosen[p.name] for p in parameters}


def random_point(parameters: Sequence[Parameter], seed: int, index: int) -> Params:
    """Independent draws, reproducible from (seed, index) alone."""
    rng = random.Random(f"{seed}:{index}")
    chosen: Params = {}
    for parameter in parameters:
        if parameter.type == "categorical":
            chosen[parameter.name] = rng.choice(parameter.choices())
        elif parameter.type == "int":
            chosen[parameter.name] = rng.choice(_int_values(parameter))
        else:
            assert parameter.min is not None and parameter.max is not None
            if parameter.type == "log-uniform":
                low, high = math.log(parameter.min), math.log(parameter.max)
                chosen[parameter.name] = math.exp(rng.uniform(low, high))
            else:
                chosen[parameter.name] = rng.uniform(parameter.min, parameter.max)
    return chosen


def distribution(parameter: Parameter) -> BaseDistribution:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if parameter.type == "categorical":
        return CategoricalDistribution(parameter.choices())
    assert parameter.min is not None and parameter.max is not None
    if parameter.type == "int":
        values = _int_values(parameter)
        return IntDistribution(values[0], values[-1], step=parameter.step or 1)
    return FloatDistribution(parameter.min, parameter.max, log=parameter.type == "log-uniform")


def _frozen(trial: Trial, distributions: dict[str, BaseDistribution]) -> FrozenTrial | None:
    import optuna
    from optuna.trial import TrialState

    params = {k: v for k, v in trial.params.items() if k in distributions}
    if set(params) != set(distributions):
        return None  # a trial from before the parameters changed
    intermediate = {step: value for step, value in trial.intermediate}
    state = {
        "Succeeded": TrialState.COMPLETE,
        "Pruned": TrialState.PRUNED,
        "Failed": TrialState.FAIL,
    }.get(trial.state, TrialState.RUNNING)
    if state == TrialState.COMPLETE and trial.value is None:
        state = TrialState.FAIL  # succeeded without reporting the objective
    try:  # create_trial checks each value lies in its distribution
        return optuna.trial.create_trial(
            params=params,
            distributions=distributions,
            value=trial.value if state == TrialState.COMPLETE else None,
            intermediate_values=intermediate if state != TrialState.RUNNING else None,
            state=state,
        )
    except ValueError:
        return None  # a value outside the current space (the spec changed)


def tpe_point(
    parameters: Sequence[Parameter],
    trials: Sequence[Trial],
    seed: int,
    index: int,
    direction: Direction,
) -> Params:
    """Optuna's TPE suggestion for trial `index`, from a study rebuilt from `trials`.

    Finished trials teach the model; pending and running ones enter as RUNNING, which the
    constant-liar sampler counts as the worst outcome so far, so parallel trials spread out
    instead of all landing on the same point. The sampler's seed mixes in the index so each
    suggestion is reproducible on its own.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {p.name: distribution(p) for p in parameters}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=(seed * 1_000_003 + index) % 2**32,
            n_startup_trials=TPE_STARTUP_TRIALS,
            constant_liar=True,
        )
        study = optuna.create_study(direction=direction, sampler=sampler)
        for trial in sorted(trials, key=lambda t: t.index):
            frozen = _frozen(trial, distributions)
            if frozen is not None:
                study.add_trial(frozen)
        asked = study.ask(fixed_distributions=distributions)
    return {p.name: asked.params[p.name] for p in parameters}


def suggest(spec: SweepSpec, index: int, trials: Sequence[Trial]) -> Params:
    """The parameters of trial `index`, given the trials that exist."""
    if not spec.parameters:  # crossValidation of the template alone
        return {}
    if spec.algorithm == "grid":
        return grid_point(spec.parameters, index)
    if spec.algorithm == "random":
        return random_point(spec.parameters, spec.seed, index)
    return tpe_point(spec.parameters, trials, spec.seed, index, spec.objective.direction)


def trial_budget(spec: SweepSpec) -> int:
    """Trials the sweep runs in all: maxTrials, capped at the grid size for grid search (one
    without parameters: the template, cross-validated)."""
    if not spec.parameters:
        return 1
    if spec.algorithm == "grid":
        return min(spec.max_trials, grid_size(spec.parameters))
    return spec.max_trials


def better(a: float, b: float, direction: Direction) -> bool:
    return a < b if direction == "minimize" else a > b


def _best_up_to(
    curve: Sequence[tuple[int, float]], step: int, direction: Direction
) -> float | None:
    values = [value for at, value in curve if at <= step]
    if not values:
        return None
    return min(values) if direction == "minimize" else max(values)


def median_rule_prunes(
    curve: Sequence[tuple[int, float]],
    others: Sequence[Sequence[tuple[int, float]]],
    *,
    min_trials: int,
    start_step: int,
    direction: Direction,
) -> bool:
    """Whether the median stopping rule stops a trial with this intermediate curve.

    At the trial's latest step s (not before start_step), its best value so far is compared
    with the median of the other trials' best values at steps <= s, counting only trials
    that have reached s; it is stopped when worse, given at least min_trials such trials.
    """
    if not curve:
        return False
    step = max(at for at, _ in curve)
    if step < start_step:
        return False
    own = _best_up_to(curve, step, direction)
    assert own is not None
    peers = []
    for other in others:
        if not other or max(at for at, _ in other) < step:
            continue
        best = _best_up_to(other, step, direction)
        if best is not None:
            peers.append(best)
    if len(peers) < min_trials:
        return False
    return better(statistics.median(peers), own, direction)


def rank(trials: Sequence[Trial], direction: Direction) -> list[Trial]:
    """Trials with a value, best first (ties: lower index first)."""
    scored = [t for t in trials if t.value is not None]
    sign = 1 if direction == "minimize" else -1
    return sorted(scored, key=lambda t: (sign * (t.value or 0.0), t.index))
