"""TrainingRun: from the spec, the observed Dataset, parent run, worker Job, its pods and rank
0's records, decide the children, the Job's suspension, a gang restart and the new status.

The rules of a run live here once: waiting for inputs, budgets, `activeDeadlineSeconds`,
Kueue's admission hold, restarts after a failure (counted) or a preemption (not counted),
and how progress and the final report become status.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from llmops import GROUP, plan
from llmops.api.dataset import DatasetSpec
from llmops.api.trainingrun import (
    CheckpointInfo,
    Checkpoints,
    TrainingMetrics,
    TrainingRun,
    TrainingRunStatus,
)
from llmops.api.workload import (
    ADAPTER_SUBDIR,
    COMPLETION_INDEX_ANNOTATION,
    FINAL_MODEL_SUBDIR,
    OUTPUT_SUBDIR,
    TRAINER_PERMANENT_REASONS,
    TRAINER_STAGE,
    TrainerReport,
    TrainingProgress,
)
from llmops.builders import storage
from llmops.builders import trainingrun as build
from llmops.decide.status import (
    Child,
    Conditions,
    Event,
    failure_report,
    finish,
    is_complete,
    job_failure,
    model_init_failure,
    why_not_running,
)

KIND = "TrainingRun"
# How often a running gang's accelerator-hours are added to its status.
ACCOUNTING_SECONDS = 60
# The initializer failures worth a restart (network, storage); the others are the source's.
TRANSIENT_MODEL_INIT_FAILURE = "ModelFetchFailed"
TERMINAL = ("Succeeded", "Failed")
# On a Job the operator suspended itself: only such a suspension is the operator's to lift
# (Kueue's webhook suspends queued Jobs and admission lifts that one).
SUSPENDED_ANNOTATION = f"{GROUP}/suspended-by-operator"


@dataclass(frozen=True)
class Observed:
    """What observe found: the run as read, its inputs and the current attempt's gang."""

    body: Mapping[str, Any]
    dataset: Mapping[str, Any] | None
    parent: Mapping[str, Any] | None = None  # spec.init.trainingRun, when set
    job: Mapping[str, Any] | None = None
    pods: Sequence[Mapping[str, Any]] = ()
    progress: TrainingProgress | None = None  # rank 0's latest progress record
    report: TrainerReport | None = None  # rank 0's termination message, once it finished
    job_warnings: Sequence[str] = ()  # the Job's FailedCreate events, while pods are missing
    # Kueue's Workload for the Job, where Kueue manages it (a queued run in a cluster with
    # Kueue): why it waits, and whether it is active.
    workload: Mapping[str, Any] | None = None


@dataclass
class Decision:
    status: TrainingRunStatus
    events: list[Event] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    job_name: str | None = None
    suspend_job: bool | None = None  # set the Job's spec.suspend to this (see job_patch)
    workload_name: str | None = None  # Kueue's Workload for the Job
    workload_active: bool | None = None  # set that Workload's spec.active to this
    delete_job: bool = False  # the gang must go (restart, deadline)
    restarted: bool = False


def job_patch(suspend: bool) -> dict[str, Any]:
    """The merge patch that (un)suspends the gang and records that the operator did it."""
    return {
        "metadata": {"annotations": {SUSPENDED_ANNOTATION: "true" if suspend else None}},
        "spec": {"suspend": suspend},
    }


def suspended_by_operator(job: Mapping[str, Any] | None) -> bool:
    annotations = (job or {}).get("metadata", {}).get("annotations") or {}
    return bool(annotations.get(SUSPENDED_ANNOTATION))


# Kueue's Workload conditions that say why it holds a Job, in the order they explain it best.
KUEUE_WAITING = (("Evicted", "True"), ("QuotaReserved", "False"), ("Admitted", "False"))


def kueue_waiting(workload: Mapping[str, Any] | None) -> str | None:
    """Why Kueue holds the Job, in its own words (no quota left, evicted, ...)."""
    found = {
        (c.get("type"), c.get("status")): str(c.get("message") or "")
        for c in ((workload or {}).get("status") or {}).get("conditions") or []
    }
    return next((found[key] for key in KUEUE_WAITING if found.get(key)), None)


def held_by_kueue(run: TrainingRun, job: Mapping[str, Any] | None) -> bool:
    """The gang's Job is queued and suspended, not by the operator: Kueue holds it until it
    admits the workload (its webhook suspends a queued Job on creation, and it suspends an
    admitted one again when it evicts or preempts it)."""
    suspended = bool((job or {}).get("spec", {}).get("suspend"))
    return bool(run.spec.scheduling.queue_name) and suspended and not suspended_by_operator(job)


def attempt(status: TrainingRunStatus) -> int:
    """Each gang gets a Job of its own: the attempt is part of its name."""
    return status.restart_count + status.preemption_count


def job_name(run: TrainingRun, status: TrainingRunStatus) -> str:
    return build.job_name(run.metadata.name, attempt(status))


def accelerators(run: TrainingRun) -> int:
    """What one hour of the gang costs in accelerator-hours: GPUs, or pods without GPUs."""
    return build.accelerators(run.spec)


def checkpoint_base_uri(run: TrainingRun) -> str:
    return storage.uri(run.metadata.name, "checkpoints", run.spec.checkpointing.storage)


def init_uri(run: TrainingRun, parent: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """(uri of the starting weights, why we must wait for them)."""
    init = run.spec.init
    if init is None:
        return None, None
    if init.path:
        return init.path, None
    assert init.training_run is not None
    name = init.training_run.name
    if parent is None:
        return None, f"TrainingRun {name!r} not found"
    checkpoints = (parent.get("status") or {}).get("checkpoints") or {}
    wanted = init.training_run.checkpoint
    chosen = checkpoints.get(wanted) if wanted in ("latest", "best") else None
    if chosen is None and wanted.startswith("step-"):
        base = str((checkpoints.get("latest") or {}).get("uri", "")).rsplit("/", 1)[0]
        if base:
            return f"{base}/{wanted}", None
        return None, f"TrainingRun {name!r} has no checkpoints"
    if chosen is None:
        return None, f"TrainingRun {name!r} has no {wanted} checkpoint yet"
    return str(chosen["uri"]), None


def budget_exhausted(
    run: TrainingRun, status: TrainingRunStatus, now: datetime.datetime
) -> str | None:
    """Why the run's budget is spent, or None while it is not."""
    budget = run.spec.budget
    if budget is None:
        return None
    used = status.accelerator_hours or 0.0
    if budget.max_accelerator_hours is not None and used >= budget.max_accelerator_hours:
        return f"used {used:.3f} of {budget.max_accelerator_hours:g} accelerator-hours"
    started = status.start_time
    if budget.max_wall_time_seconds is not None and started is not None:
        elapsed = (now - started).total_seconds()
        if elapsed >= budget.max_wall_time_seconds:
            return f"ran {elapsed:.0f}s of maxWallTimeSeconds={budget.max_wall_time_seconds}"
    return None


def checkpoint_info(name: str | None, loss: float | None, base_uri: str) -> CheckpointInfo | None:
    """Status entry for a checkpoint folder the trainer named (`step-<N>`)."""
    if not name:
        return None
    digits = name.removeprefix("step-")
    return CheckpointInfo(
        name=name,
        step=int(digits) if digits.isdigit() else 0,
        uri=f"{base_uri}/{name}",
        validation_loss=loss,
    )


def checkpoints(record: TrainingProgress | TrainerReport, base_uri: str) -> Checkpoints | None:
    found = Checkpoints(
        latest=checkpoint_info(
            record.latest_checkpoint, record.latest_checkpoint_validation_loss, base_uri
        ),
        best=checkpoint_info(
            record.best_checkpoint, record.best_checkpoint_validation_loss, base_uri
        ),
    )
    return found if found.latest or found.best else None


def apply_progress(
    status: TrainingRunStatus, record: TrainingProgress, base_uri: str, now: datetime.datetime
) -> None:
    """Step, percentage, ETA, the latest metrics and checkpoints from a progress record."""
    status.step = record.step
    total = record.total_steps or None
    if total:
        status.total_steps = total
        status.progress = min(100, int(100 * record.step / total))
        started = status.start_time
        elapsed = (now - started).total_seconds() if started else 0
        if record.step and elapsed > 0:
            status.estimated_remaining_seconds = int(
                elapsed / record.step * max(0, total - record.step)
            )
    validation = record.validation
    metrics = TrainingMetrics(
        train_loss=record.train_loss,
        train_loss_text=record.train_loss_text,
        train_loss_supervised=record.train_loss_supervised,
        validation_loss=validation.loss if validation else None,
        validation_loss_text=validation.loss_text if validation else None,
        validation_loss_supervised=validation.loss_supervised if validation else None,
        perplexity=validation.perplexity if validation else None,
        accuracy=validation.accuracy if validation else None,
        bleu=validation.bleu if validation else None,
        learning_rate=record.learning_rate,
        tokens_per_second=record.tokens_per_second,
        mfu=record.mfu,
    )
    if metrics.to_dict():
        status.metrics = metrics
    found = checkpoints(record, base_uri)
    if found is not None:
        status.checkpoints = found


def decide(
    run: TrainingRun, status: TrainingRunStatus, observed: Observed, now: datetime.datetime
) -> Decision:
    new = status.model_copy(deep=True)
    decision = Decision(new)
    if new.phase in TERMINAL:
        return decision
    conditions = Conditions(new.conditions, run.metadata.generation, now, decision.events)
    _account(run, new, now)
    _decide(run, observed, decision, conditions, now)
    if new.phase != "Running":
        if status.phase == "Running":
            _account(run, new, now, final=True)  # the last stretch, however short
        new.accounted_until = None  # nothing runs: nothing to count until it does
    return decision


def _account(
    run: TrainingRun, status: TrainingRunStatus, now: datetime.datetime, final: bool = False
) -> None:
    """Add the time the gang ran since it was last counted (an operator that was down
    meanwhile still counts that time: the pods ran). Counted once a minute, when a budget is
    about to be crossed, and when the gang stops (`final`): every write of the status is
    seen by every watcher, so it is not rewritten at every reconcile."""
    since = status.accounted_until
    if since is None:
        status.accounted_until = now  # starts counting
        return
    if status.phase != "Running" and not final:
        return
    pending = max(0.0, (now - since).total_seconds()) / 3600 * accelerators(run)
    limit = run.spec.budget.max_accelerator_hours if run.spec.budget else None
    crossing = limit is not None and (status.accelerator_hours or 0.0) + pending >= limit
    if final or crossing or (now - since).total_seconds() >= ACCOUNTING_SECONDS:
        status.accelerator_hours = round((status.accelerator_hours or 0.0) + pending, 6)
        status.accounted_until = now


def _planned(run: TrainingRun, dataset: Mapping[str, Any], conditions: Conditions) -> str | None:
    """The Planned condition: parameters, tokens, FLOPs, memory per GPU and time (see
    `llmops plan`). Returns why the run must not start when it cannot fit the GPU its node
    selector names; an H100 assumed for want of a selector only warns, since the cluster's
    GPUs are not known, and so does a CPU pod's memory limit."""
    try:
        dataset_spec: DatasetSpec | None = DatasetSpec.model_validate(dataset.get("spec") or {})
    except ValidationError:
        dataset_spec = None
    vocab = ((dataset.get("status") or {}).get("vocabSize")) or None
    options = plan.PlanOptions(
        vocab_size=vocab if isinstance(vocab, int) else None, local_paths=False
    )
    try:
        estimate = plan.plan(run.spec, options, dataset_spec, run.metadata.name)
    except plan.PlanError as error:
        conditions.set("Planned", "False", "SizeUnknown", str(error))
        return None
    if estimate.fits:
        conditions.set("Planned", "True", "Fits", estimate.summary())
        return None
    named = plan.accelerator_from_selector(run.spec.scheduling.node_selector) is not None
    conditions.set("Planned", "False", "DoesNotFit", estimate.summary())
    if not named or run.spec.resources.gpus_per_node == 0:
        # A CPU pod's memory estimate is too rough to refuse on (the runtime's own share
        # varies by image); a GPU's memory is what the node selector names.
        return None
    return f"{estimate.warnings[0]} ({estimate.summary()})"


def _waiting(
    run: TrainingRun, status: TrainingRunStatus, conditions: Conditions, reason: str, why: str
) -> None:
    conditions.set("Created", "False", reason, why)
    if run.spec.suspend:
        # Suspended before anything started (a sweep or schedule that stopped): say so,
        # rather than look as if it were about to start.
        status.phase = "Suspended"
        conditions.set("Suspended", "True", "Suspended", f"suspended while waiting: {why}")
        return
    conditions.set("Suspended", "False", "Resumed")
    status.phase = "Pending"


def _decide(
    run: TrainingRun,
    observed: Observed,
    decision: Decision,
    conditions: Conditions,
    now: datetime.datetime,
) -> None:
    spec, status = run.spec, decision.status
    ready = observed.dataset is not None and is_complete(observed.dataset)
    if not ready:
        why = "DatasetNotFound" if observed.dataset is None else "WaitingForDataset"
        return _waiting(
            run, status, conditions, why, f"Dataset {spec.dataset_ref.name!r} is not ready"
        )
    assert observed.dataset is not None
    dataset_uri = (observed.dataset.get("status") or {}).get("outputUri")
    if not dataset_uri:
        why = f"Dataset {spec.dataset_ref.name!r} reports no output"
        return _waiting(run, status, conditions, "WaitingForDataset", why)
    init, waiting = init_uri(run, observed.parent)
    if waiting:
        return _waiting(run, status, conditions, "WaitingForInitCheckpoint", waiting)
    if status.start_time is None:
        # Only before the first gang: a run that has trained (a later attempt's Job does not
        # exist yet either) is never stopped by an estimate, and is not estimated again.
        refusal = _planned(run, observed.dataset, conditions)
        if refusal is not None:
            return _finish(status, conditions, "Failed", "WillNotFit", refusal, now)

    decision.children = _children(run, observed.body, status, dataset_uri, init)
    decision.job_name = name = job_name(run, status)
    nodes = spec.resources.num_nodes
    conditions.set("Created", "True", "GangCreated", f"Job {name} with {nodes} pod(s)")
    if status.start_time is None:
        status.start_time = now
    job = observed.job
    if _stopped(run, job, observed.workload, decision, conditions, now):
        return
    if is_complete(job):
        if observed.report is None:
            # Without rank 0's report nothing says what was trained or where the model is:
            # a run that cannot show its result has not succeeded.
            why = (
                "the training pods exited 0 but rank 0 left no final report (termination "
                "message): steps, checkpoints and evaluation are unknown"
            )
            return _finish(decision.status, conditions, "Failed", "NoFinalReport", why, now)
        return _succeeded(run, observed.report, decision, conditions, now)
    failure = job_failure(job)
    if failure:
        return _failed(run, observed.pods, failure, decision, conditions, now)
    _gang(run, job, observed, decision, conditions, now)


def _children(
    run: TrainingRun,
    body: Mapping[str, Any],
    status: TrainingRunStatus,
    dataset_uri: str,
    init: str | None,
) -> list[Child]:
    claim = build.checkpoint_claim(body, run)
    return [
        Child(build.config_map(body)),
        Child(build.headless_service(body)),
        *([Child(claim, update=False)] if claim is not None else []),  # immutable once bound
        Child(build.worker_job(body, run, attempt(status), dataset_uri, init), update=False),
    ]


def _stopped(
    run: TrainingRun,
    job: Mapping[str, Any] | None,
    workload: Mapping[str, Any] | None,
    decision: Decision,
    conditions: Conditions,
    now: datetime.datetime,
) -> bool:
    """Budget, suspension and deadline; True when the run ended here."""
    spec, status = run.spec, decision.status
    suspended = bool((job or {}).get("spec", {}).get("suspend"))
    spent = budget_exhausted(run, status, now)
    if spent:
        # Suspending the Job stops the pods with SIGTERM: the trainer checkpoints first.
        if workload is not None:
            _activate(decision, workload, False)
        elif job is not None and not suspended:
            decision.suspend_job = True
        _finish(
            status,
            conditions,
            "Failed",
            "BudgetExhausted",
            f"{spent}; stopped after a checkpoint, which a new TrainingRun can start from "
            "(spec.init.trainingRun)",
            now,
        )
        return True
    # The Job controller stops the pods (SIGTERM: the trainer checkpoints) or recreates
    # them. A queued Job suspended by Kueue waits for Kueue's admission, never for us.
    kueue_managed = spec.scheduling.queue_name is not None and not suspended_by_operator(job)
    if workload is not None:
        # Kueue unsuspends the Job of an admitted Workload, whoever suspended it: the gang
        # is stopped and resumed through the Workload instead (Kueue then evicts it, which
        # suspends the Job, or queues it again).
        _activate(decision, workload, not spec.suspend)
    elif job is not None and suspended != spec.suspend and (spec.suspend or not kueue_managed):
        decision.suspend_job = spec.suspend
    deadline = spec.active_deadline_seconds
    started = status.start_time
    if deadline and started and (now - started).total_seconds() > deadline and not spec.suspend:
        decision.delete_job = True
        message = f"running longer than activeDeadlineSeconds={deadline}"
        _finish(status, conditions, "Failed", "DeadlineExceeded", message, now)
        return True
    return False


def _activate(decision: Decision, workload: Mapping[str, Any], active: bool) -> None:
    """Set the Kueue Workload's spec.active to `active`, unless it already is."""
    if ((workload.get("spec") or {}).get("active") is not False) != active:
        decision.workload_name = workload["metadata"]["name"]
        decision.workload_active = active


def model_subdir(run: TrainingRun) -> str:
    """The run's model in its output folder: a LoRA run without `merge` leaves the adapter
    (peft layout) only."""
    adapter = run.spec.adapter
    return ADAPTER_SUBDIR if adapter is not None and not adapter.merge else FINAL_MODEL_SUBDIR


def _succeeded(
    run: TrainingRun,
    report: TrainerReport,
    decision: Decision,
    conditions: Conditions,
    now: datetime.datetime,
) -> None:
    status = decision.status
    _finish(status, conditions, "Succeeded", "TrainingComplete", "training finished", now)
    base = checkpoint_base_uri(run)
    status.model_uri = f"{base}/{OUTPUT_SUBDIR}/{model_subdir(run)}"
    status.step = report.step
    if report.final_evaluation is not None and report.final_evaluation.to_dict():
        status.final_evaluation = report.final_evaluation
    status.checkpoints = checkpoints(report, base) or status.checkpoints


def was_disrupted(pod: Mapping[str, Any]) -> bool:
    """Evicted, preempted or drained rather than crashed (the DisruptionTarget condition)."""
    return any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def _failed(
    run: TrainingRun,
    pods: Sequence[Mapping[str, Any]],
    failure: str,
    decision: Decision,
    conditions: Conditions,
    now: datetime.datetime,
) -> None:
    status, limit = decision.status, run.spec.max_restarts
    restarts = status.restart_count
    problem = model_init_failure(pods)
    if problem is not None and problem.reason != TRANSIENT_MODEL_INIT_FAILURE:
        # A missing file or a wrong checksum does not heal by restarting: fail now, saying why.
        return _finish(status, conditions, "Failed", problem.reason, problem.message, now)
    crash = failure_report(pods, TRAINER_STAGE)
    if crash is not None and crash.reason in TRAINER_PERMANENT_REASONS:
        # The same spec and data would fail the same way: no restart is spent on it.
        return _finish(status, conditions, "Failed", crash.reason, crash.message, now)
    if any(was_disrupted(p) for p in pods):
        status.preemption_count += 1
        return _restart(decision, conditions, "Preempted", f"gang member preempted: {failure}")
    if restarts >= limit:
        message = f"gang failed after {restarts} restart(s): {failure}"
        return _finish(status, conditions, "Failed", "MaxRestartsExceeded", message, now)
    status.restart_count += 1
    message = f"restart {restarts + 1}/{limit} from the latest checkpoint: {failure}"
    _restart(decision, conditions, "GangMemberFailed", message)


def _restart(decision: Decision, conditions: Conditions, reason: str, message: str) -> None:
    # The restart is counted in the status written with the deletion: if the operator dies
    # right after, the next decision still creates the next attempt exactly once.
    decision.status.phase = "Restarting"
    conditions.set("Restarting", "True", reason, message)
    conditions.set("Running", "False", reason)
    decision.delete_job = True
    decision.restarted = True


def _gang(
    run: TrainingRun,
    job: Mapping[str, Any] | None,
    observed: Observed,
    decision: Decision,
    conditions: Conditions,
    now: datetime.datetime,
) -> None:
    spec, status = run.spec, decision.status
    if spec.suspend:
        status.phase = "Suspended"
        conditions.set("Suspended", "True", "Suspended", "pods stopped; checkpoints kept")
        conditions.set("Running", "False", "Suspended")
        return
    conditions.set("Suspended", "False", "Resumed")
    if held_by_kueue(run, job):
        queue = spec.scheduling.queue_name
        if status.phase == "Running":
            # Kueue took an admitted, running gang back (preempted by a higher priority or
            # evicted): like a preempted pod, a restart from the latest checkpoint that does
            # not spend the restart budget. The next attempt's Job queues again.
            status.preemption_count += 1
            message = f"Kueue stopped the running gang (queue {queue!r}); it queues again"
            if kueue_waiting(observed.workload):
                message = f"{message}: {kueue_waiting(observed.workload)}"
            return _restart(decision, conditions, "Preempted", message)
        status.phase = "Queued"
        why = f"queued in Kueue LocalQueue {queue!r}"
        if kueue_waiting(observed.workload):
            why = f"{why}: {kueue_waiting(observed.workload)}"
        conditions.set("Running", "False", "WaitingForAdmission", why)
        return
    nodes = spec.resources.num_nodes
    running = running_pods(observed.pods)
    if len(running) < nodes:
        if status.phase != "Restarting":
            status.phase = "Pending"
        waiting = f"{len(running)}/{nodes} pods running"
        problem = why_not_running(observed.pods, observed.job_warnings)
        if problem:
            conditions.set("Running", "False", "GangNotSchedulable", f"{waiting}: {problem}")
        else:
            conditions.set("Running", "False", "WaitingForGang", waiting)
        return
    status.phase = "Running"
    conditions.set("Running", "True", "GangRunning", f"{len(running)}/{nodes} pods running")
    conditions.set("Restarting", "False", "GangRunning")
    if observed.progress is not None:
        apply_progress(status, observed.progress, checkpoint_base_uri(run), now)


def running_pods(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]


def gang_running(run: TrainingRun, pods: Sequence[Mapping[str, Any]]) -> bool:
    """Every pod of the gang runs: the state in which rank 0's progress becomes status."""
    return len(running_pods(pods)) == run.spec.resources.num_nodes


def is_leader(pod: Mapping[str, Any]) -> bool:
    """Rank 0's pod: completion index 0 of the Indexed Job."""
    annotations = pod.get("metadata", {}).get("annotations") or {}
    return bool(annotations.get(COMPLETION_INDEX_ANNOTATION) == "0")


def _finish(
    status: TrainingRunStatus,
    conditions: Conditions,
    phase: str,
    reason: str,
    message: str,
    now: datetime.datetime,
) -> None:
    finish(status, conditions, phase, reason, message, now)
    if phase == "Succeeded":
        status.progress = 100
