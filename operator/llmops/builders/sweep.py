"""Sweep -> trial TrainingRuns, and trial TrainingRuns -> the Sweep's status (pure functions).

A trial is the template with each parameter's value set at its path. It carries its
parameters in an annotation, its sweep and index in labels and a controller owner reference
to the Sweep, so everything the search needs is read back from the API server: an operator
restart loses nothing, and a trial once created keeps its parameters.
"""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
PARAMETERS_ANNOTATION = f"{GROUP}/trial-parameters"
# Set (with spec.suspend) when the early-stopping rule stops a trial.
PRUNED_ANNOTATION = f"{GROUP}/trial-pruned"


class InvalidTrial(ValueError):
    """The template with these parameter values is no valid TrainingRun spec."""


def trial_role(index: int) -> str:
    return f"trial-{index}"


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


def trial_spec(sweep: Sweep, params: Params) -> dict[str, Any]:
    """The trial's TrainingRun spec: the template with the parameters applied, validated."""
    spec = sweep.spec.template.to_dict()
    for parameter in sweep.spec.parameters:
        spec = set_path(spec, parameter.path, params[parameter.name])
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
    body: Mapping[str, Any], sweep: Sweep, index: int, params: Params
) -> dict[str, Any]:
    metadata = child_metadata(body, trial_role(index), COMPONENT, **{INDEX_LABEL: str(index)})
    metadata["annotations"] = {PARAMETERS_ANNOTATION: json.dumps(params, sort_keys=True)}
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainingRun",
        "metadata": metadata,
        "spec": trial_spec(sweep, params),
    }


def suspend_patch(*, pruned: bool = False, suspend: bool = True) -> dict[str, Any]:
    """Merge patch that stops (or resumes) a trial; pruning marks it in the same write."""
    patch: dict[str, Any] = {"spec": {"suspend": suspend}}
    if pruned:
        patch["metadata"] = {"annotations": {PRUNED_ANNOTATION: "true"}}
    return patch


@dataclass(frozen=True)
class ObservedTrial:
    """A trial TrainingRun as the Sweep reads it."""

    name: str
    trial: Trial
    checkpoint_uri: str | None
    accelerator_hours: float  # as the trial's status counted them
    observation: tuple[int, float] | None  # (step, objective) now, while running
    # ...plus what a running trial has spent since (its status is written once a minute):
    # what the budget compares, never written to the Sweep's status (no churn).
    unaccounted_hours: float = 0.0


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
            index=int((meta.get("labels") or {})[INDEX_LABEL]),
            params=json.loads((meta.get("annotations") or {}).get(PARAMETERS_ANNOTATION, "{}")),
            state=state,
            value=float(current) if state == "Succeeded" and current is not None else None,
            intermediate=tuple((p["step"], p["value"]) for p in curve),
        ),
        checkpoint_uri=best.get("uri") or status.get("modelUri"),
        accelerator_hours=hours,
        unaccounted_hours=unaccounted,
        observation=observation,
    )


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
    return [
        {
            "name": by_index[t.index].name,
            "parameters": show(t.params),
            "value": t.value,
            "state": t.state,
        }
        for t in ranked[:LEADERBOARD_SIZE]
    ]


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
