"""Sweep: from the spec, the observed trial TrainingRuns and the status, decide the trials to
create, the trials to suspend (pruned, or stopped with the sweep) or resume, and the new
status: trial counts, a record per trial, the leaderboard and the best trial.

The trials are everything: their parameters come back from their annotation and their
objective curves from the status records kept of them, so a decision needs nothing else.
A new trial gets the next unused index and is created without updates, so a decision made
twice (a restart, a lost status write) neither duplicates nor re-samples a trial.

With `spec.crossValidation` a trial is k fold runs (`build.combine` makes one trial of
them): `parallelTrials` then limits the fold runs pending or running at once, the missing
folds of started trials are created before a new trial is suggested, a failed fold fails its
trial (its other active folds are suspended), and suspending or resuming the sweep suspends
or resumes every fold run.

How a sweep ends:
- Complete=True, reason `TrialsFinished`: maxTrials trials (capped at the grid size for grid
  search) finished (succeeded, failed or pruned) and none is running; phase Succeeded.
- Complete=True, reason `BudgetExhausted`: the accelerator hours of all trials or the wall
  time since the sweep started reached `budget`; running trials are suspended (keeping their
  checkpoints) and no new ones start; phase Succeeded, with the best trial found so far.
- Failed=True, reason `MaxFailedTrialsReached`: maxFailedTrials trials failed (running trials
  are suspended); `InvalidTrialSpec`: a suggested trial spec is no valid TrainingRun spec;
  `InvalidSpec`: the Sweep's spec failed validation the CRD schema cannot express.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import ValidationError

from llmops.api.sweep import (
    BestTrial,
    LeaderboardEntry,
    Sweep,
    SweepStatus,
    TrialCounts,
    TrialRecord,
)
from llmops.builders import sweep as build
from llmops.decide.status import Child, Conditions, Event, finish
from llmops.search import Params, Trial, median_rule_prunes, suggest, trial_budget

KIND = "Sweep"
TERMINAL = ("Succeeded", "Failed")
ACTIVE = ("Pending", "Running")
STATES = ("pending", "running", "succeeded", "failed", "pruned", "suspended")


@dataclass(frozen=True)
class Observed:
    """What observe found: the Sweep as read and the trial TrainingRuns it controls."""

    body: Mapping[str, Any]  # its metadata goes into the trials (owner reference, labels)
    trials: Sequence[Mapping[str, Any]] = ()


class TrialPatch(NamedTuple):
    """A merge patch for a trial TrainingRun (see `build.suspend_patch`)."""

    name: str
    patch: dict[str, Any]
    pruned: bool = False  # the early-stopping rule stopped it


@dataclass
class Decision:
    status: SweepStatus
    events: list[Event] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)  # new trials, never updated
    patches: list[TrialPatch] = field(default_factory=list)  # suspend or resume trials


def invalid_spec(
    status: SweepStatus, generation: int | None, error: ValidationError, now: datetime.datetime
) -> Decision:
    """The Sweep's spec failed validation the CRD schema cannot express: it fails, naming the
    fields."""
    problems = "; ".join(
        f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()
    )
    decision = Decision(status.model_copy(deep=True))
    conditions = Conditions(decision.status.conditions, generation, now, decision.events)
    finish(decision.status, conditions, "Failed", "InvalidSpec", f"invalid Sweep: {problems}", now)
    return decision


def observe_trials(
    sweep: Sweep,
    status: SweepStatus,
    children: Sequence[Mapping[str, Any]],
    now: datetime.datetime,
) -> list[build.ObservedTrial]:
    """The trials by index, each with the objective curve the status recorded of it."""
    previous = {r.name: r.to_dict() for r in status.trial_records}
    metric = sweep.spec.objective.metric
    found = [
        build.observe(child, metric, previous.get(child["metadata"]["name"]), now)
        for child in children
    ]
    cv = sweep.spec.cross_validation
    if cv is not None:
        return build.group_folds(sweep.metadata.name, found, cv.folds)
    return sorted(found, key=lambda o: o.trial.index)


def decide(
    sweep: Sweep, status: SweepStatus, observed: Observed, now: datetime.datetime
) -> Decision:
    new = status.model_copy(deep=True)
    decision = Decision(new)
    if new.phase in TERMINAL:
        return decision
    conditions = Conditions(new.conditions, sweep.metadata.generation, now, decision.events)
    if new.start_time is None:
        new.start_time = now
    trials = _early_stop(sweep, observe_trials(sweep, status, observed.trials, now), decision)
    _stop_failed_folds(decision, trials)
    active = [o for o in trials if o.trial.state in ACTIVE]
    end = ending(sweep, trials, new.start_time, now)
    if end is not None:
        # Running trials are suspended (keeping their checkpoints); none is left to run.
        _suspend(decision, active)
        _report(sweep, decision, _suspended(trials))
        finish(new, conditions, *end, now)
        return decision
    _report(sweep, decision, trials)
    if sweep.spec.suspend:
        _suspend(decision, active)
        new.phase = "Suspended"
        conditions.set("Suspended", "True", "Suspended", "trials suspended; checkpoints kept")
        conditions.set("Running", "False", "Suspended")
        return decision
    _resume(decision, trials)
    conditions.set("Suspended", "False", "Resumed")
    if not _create_trials(sweep, observed.body, trials, decision, conditions):
        return decision
    indices = {c.manifest["metadata"]["labels"][build.INDEX_LABEL] for c in decision.children}
    created = len(indices - {str(o.trial.index) for o in trials})
    _progress(sweep, trials, created, new, conditions)
    return decision


def ending(
    sweep: Sweep,
    trials: Sequence[build.ObservedTrial],
    started: datetime.datetime,
    now: datetime.datetime,
) -> tuple[str, str, str] | None:
    """(phase, reason, message) of how the sweep ends now, or None while it goes on."""
    spec = sweep.spec
    tally = build.counts(trials)
    if tally["failed"] >= spec.max_failed_trials:
        message = f"{tally['failed']} trial(s) failed (maxFailedTrials={spec.max_failed_trials})"
        return "Failed", "MaxFailedTrialsReached", message
    exhausted = build.budget_exhausted(spec.budget, trials, (now - started).total_seconds())
    if exhausted:
        return "Succeeded", "BudgetExhausted", exhausted
    active = any(o.trial.state in ACTIVE for o in trials)
    if tally["finished"] >= trial_budget(spec) and not active and not tally["suspended"]:
        return (
            "Succeeded",
            "TrialsFinished",
            f"{tally['finished']} trial(s) finished: {tally['succeeded']} succeeded, "
            f"{tally['failed']} failed, {tally['pruned']} pruned",
        )
    return None


def _progress(
    sweep: Sweep,
    trials: Sequence[build.ObservedTrial],
    created: int,
    status: SweepStatus,
    conditions: Conditions,
) -> None:
    """Phase and conditions of a sweep that goes on. Suspended trials were just resumed:
    they count as running."""
    tally = build.counts(trials)
    running = tally["running"] + tally["suspended"]
    status.phase = "Running" if running or tally["finished"] else "Pending"
    conditions.set("Created", "True", "TrialsCreated", f"{len(trials) + created} trial(s)")
    conditions.set(
        "Running",
        "True" if running else "False",
        "TrialsRunning" if running else "WaitingForTrials",
        f"{running} running, {tally['pending']} pending, "
        f"{tally['finished']}/{trial_budget(sweep.spec)} finished",
    )
    conditions.set("Ready", "False", "SweepInProgress", "the sweep has not finished")


def _create_trials(
    sweep: Sweep,
    body: Mapping[str, Any],
    observed: Sequence[build.ObservedTrial],
    decision: Decision,
    conditions: Conditions,
) -> bool:
    """Trials to create, up to parallelTrials active and the trial budget, each at the next
    unused index (with crossValidation: fold runs, the missing folds of started trials
    first); False when a suggested spec was invalid (the sweep has failed; the trials
    suggested before it are still created)."""
    spec = sweep.spec
    budget = trial_budget(spec)
    trials: list[Trial] = [o.trial for o in observed]
    used = {t.index for t in trials}
    # Suspended trials were just resumed: they take their slots again.
    slots = spec.parallel_trials - _active_runs(sweep, observed)
    try:
        for o in observed:  # crossValidation: folds not created yet (the limit held them)
            if o.folds and o.trial.state in (*ACTIVE, "Suspended"):
                slots -= _create_folds(
                    sweep, body, o.trial.index, o.trial.params, o, slots, decision
                )
        while len(trials) < budget and slots > 0:
            index = next(i for i in range(len(used) + 1) if i not in used)
            params = suggest(spec, index, trials)
            slots -= _create_folds(sweep, body, index, params, None, slots, decision)
            trials.append(Trial(index=index, params=params, state="Pending"))
            used.add(index)
    except build.InvalidTrial as error:
        now = conditions.now
        finish(decision.status, conditions, "Failed", "InvalidTrialSpec", str(error), now)
        return False
    return True


def _active_runs(sweep: Sweep, observed: Sequence[build.ObservedTrial]) -> int:
    """TrainingRuns that take a parallelTrials slot: those of pending, running and (just
    resumed) suspended trials; with crossValidation, the fold runs of such trials not
    finished (a failed trial's suspended folds stay stopped)."""
    taking = (*ACTIVE, "Suspended")
    if sweep.spec.cross_validation is None:
        return sum(1 for o in observed if o.trial.state in taking)
    return sum(len(o.run_names(taking)) for o in observed if o.trial.state in taking)


def _create_folds(
    sweep: Sweep,
    body: Mapping[str, Any],
    index: int,
    params: Params,
    existing: build.ObservedTrial | None,
    slots: int,
    decision: Decision,
) -> int:
    """Create the trial's TrainingRun (with crossValidation: its missing fold runs, at most
    `slots`); returns how many were created. Raises InvalidTrial."""
    cv = sweep.spec.cross_validation
    if cv is None:
        wanted: Sequence[int | None] = [None]
    else:
        have = {r.fold for r in existing.folds} if existing is not None else set()
        wanted = [f for f in range(cv.folds) if f not in have][: max(slots, 0)]
    for fold in wanted:
        manifest = build.trial_manifest(body, sweep, index, params, fold)
        # The name is unused among the listed trials, so this creates the run; were it there
        # after all (a race), ensure returns it unchanged: a trial keeps its parameters.
        decision.children.append(Child(manifest, update=False))
        name = manifest["metadata"]["name"]
        decision.events.append(Event("Normal", "TrialCreated", f"{name}: {build.show(params)}"))
    return len(wanted)


def _early_stop(
    sweep: Sweep, observed: list[build.ObservedTrial], decision: Decision
) -> list[build.ObservedTrial]:
    """Suspend running trials the median rule stops; returns the trials with their new state."""
    rule = sweep.spec.early_stopping
    if rule is None:
        return observed
    result = []
    for item in observed:
        trial = item.trial
        if trial.state == "Running" and median_rule_prunes(
            trial.intermediate,
            [o.trial.intermediate for o in observed if o is not item],
            min_trials=rule.min_trials,
            start_step=rule.start_step,
            direction=sweep.spec.objective.direction,
        ):
            decision.patches.append(
                TrialPatch(item.name, build.suspend_patch(pruned=True), pruned=True)
            )
            step, value = trial.intermediate[-1]
            message = f"{item.name} stopped at step {step} ({value:.4g}): worse than the median"
            decision.events.append(Event("Normal", "TrialPruned", message))
            item = dataclasses.replace(item, trial=dataclasses.replace(trial, state="Pruned"))
        result.append(item)
    return result


def _suspend(decision: Decision, active: Sequence[build.ObservedTrial]) -> None:
    decision.patches += [
        TrialPatch(name, build.suspend_patch()) for o in active for name in o.run_names(ACTIVE)
    ]


def _stop_failed_folds(decision: Decision, observed: Sequence[build.ObservedTrial]) -> None:
    """crossValidation: a trial with a failed fold has failed; its folds still pending or
    running are suspended (keeping their checkpoints) rather than spending more hours."""
    _suspend(decision, [o for o in observed if o.folds and o.trial.state == "Failed"])


def _suspended(observed: Sequence[build.ObservedTrial]) -> list[build.ObservedTrial]:
    """The trials as they are once the active ones are suspended."""
    return [
        dataclasses.replace(o, trial=dataclasses.replace(o.trial, state="Suspended"))
        if o.trial.state in ACTIVE
        else o
        for o in observed
    ]


def _resume(decision: Decision, observed: Sequence[build.ObservedTrial]) -> None:
    """Trials suspended with the sweep run on when it is resumed (pruned ones stay stopped)."""
    decision.patches += [
        TrialPatch(name, build.suspend_patch(suspend=False))
        for o in observed
        if o.trial.state == "Suspended"
        for name in o.run_names(("Suspended",))
    ]


def _report(sweep: Sweep, decision: Decision, observed: Sequence[build.ObservedTrial]) -> None:
    """Counts, records, leaderboard, accelerator hours and the best trial (an event when a
    new one leads)."""
    status = decision.status
    direction = sweep.spec.objective.direction
    previous_best = status.best_trial.name if status.best_trial else None
    status.trials = TrialCounts.model_validate(build.counts(observed))
    status.trial_records = [TrialRecord.model_validate(build.record(o)) for o in observed]
    status.leaderboard = [
        LeaderboardEntry.model_validate(entry) for entry in build.leaderboard(observed, direction)
    ]
    status.accelerator_hours = round(sum(o.accelerator_hours for o in observed), 6)
    best = build.best_trial(observed, direction)
    if best is None:
        return
    status.best_trial = BestTrial.model_validate(best)
    if best["name"] != previous_best:
        metric = sweep.spec.objective.metric
        message = f"{best['name']}: {metric}={best['value']:.6g}"
        decision.events.append(Event("Normal", "NewBestTrial", message))
