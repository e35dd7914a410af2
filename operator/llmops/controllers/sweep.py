"""Sweep controller: runs trial TrainingRuns suggested by the search until the trial budget
is spent, keeping a leaderboard and the best trial in the status.

Level-triggered and stateless: every reconcile lists the Sweep's trials (TrainingRuns
labelled `llmops.dev/sweep=<name>`, controlled by this Sweep), reads their parameters from
their annotation, and decides from that alone. Trial names are deterministic
(`<sweep>-trial-<index>`, the next unused index) and trials are created through
`ensure_child` without updates, so a restarted operator neither duplicates a trial nor
re-samples one.

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

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import kopf
from pydantic import ValidationError

from llmops.api import API_VERSION
from llmops.api.sweep import Sweep
from llmops.builders import sweep as build
from llmops.controllers import common
from llmops.metrics import (
    SWEEP_BEST_OBJECTIVE,
    SWEEP_TRIALS,
    SWEEP_TRIALS_CREATED,
    SWEEP_TRIALS_PRUNED,
)
from llmops.search import Trial, median_rule_prunes, suggest, trial_budget

KIND = "Sweep"
TERMINAL = ("Succeeded", "Failed")
ACTIVE = ("Pending", "Running")
STATES = ("pending", "running", "succeeded", "failed", "pruned", "suspended")


def reconcile(body: Mapping[str, Any], patch: kopf.Patch) -> None:
    status = common.StatusWriter(body, KIND)
    if status.phase in TERMINAL:
        return
    try:
        try:
            sweep = Sweep.model_validate(
                {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}
            )
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
                for item in error.errors()
            )
            status.finish("Failed", "InvalidSpec", f"invalid Sweep: {problems}", common.now())
            return
        _reconcile(body, sweep, status)
    finally:
        status.write(patch)


def _trials(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Sweep's trial TrainingRuns (those it controls, not look-alikes)."""
    meta = body["metadata"]
    children = common.kube().list(
        API_VERSION,
        "TrainingRun",
        meta["namespace"],
        label_selector=f"{build.SWEEP_LABEL}={meta['name']}",
    )
    return [
        child
        for child in children
        if any(
            ref.get("controller") and ref.get("uid") == meta["uid"]
            for ref in child["metadata"].get("ownerReferences") or []
        )
        and build.INDEX_LABEL in (child["metadata"].get("labels") or {})
    ]


def _reconcile(body: Mapping[str, Any], sweep: Sweep, status: common.StatusWriter) -> None:
    spec = sweep.spec
    namespace: str = body["metadata"]["namespace"]
    now = common.now()
    if not status.status.get("startTime"):
        status.set(startTime=common.timestamp(now))
    started = common.parse_time(status.status.get("startTime")) or now

    previous = {r["name"]: r for r in status.status.get("trialRecords") or []}
    children = _trials(body)
    observed = [
        build.observe(
            child, spec.objective.metric, previous.get(child["metadata"]["name"]), common.now()
        )
        for child in children
    ]
    observed.sort(key=lambda o: o.trial.index)
    observed = _early_stop(body, sweep, namespace, observed)
    _report(body, sweep, status, observed)
    budget = trial_budget(spec)
    tally = build.counts(observed)
    active = [o for o in observed if o.trial.state in ACTIVE]

    if tally["failed"] >= spec.max_failed_trials:
        _stop_all(namespace, active)
        _report(body, sweep, status, _suspended(observed))
        status.finish(
            "Failed",
            "MaxFailedTrialsReached",
            f"{tally['failed']} trial(s) failed (maxFailedTrials={spec.max_failed_trials})",
            now,
        )
        return
    exhausted = build.budget_exhausted(spec.budget, observed, (now - started).total_seconds())
    if exhausted:
        _stop_all(namespace, active)
        _report(body, sweep, status, _suspended(observed))
        status.finish("Succeeded", "BudgetExhausted", exhausted, now)
        return
    if tally["finished"] >= budget and not active and not tally["suspended"]:
        status.finish(
            "Succeeded",
            "TrialsFinished",
            f"{tally['finished']} trial(s) finished: {tally['succeeded']} succeeded, "
            f"{tally['failed']} failed, {tally['pruned']} pruned",
            now,
        )
        return

    if spec.suspend:
        _stop_all(namespace, active)
        status.set(phase="Suspended")
        status.condition("Suspended", "True", "Suspended", "trials suspended; checkpoints kept")
        status.condition("Running", "False", "Suspended")
        return
    _resume(namespace, observed)
    status.condition("Suspended", "False", "Resumed")

    created = _create_trials(body, sweep, status, observed, budget)
    if created is None:
        return
    running = tally["running"] + tally["suspended"]
    status.set(phase="Running" if running or tally["finished"] else "Pending")
    status.condition("Created", "True", "TrialsCreated", f"{len(observed) + created} trial(s)")
    status.condition(
        "Running",
        "True" if running else "False",
        "TrialsRunning" if running else "WaitingForTrials",
        f"{running} running, {tally['pending']} pending, {tally['finished']}/{budget} finished",
    )
    status.condition("Ready", "False", "SweepInProgress", "the sweep has not finished")


def _create_trials(
    body: Mapping[str, Any],
    sweep: Sweep,
    status: common.StatusWriter,
    observed: list[build.ObservedTrial],
    budget: int,
) -> int | None:
    """Create trials up to parallelTrials active and the trial budget; the number created,
    or None when a suggested spec was invalid (the sweep has failed)."""
    spec = sweep.spec
    trials: list[Trial] = [o.trial for o in observed]
    used = {t.index for t in trials}
    # Suspended trials were just resumed: they take their slots again.
    active = sum(t.state in (*ACTIVE, "Suspended") for t in trials)
    created = 0
    while len(trials) < budget and active < spec.parallel_trials:
        index = next(i for i in range(len(used) + 1) if i not in used)
        params = suggest(spec, index, trials)
        try:
            manifest = build.trial_manifest(body, sweep, index, params)
        except build.InvalidTrial as error:
            status.finish("Failed", "InvalidTrialSpec", str(error), common.now())
            return None
        # The index is unused among the listed trials, so this creates the trial; were it
        # there after all (a race), ensure returns it unchanged: a trial keeps its parameters.
        common.ensure_child(KIND, manifest, update=False)
        SWEEP_TRIALS_CREATED.labels(algorithm=spec.algorithm).inc()
        name = manifest["metadata"]["name"]
        kopf.event(
            cast(kopf.Body, body),
            type="Normal",
            reason="TrialCreated",
            message=f"{name}: {build.show(params)}",
        )
        trials.append(Trial(index=index, params=params, state="Pending"))
        used.add(index)
        active += 1
        created += 1
    return created


def _early_stop(
    body: Mapping[str, Any], sweep: Sweep, namespace: str, observed: list[build.ObservedTrial]
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
            common.kube().patch(
                API_VERSION, "TrainingRun", item.name, namespace, build.suspend_patch(pruned=True)
            )
            SWEEP_TRIALS_PRUNED.labels(rule=rule.rule).inc()
            step, value = trial.intermediate[-1]
            kopf.event(
                cast(kopf.Body, body),
                type="Normal",
                reason="TrialPruned",
                message=f"{item.name} stopped at step {step} ({value:.4g}): worse than the median",
            )
            item = dataclasses.replace(item, trial=dataclasses.replace(trial, state="Pruned"))
        result.append(item)
    return result


def _stop_all(namespace: str, active: Sequence[build.ObservedTrial]) -> None:
    for item in active:
        common.kube().patch(API_VERSION, "TrainingRun", item.name, namespace, build.suspend_patch())


def _suspended(observed: Sequence[build.ObservedTrial]) -> list[build.ObservedTrial]:
    """The trials as they are once the active ones are suspended."""
    return [
        dataclasses.replace(o, trial=dataclasses.replace(o.trial, state="Suspended"))
        if o.trial.state in ACTIVE
        else o
        for o in observed
    ]


def _resume(namespace: str, observed: Sequence[build.ObservedTrial]) -> None:
    """Trials suspended with the sweep run on when it is resumed (pruned ones stay stopped)."""
    for item in observed:
        if item.trial.state == "Suspended":
            common.kube().patch(
                API_VERSION, "TrainingRun", item.name, namespace, build.suspend_patch(suspend=False)
            )


def _report(
    body: Mapping[str, Any],
    sweep: Sweep,
    status: common.StatusWriter,
    observed: Sequence[build.ObservedTrial],
) -> None:
    direction = sweep.spec.objective.direction
    tally = build.counts(observed)
    best = build.best_trial(observed, direction)
    previous_best = (status.status.get("bestTrial") or {}).get("name")
    status.set(
        trials=tally,
        trialRecords=[build.record(o) for o in observed],
        leaderboard=build.leaderboard(observed, direction),
        acceleratorHours=round(sum(o.accelerator_hours for o in observed), 6),
    )
    meta = body["metadata"]
    for state in STATES:
        SWEEP_TRIALS.labels(
            sweep_namespace=meta["namespace"], llmops_sweep=meta["name"], state=state
        ).set(tally[state])
    if best is not None:
        status.set(bestTrial=best)
        SWEEP_BEST_OBJECTIVE.labels(
            sweep_namespace=meta["namespace"],
            llmops_sweep=meta["name"],
            metric=sweep.spec.objective.metric,
        ).set(best["value"])
        if best["name"] != previous_best:
            kopf.event(
                cast(kopf.Body, body),
                type="Normal",
                reason="NewBestTrial",
                message=f"{best['name']}: {sweep.spec.objective.metric}={best['value']:.6g}",
            )


def forget_metrics(namespace: str, name: str) -> None:
    """A deleted Sweep's per-sweep series go too."""
    for state in STATES:
        with contextlib.suppress(KeyError):
            SWEEP_TRIALS.remove(namespace, name, state)
    for metric in ("validationLoss", "perplexity", "accuracy", "trainLoss"):
        with contextlib.suppress(KeyError):
            SWEEP_BEST_OBJECTIVE.remove(namespace, name, metric)


# The handler name becomes kopf's progress annotation key: it must start with a letter.
@kopf.on.delete("llmops.dev", "v1alpha1", "sweeps", optional=True)
def forget_sweep_metrics(body: kopf.Body, **_: Any) -> None:
    forget_metrics(body["metadata"]["namespace"], body["metadata"]["name"])


common.register(KIND, "sweeps", reconcile)
