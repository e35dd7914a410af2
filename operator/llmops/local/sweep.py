"""A Sweep, locally: the controller's own decisions (`llmops.decide.sweep`) acted on with the
local TrainingRun runner. Each round observes the Sweep's trial TrainingRuns in the state
directory, decides, creates the new trials and applies the suspend/resume patches as the
operator would, saves the Sweep's status, then trains the next trial to its end with
`llmops.local.training`; until the Sweep finishes.

Trials run one at a time: the local runtime has one machine, so `parallelTrials` is taken as
1 (with crossValidation: one fold run at a time), and the Sweep's budget is checked between
trials (each trial's own budget and deadline still stop it as they do on a cluster).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from llmops.api.sweep import Sweep, SweepStatus
from llmops.builders import sweep as build
from llmops.decide import sweep as decide
from llmops.decide.status import Conditions
from llmops.local import state, training
from llmops.local.common import now
from llmops.local.context import Context, key_of

KIND = decide.KIND
FINISHED = ("Succeeded", "Failed")


def trial_runs(ctx: Context, body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Sweep's trial TrainingRuns (labelled with it and controlled by it), as saved."""
    meta = body["metadata"]
    found = []
    for run in state.all_objects(ctx.layout):
        run_meta = run["metadata"]
        if (
            run["kind"] != "TrainingRun"
            or run_meta.get("namespace") != meta["namespace"]
            or (run_meta.get("labels") or {}).get(build.SWEEP_LABEL) != meta["name"]
            or build.INDEX_LABEL not in (run_meta.get("labels") or {})
        ):
            continue
        owners = run_meta.get("ownerReferences") or []
        if any(o.get("controller") and o.get("uid") == meta["uid"] for o in owners):
            found.append(ctx.objects.get(key_of(run)) or run)
    return found


def runnable(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The next trial run to train: not finished, not suspended; lowest trial and fold."""

    def order(run: Mapping[str, Any]) -> tuple[int, int]:
        labels = run["metadata"]["labels"]
        return int(labels[build.INDEX_LABEL]), int(labels.get(build.FOLD_LABEL, 0))

    waiting = [
        run
        for run in runs
        if (run.get("status") or {}).get("phase") not in FINISHED
        and not (run.get("spec") or {}).get("suspend")
    ]
    return min(waiting, key=order) if waiting else None


def _create(ctx: Context, manifest: Mapping[str, Any]) -> None:
    """A trial TrainingRun, as the API server would hold it (kept if it exists already)."""
    kind, namespace, name = key_of(manifest)
    if state.load_object(ctx.layout, kind, namespace, name) is not None:
        return  # a trial keeps its parameters
    body = state.adopt(ctx.layout, manifest)
    ctx.objects[key_of(body)] = body
    state.save_object(ctx.layout, body)
    ctx.view.update(key_of(body), status={})


def _patch(ctx: Context, namespace: str, item: decide.TrialPatch) -> None:
    """A merge patch of a trial's spec.suspend (and pruning annotation)."""
    body = ctx.get("TrainingRun", namespace, item.name)
    if body is None:
        return
    body = copy.deepcopy(body)
    spec_patch = item.patch.get("spec") or {}
    if any(body["spec"].get(k) != v for k, v in spec_patch.items()):
        body["spec"].update(spec_patch)
        body["metadata"]["generation"] = int(body["metadata"].get("generation") or 1) + 1
        # A spec patch is the operator's, not a new version of the user's manifest.
        annotations = body["metadata"].setdefault("annotations", {})
        annotations["llmops.dev/spec-hash"] = state.spec_hash(body["spec"])
    extra = (item.patch.get("metadata") or {}).get("annotations") or {}
    body["metadata"].setdefault("annotations", {}).update(extra)
    ctx.objects[key_of(body)] = body
    state.save_object(ctx.layout, body)


def _decide(ctx: Context, body: dict[str, Any], sweep: Sweep) -> decide.Decision:
    """One reconcile: observe the trials, decide, act, save the status."""
    status = SweepStatus.model_validate(body.get("status") or {})
    observed = decide.Observed(body, trial_runs(ctx, body))
    decision = decide.decide(sweep, status, observed, now())
    namespace = body["metadata"]["namespace"]
    for item in decision.patches:
        _patch(ctx, namespace, item)
    for child in decision.children:
        _create(ctx, child.manifest)
    for event in decision.events:
        if event.reason in ("TrialCreated", "NewBestTrial", "TrialPruned"):
            ctx.view.message(f"{sweep.metadata.name}: {event.reason}: {event.message}")
    ctx.save(body, decision.status.to_dict())
    return decision


def run(ctx: Context, body: dict[str, Any]) -> bool:
    """True when the Sweep ends Succeeded (now or in an earlier run)."""
    sweep = Sweep.model_validate(
        {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}
    )
    # One machine: one trial (one fold run) at a time.
    local = sweep.model_copy(deep=True)
    local.spec.parallel_trials = 1
    key = key_of(body)
    generation = int(body["metadata"]["generation"])
    current = SweepStatus.model_validate(body.get("status") or {})
    if current.phase == "Succeeded" and current.observed_generation == generation:
        ctx.view.update(key, note="up to date (finished in an earlier run)")
        return True
    if current.phase == "Failed":
        _retry(ctx, body, current, generation)
    ctx.view.update(key, note="trials run one at a time locally")
    while not ctx.stop.is_set():
        decision = _decide(ctx, body, local)
        phase = decision.status.phase
        if phase in FINISHED:
            _report(ctx, body)
            return phase == "Succeeded"
        if phase == "Suspended":
            ctx.view.update(key, note="suspended (spec.suspend)")
            return False
        trial = runnable(trial_runs(ctx, body))
        if trial is None:
            ctx.view.failure(key, "", "no trial left to run and the sweep has not finished")
            return False
        training.run(ctx, trial)  # a failed trial counts in the next decision
    return False


def _retry(ctx: Context, body: dict[str, Any], status: SweepStatus, generation: int) -> None:
    """Applying the manifests again asks for another try (failed trials stay failed)."""
    status.phase = None
    status.completion_time = None
    Conditions(status.conditions, generation, now(), []).set(
        "Failed", "False", "Retrying", "run again with `llmops run`"
    )
    status.conditions = [c for c in status.conditions if c.type != "Complete"]
    ctx.save(body, status.to_dict())


def _report(ctx: Context, body: Mapping[str, Any]) -> None:
    """The best trial (with crossValidation: the fold mean and standard deviation)."""
    status = SweepStatus.model_validate(body.get("status") or {})
    best = status.best_trial
    if best is None:
        return
    metric = body["spec"].get("objective", {}).get("metric", "validationLoss")
    spread = f" ± {best.stdev:.4g} (stdev over folds)" if best.stdev is not None else ""
    shown = f" with {best.parameters}" if best.parameters else ""
    ctx.view.message(f"{best.name}{shown}: {metric} {best.value:.4g}{spread}")
