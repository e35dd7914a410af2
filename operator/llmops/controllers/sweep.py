"""Sweep controller: runs trial TrainingRuns suggested by the search until the trial budget
is spent, keeping a leaderboard and the best trial in the status.

observe (the Sweep's trials) -> `llmops.decide.sweep.decide` (which trials to create, suspend
or resume, how the sweep ends, the new status) -> act (create and patch the trials) and write
the status.

Level-triggered and stateless: every reconcile lists the Sweep's trials (TrainingRuns
labelled `llmops.dev/sweep=<name>`, controlled by this Sweep), reads their parameters from
their annotation, and decides from that alone. Trial names are deterministic
(`<sweep>-trial-<index>`, the next unused index) and trials are created through
`ensure_child` without updates, so a restarted operator neither duplicates a trial nor
re-samples one. How a sweep ends is told in `llmops.decide.sweep`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from llmops.api import API_VERSION
from llmops.api.sweep import Sweep, SweepStatus
from llmops.builders import sweep as build
from llmops.controllers import common
from llmops.decide import sweep as decide
from llmops.metrics import (
    SWEEP_BEST_OBJECTIVE,
    SWEEP_TRIALS,
    SWEEP_TRIALS_CREATED,
    SWEEP_TRIALS_PRUNED,
)

KIND = decide.KIND
STATES = decide.STATES


def reconcile(body: Mapping[str, Any], patch: kopf.Patch) -> None:
    if (body.get("status") or {}).get("phase") in decide.TERMINAL:
        return
    status = SweepStatus.model_validate(body.get("status") or {})
    try:
        sweep = Sweep.model_validate(
            {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}
        )
    except ValidationError as error:
        generation = body["metadata"].get("generation")
        decision = decide.invalid_spec(status, generation, error, common.now())
        common.write_status(body, KIND, decision.status, decision.events, patch)
        return
    decision = decide.decide(sweep, status, observe(body), common.now())
    act(sweep, decision)  # a failed write is retried with a fresh observation, status unwritten
    export(sweep, decision.status)
    common.write_status(body, KIND, decision.status, decision.events, patch)


def observe(body: Mapping[str, Any]) -> decide.Observed:
    """The Sweep's trial TrainingRuns (those it controls, not look-alikes)."""
    meta = body["metadata"]
    children = common.kube().list(
        API_VERSION,
        "TrainingRun",
        meta["namespace"],
        label_selector=f"{build.SWEEP_LABEL}={meta['name']}",
    )
    trials = [
        child
        for child in children
        if any(
            ref.get("controller") and ref.get("uid") == meta["uid"]
            for ref in child["metadata"].get("ownerReferences") or []
        )
        and build.INDEX_LABEL in (child["metadata"].get("labels") or {})
    ]
    return decide.Observed(body, trials)


def act(sweep: Sweep, decision: decide.Decision) -> None:
    """Suspend, resume and prune trials, then create the new ones."""
    kube, namespace = common.kube(), sweep.metadata.namespace
    rule = sweep.spec.early_stopping
    for item in decision.patches:
        kube.patch(API_VERSION, "TrainingRun", item.name, namespace, item.patch)
        if item.pruned and rule is not None:
            SWEEP_TRIALS_PRUNED.labels(rule=rule.rule).inc()
    for child in decision.children:  # created, never updated: a trial keeps its parameters
        common.ensure_child(KIND, child.manifest, update=child.update)
        SWEEP_TRIALS_CREATED.labels(algorithm=sweep.spec.algorithm).inc()


def export(sweep: Sweep, status: SweepStatus) -> None:
    """The per-sweep gauges: trials by state and the best objective value."""
    namespace, name = sweep.metadata.namespace, sweep.metadata.name
    counts = status.trials
    if counts is None:  # nothing reported (the decision changed nothing)
        return
    for state in STATES:
        SWEEP_TRIALS.labels(sweep_namespace=namespace, llmops_sweep=name, state=state).set(
            getattr(counts, state)
        )
    if status.best_trial is not None:
        SWEEP_BEST_OBJECTIVE.labels(
            sweep_namespace=namespace, llmops_sweep=name, metric=sweep.spec.objective.metric
        ).set(status.best_trial.value)


def forget_metrics(namespace: str, name: str) -> None:
    """A deleted Sweep's per-sweep series go too."""
    for state in STATES:
        with contextlib.suppress(KeyError):
            SWEEP_TRIALS.remove(namespace, name, state)
    for metric in ("validationLoss", "perplexity", "accuracy", "trainLoss"):
        with contextlib.suppress(KeyError):
            SWEEP_BEST_OBJECTIVE.remove(namespace, name, metric)


def forget_sweep_metrics(body: Mapping[str, Any]) -> None:
    forget_metrics(body["metadata"]["namespace"], body["metadata"]["name"])


common.register(
    KIND, "sweeps", reconcile, deleted=forget_sweep_metrics, finished_phases=decide.TERMINAL
)
