"""TrainingRun controller: keeps a gang of DeepSpeed workers running until training ends.

Level-triggered: every few seconds the children are compared with what the spec wants and the
status is computed from what is observed, so a restarted operator simply carries on.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import Mapping
from typing import Any

import kopf

from llmops import GROUP, VERSION
from llmops.api import API_VERSION
from llmops.api.trainingrun import TrainingRun
from llmops.builders import storage
from llmops.builders import trainingrun as build
from llmops.controllers import common
from llmops.controllers.dataset import termination_report
from llmops.metrics import ACCELERATOR_HOURS, RESTARTS_TRIGGERED
from llmops_trainer.progress import parse_log_line  # the trainer's own log format

KIND = "TrainingRun"
TERMINAL = ("Succeeded", "Failed")


def parse_progress(log: str | None) -> dict[str, Any] | None:
    """The last progress record the trainer's rank 0 printed."""
    for line in reversed((log or "").splitlines()):
        try:
            record = parse_log_line(line)
        except json.JSONDecodeError:
            continue  # a line cut short
        if isinstance(record, dict):
            return record
    return None


def checkpoint_info(name: str | None, base_uri: str) -> dict[str, Any] | None:
    """Status entry for a checkpoint folder the trainer named (`step-<N>`)."""
    if not name:
        return None
    digits = name.removeprefix("step-")
    return {
        "name": name,
        "step": int(digits) if digits.isdigit() else 0,
        "uri": f"{base_uri}/{name}",
    }


def checkpoints_status(record: Mapping[str, Any], base_uri: str) -> dict[str, Any]:
    checkpoints = {
        key: checkpoint_info(record.get(f"{key}Checkpoint"), base_uri) for key in ("latest", "best")
    }
    return {k: v for k, v in checkpoints.items() if v}


def progress_status(
    record: Mapping[str, Any], started: datetime.datetime | None, now: datetime.datetime
) -> dict[str, Any]:
    """Status fields from a progress record: step, percentage, ETA, latest metrics."""
    step = int(record.get("step", 0))
    total = int(record.get("totalSteps", 0)) or None
    fields: dict[str, Any] = {"step": step}
    if total:
        fields["totalSteps"] = total
        fields["progress"] = min(100, int(100 * step / total))
        elapsed = (now - started).total_seconds() if started else 0
        if step and elapsed > 0:
            fields["estimatedRemainingSeconds"] = int(elapsed / step * max(0, total - step))
    metric_keys = {
        "trainLoss": "trainLoss",
        "valLoss": "validationLoss",
        "perplexity": "perplexity",
        "accuracy": "accuracy",
        "learningRate": "learningRate",
        "tokensPerSecond": "tokensPerSecond",
        "mfu": "mfu",
    }
    metrics = {
        ours: record[theirs_key]
        for theirs_key, ours in metric_keys.items()
        if record.get(theirs_key) is not None
    }
    if metrics:
        fields["metrics"] = metrics
    return fields


def _index(pod: Mapping[str, Any]) -> str | None:
    annotations = pod["metadata"].get("annotations") or {}
    index: str | None = annotations.get("batch.kubernetes.io/job-completion-index")
    return index


def _init_uri(run: TrainingRun) -> tuple[str | None, str | None]:
    """(uri of the starting weights, why we must wait for them)."""
    init = run.spec.init
    if init is None:
        return None, None
    if init.path:
        return init.path, None
    assert init.training_run is not None
    parent = common.kube().get(API_VERSION, KIND, init.training_run.name, run.metadata.namespace)
    if parent is None:
        return None, f"TrainingRun {init.training_run.name!r} not found"
    checkpoints = (parent.get("status") or {}).get("checkpoints") or {}
    wanted = init.training_run.checkpoint
    chosen = checkpoints.get(wanted) if wanted in ("latest", "best") else None
    if chosen is None and wanted.startswith("step-"):
        latest = checkpoints.get("latest") or {}
        base = latest.get("uri", "").rsplit("/", 1)[0]
        return (
            f"{base}/{wanted}" if base else None,
            None if base else f"TrainingRun {init.training_run.name!r} has no checkpoints",
        )
    if chosen is None:
        return None, f"TrainingRun {init.training_run.name!r} has no {wanted} checkpoint yet"
    return chosen["uri"], None


def reconcile(body: Mapping[str, Any], patch: kopf.Patch) -> None:
    run = common.parse(TrainingRun, body)
    status = common.StatusWriter(body, KIND)
    if status.phase in TERMINAL:
        return
    now = common.now()
    try:
        _account(run, status, now)
        _reconcile(body, run, status, now)
    finally:
        if status.phase != "Running":
            status.set(accountedUntil=None)  # nothing runs: nothing to count until it does
        ACCELERATOR_HOURS.labels(
            training_run_namespace=run.metadata.namespace, training_run=run.metadata.name
        ).set(float(status.status.get("acceleratorHours") or 0.0))
        status.write(patch)


def accelerators(run: TrainingRun) -> int:
    """What one hour of the gang costs in accelerator-hours: GPUs, or pods without GPUs."""
    resources = run.spec.resources
    return resources.num_nodes * max(1, resources.gpus_per_node)


def _account(run: TrainingRun, status: common.StatusWriter, now: datetime.datetime) -> None:
    """Add the time the gang ran since the last reconcile that saw it running (an operator
    that was down meanwhile still counts that time: the pods ran)."""
    since = common.parse_time(status.status.get("accountedUntil"))
    if status.phase == "Running" and since is not None:
        hours = max(0.0, (now - since).total_seconds()) / 3600 * accelerators(run)
        used = float(status.status.get("acceleratorHours") or 0.0) + hours
        status.set(acceleratorHours=round(used, 6))
    status.set(accountedUntil=common.timestamp(now))


def budget_exhausted(
    run: TrainingRun, status: Mapping[str, Any], now: datetime.datetime
) -> str | None:
    """Why the run's budget is spent, or None while it is not."""
    budget = run.spec.budget
    if budget is None:
        return None
    used = float(status.get("acceleratorHours") or 0.0)
    if budget.max_accelerator_hours is not None and used >= budget.max_accelerator_hours:
        return f"used {used:.3f} of {budget.max_accelerator_hours:g} accelerator-hours"
    started = common.parse_time(status.get("startTime"))
    if budget.max_wall_time_seconds is not None and started is not None:
        elapsed = (now - started).total_seconds()
        if elapsed >= budget.max_wall_time_seconds:
            return f"ran {elapsed:.0f}s of maxWallTimeSeconds={budget.max_wall_time_seconds}"
    return None


def _reconcile(
    body: Mapping[str, Any], run: TrainingRun, status: common.StatusWriter, now: datetime.datetime
) -> None:
    spec = run.spec
    namespace: str = body["metadata"]["namespace"]
    kube = common.kube()

    dataset_body = kube.get(API_VERSION, "Dataset", spec.dataset_ref.name, namespace)
    if dataset_body is None or not common.is_complete(dataset_body):
        why = "DatasetNotFound" if dataset_body is None else "WaitingForDataset"
        status.set(phase="Pending")
        status.condition("Created", "False", why, f"Dataset {spec.dataset_ref.name!r} is not ready")
        return
    dataset_uri = (dataset_body.get("status") or {}).get("outputUri")
    if not dataset_uri:
        status.set(phase="Pending")
        status.condition(
            "Created",
            "False",
            "WaitingForDataset",
            f"Dataset {spec.dataset_ref.name!r} reports no output",
        )
        return
    init_uri, waiting = _init_uri(run)
    if waiting:
        status.set(phase="Pending")
        status.condition("Created", "False", "WaitingForInitCheckpoint", waiting)
        return

    common.ensure_child(KIND, build.config_map(body))
    common.ensure_child(KIND, build.headless_service(body))
    claim = build.checkpoint_claim(body, run)
    if claim is not None:
        common.ensure_child(KIND, claim, update=False)  # a bound claim's spec is immutable
    restarts = int(status.status.get("restartCount") or 0)
    preemptions = int(status.status.get("preemptionCount") or 0)
    attempt = restarts + preemptions  # each gang gets a Job of its own
    manifest = build.worker_job(body, run, attempt, dataset_uri, init_uri)
    job = common.ensure_child(KIND, manifest, update=False)
    job_name = manifest["metadata"]["name"]
    status.condition(
        "Created", "True", "GangCreated", f"Job {job_name} with {spec.resources.num_nodes} pod(s)"
    )
    if not status.status.get("startTime"):
        status.set(startTime=common.timestamp(now))

    spent = budget_exhausted(run, status.status, now)
    if spent:
        # Suspending the Job stops the pods with SIGTERM: the trainer checkpoints first.
        if not job["spec"].get("suspend"):
            kube.patch("batch/v1", "Job", job_name, namespace, {"spec": {"suspend": True}})
        _finish(
            status,
            "Failed",
            "BudgetExhausted",
            f"{spent}; stopped after a checkpoint, which a new TrainingRun can start from "
            "(spec.init.trainingRun)",
            now,
        )
        return

    if bool(job["spec"].get("suspend")) != spec.suspend:
        # The Job controller stops the pods (SIGTERM: the trainer checkpoints) or recreates them.
        kube.patch("batch/v1", "Job", job_name, namespace, {"spec": {"suspend": spec.suspend}})

    started = common.parse_time(status.status.get("startTime"))
    deadline = spec.active_deadline_seconds
    if deadline and started and (now - started).total_seconds() > deadline and not spec.suspend:
        kube.delete("batch/v1", "Job", job_name, namespace)
        _finish(
            status,
            "Failed",
            "DeadlineExceeded",
            f"running longer than activeDeadlineSeconds={deadline}",
            now,
        )
        return

    checkpoint_uri = storage.uri(run.metadata.name, "checkpoints", spec.checkpointing.storage)
    if common.is_complete(job):
        _finish(status, "Succeeded", "TrainingComplete", "training finished", now)
        status.set(modelUri=f"{checkpoint_uri}/{build.OUTPUT_SUBDIR}/model")
        pods = kube.list("v1", "Pod", namespace, label_selector=f"job-name={job_name}")
        rank0 = [p for p in pods if _index(p) == "0"]
        summary = termination_report(rank0)
        if summary:
            status.set(
                step=summary.get("step"),
                finalEvaluation=summary.get("finalEvaluation") or None,
                checkpoints=checkpoints_status(summary, checkpoint_uri) or None,
            )
        return
    failure = common.job_failure(job)
    if failure:
        pods = kube.list("v1", "Pod", namespace, label_selector=f"job-name={job_name}")
        if any(_was_disrupted(p) for p in pods):
            _restart(
                run,
                status,
                job_name,
                "Preempted",
                f"gang member preempted: {failure}",
                preemptionCount=preemptions + 1,
            )
        elif restarts >= spec.max_restarts:
            _finish(
                status,
                "Failed",
                "MaxRestartsExceeded",
                f"gang failed after {restarts} restart(s): {failure}",
                now,
            )
        else:
            _restart(
                run,
                status,
                job_name,
                "GangMemberFailed",
                f"restart {restarts + 1}/{spec.max_restarts} from the latest checkpoint: {failure}",
                restartCount=restarts + 1,
            )
        return

    if spec.suspend:
        status.set(phase="Suspended")
        status.condition("Suspended", "True", "Suspended", "pods stopped; checkpoints kept")
        status.condition("Running", "False", "Suspended")
        return
    status.condition("Suspended", "False", "Resumed")
    pods = kube.list("v1", "Pod", namespace, label_selector=f"job-name={job_name}")
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if len(running) == spec.resources.num_nodes:
        status.set(phase="Running")
        status.condition(
            "Running",
            "True",
            "GangRunning",
            f"{len(running)}/{spec.resources.num_nodes} pods running",
        )
        status.condition("Restarting", "False", "GangRunning")
        leader = next((p for p in running if _index(p) == "0"), None)
        if leader is not None:
            record = parse_progress(kube.pod_log_tail(leader["metadata"]["name"], namespace))
            if record:
                status.set(**progress_status(record, started, now))
                checkpoints = checkpoints_status(record, checkpoint_uri)
                if checkpoints:
                    status.set(checkpoints=checkpoints)
    else:
        if status.phase not in ("Restarting",):
            status.set(phase="Pending")
        status.condition(
            "Running",
            "False",
            "WaitingForGang",
            f"{len(running)}/{spec.resources.num_nodes} pods running",
        )


def _was_disrupted(pod: Mapping[str, Any]) -> bool:
    """Evicted, preempted or drained rather than crashed (the DisruptionTarget condition)."""
    return any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def _restart(
    run: TrainingRun,
    status: common.StatusWriter,
    job_name: str,
    reason: str,
    message: str,
    **counter: int,
) -> None:
    # Count the restart first: if the operator dies right after, the next reconcile still
    # creates the next attempt exactly once (the Job name carries the attempt).
    status.set(phase="Restarting", **counter)
    status.condition("Restarting", "True", reason, message)
    status.condition("Running", "False", reason)
    common.kube().delete("batch/v1", "Job", job_name, run.metadata.namespace)
    RESTARTS_TRIGGERED.labels(kind=KIND).inc()


def _finish(
    status: common.StatusWriter, phase: str, reason: str, message: str, now: datetime.datetime
) -> None:
    status.finish(phase, reason, message, now)
    if phase == "Succeeded":
        status.set(progress=100)


common.register(KIND, "trainingruns", reconcile)


@kopf.on.delete(GROUP, VERSION, "trainingruns", optional=True)
def forget_accelerator_hours(body: kopf.Body, **_: Any) -> None:
    """A deleted run leaves the accelerator-hours gauge (its status held the total)."""
    with contextlib.suppress(KeyError):
        ACCELERATOR_HOURS.remove(body["metadata"]["namespace"], body["metadata"]["name"])
