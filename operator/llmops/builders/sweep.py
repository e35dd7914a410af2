"""Sweep -> trial TrainingRuns, and trial TrainingRuns -> the Sweep's status (pure functions).

A trial is the template with each parameter's value set at its path. It carries its
parameters in an annotation, its sweep and index in labels and a controller owner reference
to the Sweep, so everything the search needs is read back from the API server: an operator
restart loses nothing, and a trial once created keeps its parameters.

With `spec.crossValidation` (k folds) a trial is k TrainingRuns `<sweep>-trial-<i>-fold-<j>`,
each with the trial's parameters, `crossValidation: {folds: k, fold: j}` and a fold label;
`combine` folds them back into one trial: failed when one failed, succeeded when all did,
valued at the mean of their objective values.
"""

from __future__ import annotations

import copy
import datetime
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from llmops import GROUP
from llmops.api import API_VERSION
from llmops.api.sweep import (
    LEADERBOARD_SIZE,
    MAX_INTERMEDIATE_VALUES,
    Budget,
    Sweep,
    TrialState,
)
from llmops.api.trainingrun import TrainingRunSpec
from llmops.builders import trainingrun as training
from llmops.builders.common import child_metadata
from llmops.search import Params, Trial, Value, rank

COMPONENT = "trial"
SWEEP_LABEL = f"{GROUP}/sweep"
INDEX_LABEL = f"{GROUP}/trial-index"
FOLD_LABEL = f"{GROUP}/fold-index"  # crossValidation: the run's held-out fold
PARAMETERS_ANNOTATION = f"{GROUP}/trial-parameters"
# Set (with spec.suspend) when the early-stopping rule stops a trial.
PRUNED_ANNOTATION = f"{GROUP}/trial-pruned"


class InvalidTrial(ValueError):
    """The template with these parameter values is no valid TrainingRun spec."""


def trial_role(index: int, fold: int | None = None) -> str:
    return f"trial-{index}" if fold is None else f"trial-{index}-fold-{fold}"


def trial_name(sweep_name: str, index: int, fold: int | None = None) -> str:
    """The TrainingRun of a trial (of one fold of it, with crossValidation); without a fold
    under crossValidation, the name the trial goes by in the status."""
    return f"{sweep_name}-{trial_role(index, fold)}"


def set_path(spec: Mapping[str, Any], path: str, value: Value) -> dict[str, Any]:
    """A copy of `spec` with `value` at the dotted camelCase `path` (objects on the way are
    created)."""
    result = copy.deepcopy(dict(spec))
    node = result
    *parents, leaf = path.split(".")
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[leaf] = value
    return result


def trial_spec(sweep: Sweep, params: Params, fold: int | None = None) -> dict[str, Any]:
    """The trial's TrainingRun spec: the template with the parameters applied (and, with
    crossValidation, the fold it holds out), validated."""
    spec = sweep.spec.template.to_dict()
    for parameter in sweep.spec.parameters:
        spec = set_path(spec, parameter.path, params[parameter.name])
    cv = sweep.spec.cross_validation
    if cv is not None and fold is not None:
        spec["crossValidation"] = {"folds": cv.folds, "fold": fold}
    try:
        TrainingRunSpec.model_validate(spec)
    except ValidationError as error:
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors()
        )
        raise InvalidTrial(f"trial spec with {shown} is invalid: {problems}") from None
    return spec


def trial_manifest(
    body: Mapping[str, Any], sweep: Sweep, index: int, params: Params, fold: int | None = None
) -> dict[str, Any]:
    """A trial's TrainingRun; with crossValidation, the one of fold `fold`."""
    labels = {INDEX_LABEL: str(index)}
    if fold is not None:
        labels[FOLD_LABEL] = str(fold)
    metadata = child_metadata(body, trial_role(index, fold), COMPONENT, **labels)
    metadata["annotations"] = {PARAMETERS_ANNOTATION: json.dumps(params, sort_keys=True)}
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainingRun",
        "metadata": metadata,
        "spec": trial_spec(sweep, params, fold),
    }


def suspend_patch(*, pruned: bool = False, suspend: bool = True) -> dict[str, Any]:
    """Merge patch that stops (or resumes) a trial; pruning marks it in the same write."""
    patch: dict[str, Any] = {"spec": {"suspend": suspend}}
    if pruned:
        patch["metadata"] = {"annotations": {PRUNED_ANNOTATION: "true"}}
    return patch


@dataclass(frozen=True)
class FoldRun:
    """One fold's TrainingRun of a cross-validated trial."""

    name: str
    fold: int
    state: TrialState
    value: float | None  # its objective value, once succeeded


@dataclass(frozen=True)
class ObservedTrial:
    """A trial TrainingRun as the Sweep reads it (with crossValidation: a trial's fold runs,
    combined)."""

    name: str
    trial: Trial
    checkpoint_uri: str | None
    accelerator_hours: float  # as the trial's status counted them
    observation: tuple[int, float] | None  # (step, objective) now, while running
    # ...plus what a running trial has spent since (its status is written once a minute):
    # what the budget compares, never written to the Sweep's status (no churn).
    unaccounted_hours: float = 0.0
    fold: int | None = None  # a fold's run, before `combine`
    folds: tuple[FoldRun, ...] = field(default_factory=tuple)  # a combined trial's runs
    stdev: float | None = None  # of the folds' values, once all succeeded

    def run_names(self, states: Sequence[str]) -> list[str]:
        """The TrainingRuns of the trial in one of `states` (for a combined trial, by each
        fold run's own state)."""
        if self.folds:
            return [r.name for r in self.folds if r.state in states]
        return [self.name] if self.trial.state in states else []


def trial_state(child: Mapping[str, Any]) -> TrialState:
    status = child.get("status") or {}
    phase = status.get("phase")
    if phase == "Succeeded":
        return "Succeeded"
    if phase == "Failed":
        return "Failed"
    annotations = child["metadata"].get("annotations") or {}
    if annotations.get(PRUNED_ANNOTATION) == "true":
        return "Pruned"
    if (child.get("spec") or {}).get("suspend"):
        return "Suspended"
    return "Running" if phase == "Running" else "Pending"


def observe(
    child: Mapping[str, Any],
    metric: str,
    previous: Mapping[str, Any] | None,
    now: datetime.datetime | None = None,
) -> ObservedTrial:
    """A trial from its TrainingRun and the record the Sweep's status kept of it; `now`
    counts a running trial's accelerator-hours up to the moment (its status lags a minute)."""
    meta = child["metadata"]
    labels = meta.get("labels") or {}
    status = child.get("status") or {}
    hours = float(status.get("acceleratorHours") or 0.0)
    unaccounted = 0.0
    if now is not None and child.get("spec"):
        spec = TrainingRunSpec.model_validate(child["spec"])
        unaccounted = training.accelerator_hours(spec, status, now) - hours
    state = trial_state(child)
    metrics = status.get("metrics") or {}
    current = metrics.get(metric)
    step = status.get("step")
    observation = None
    if state in ("Running", "Pending") and current is not None and step is not None:
        observation = (int(step), float(current))
    curve = merge_intermediate((previous or {}).get("intermediate") or [], observation)
    checkpoints = status.get("checkpoints") or {}
    best = checkpoints.get("best") or {}
    return ObservedTrial(
        name=meta["name"],
        trial=Trial(
            index=int(labels[INDEX_LABEL]),
            params=json.loads((meta.get("annotations") or {}).get(PARAMETERS_ANNOTATION, "{}")),
            state=state,
            value=float(current) if state == "Succeeded" and current is not None else None,
            intermediate=tuple((p["step"], p["value"]) for p in curve),
        ),
        checkpoint_uri=best.get("uri") or status.get("modelUri"),
        accelerator_hours=hours,
        unaccounted_hours=unaccounted,
        observation=observation,
        fold=int(labels[FOLD_LABEL]) if FOLD_LABEL in labels else None,
    )


def fold_state(states: Sequence[TrialState], folds: int) -> TrialState:
    """A cross-validated trial's state from its fold runs' (`folds` of them in all, some
    perhaps not created yet): failed when one failed, succeeded when all did, suspended when
    one is, running when one runs, else pending."""
    for state in ("Failed", "Pruned"):
        if state in states:
            return state
    if len(states) == folds and all(s == "Succeeded" for s in states):
        return "Succeeded"
    if "Suspended" in states:
        return "Suspended"
    return "Running" if "Running" in states else "Pending"


def mean_and_stdev(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1) of the folds' values."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def combine(
    sweep_name: str, index: int, runs: Sequence[ObservedTrial], folds: int
) -> ObservedTrial:
    """One cross-validated trial from the fold runs of trial `index` that exist."""
    ordered = sorted(runs, key=lambda r: r.fold or 0)
    fold_runs = tuple(FoldRun(r.name, r.fold or 0, r.trial.state, r.trial.value) for r in ordered)
    state = fold_state([r.state for r in fold_runs], folds)
    values = [r.value for r in fold_runs if r.state == "Succeeded" and r.value is not None]
    value = stdev = None
    if state == "Succeeded" and len(values) == folds:
        value, stdev = mean_and_stdev(values)
    return ObservedTrial(
        name=trial_name(sweep_name, index),
        trial=Trial(index=index, params=ordered[0].trial.params, state=state, value=value),
        checkpoint_uri=None,  # no one model: each fold's saw part of the data
        accelerator_hours=sum(r.accelerator_hours for r in ordered),
        observation=None,
        unaccounted_hours=sum(r.unaccounted_hours for r in ordered),
        folds=fold_runs,
        stdev=stdev,
    )


def group_folds(
    sweep_name: str, observed: Sequence[ObservedTrial], folds: int
) -> list[ObservedTrial]:
    """Fold runs combined into their trials (runs without a fold label stay as they are)."""
    by_index: dict[int, list[ObservedTrial]] = {}
    result = [o for o in observed if o.fold is None]
    for o in observed:
        if o.fold is not None:
            by_index.setdefault(o.trial.index, []).append(o)
    result += [combine(sweep_name, i, runs, folds) for i, runs in by_index.items()]
    return sorted(result, key=lambda o: o.trial.index)


def merge_intermediate(
    points: Sequence[Mapping[str, Any]], observation: tuple[int, float] | None
) -> list[dict[str, Any]]:
    """The recorded curve plus a new observation at a later step; thinned to every other
    point when it grows past the cap (the latest point is always kept)."""
    curve = [{"step": int(p["step"]), "value": float(p["value"])} for p in points]
    if observation is not None:
        step, value = observation
        if not curve or step > curve[-1]["step"]:
            curve.append({"step": step, "value": value})
        elif step == curve[-1]["step"]:
            curve[-1]["value"] = value
    while len(curve) > MAX_INTERMEDIATE_VALUES:
        curve = curve[:-1:2] + curve[-1:]
    return curve


def show(params: Params) -> dict[str, str]:
    """Parameter values as the status shows them (strings, as Katib's assignments)."""
    return {k: json.dumps(v) if isinstance(v, bool) else str(v) for k, v in params.items()}


def record(observed: ObservedTrial) -> dict[str, Any]:
    trial = observed.trial
    entry: dict[str, Any] = {
        "name": observed.name,
        "index": trial.index,
        "state": trial.state,
        "parameters": show(trial.params),
        "intermediate": [{"step": s, "value": v} for s, v in trial.intermediate],
    }
    if trial.value is not None:
        entry["value"] = trial.value
    if observed.folds:
        entry["folds"] = [r.value for r in observed.folds if r.value is not None]
    if observed.stdev is not None:
        entry["stdev"] = observed.stdev
    return entry


def _leaderboard_value(trial: Trial, direction: str) -> float | None:
    if trial.value is not None:
        return trial.value
    if trial.state == "Pruned" and trial.intermediate:
        values = [v for _, v in trial.intermediate]
        return min(values) if direction == "minimize" else max(values)
    return None


def leaderboard(observed: Sequence[ObservedTrial], direction: str) -> list[dict[str, Any]]:
    """Succeeded and pruned trials with a value, best first."""
    by_index = {o.trial.index: o for o in observed}
    scored = [
        Trial(o.trial.index, o.trial.params, o.trial.state, value)
        for o in observed
        if o.trial.state in ("Succeeded", "Pruned")
        and (value := _leaderboard_value(o.trial, direction)) is not None
    ]
    ranked = rank(scored, "maximize" if direction == "maximize" else "minimize")
    entries = []
    for t in ranked[:LEADERBOARD_SIZE]:
        found = by_index[t.index]
        entry = {"name": found.name, "parameters": show(t.params), "value": t.value}
        if found.stdev is not None:
            entry["stdev"] = found.stdev
        entries.append({**entry, "state": t.state})
    return entries


def best_trial(observed: Sequence[ObservedTrial], direction: str) -> dict[str, Any] | None:
    """The succeeded trial with the best objective value."""
    succeeded = [o.trial for o in observed if o.trial.state == "Succeeded"]
    ranked = rank(succeeded, "maximize" if direction == "maximize" else "minimize")
    if not ranked:
        return None
    best = ranked[0]
    found = next(o for o in observed if o.trial.index == best.index)
    entry: dict[str, Any] = {
        "name": found.name,
        "index": best.index,
        "parameters": show(best.params),
        "value": best.value,
    }
    if found.stdev is not None:
        entry["stdev"] = found.stdev
    if found.checkpoint_uri:
        entry["checkpointUri"] = found.checkpoint_uri
    return entry


def counts(observed: Sequence[ObservedTrial]) -> dict[str, int]:
    states = [o.trial.state for o in observed]
    result = {s.lower(): states.count(s) for s in ("Pending", "Running", "Succeeded", "Failed")}
    result["pruned"] = states.count("Pruned")
    result["suspended"] = states.count("Suspended")
    result["finished"] = result["succeeded"] + result["failed"] + result["pruned"]
    return result


def budget_exhausted(
    budget: Budget | None, observed: Sequence[ObservedTrial], elapsed_seconds: float
) -> str | None:
    """Why the sweep's budget is spent (accelerator hours of all trials, read from their
    status.acceleratorHours, or wall time since it started), or None while it is not."""
    if budget is None:
        return None
    hours = sum(o.accelerator_hours + o.unaccounted_hours for o in observed)
    if budget.max_accelerator_hours is not None and hours >= budget.max_accelerator_hours:
        limit = budget.max_accelerator_hours
        return f"{hours:.2f} accelerator hours used (maxAcceleratorHours={limit})"
    seconds = budget.max_wall_time_seconds
    if seconds is not None and elapsed_seconds >= seconds:
        return f"{int(elapsed_seconds)}s since the sweep started (maxWallTimeSeconds={seconds})"
    return None
