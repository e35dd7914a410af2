"""TrainingRun controller: keeps a gang of DeepSpeed workers running until training ends.

observe (the Dataset, the parent run, the current attempt's Job, its pods, rank 0's log and
termination message, and Kueue's Workload while Kueue holds the Job)
-> `llmops.decide.trainingrun.decide` -> act (ensure children, suspend or delete the Job)
and write the status. Level-triggered: a restarted operator carries on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import kopf

from llmops.api import API_VERSION
from llmops.api.trainingrun import TrainingRun
from llmops.api.workload import TrainerReport, last_progress, read_record
from llmops.controllers import common
from llmops.decide import trainingrun as decide
from llmops.decide.status import termination_message
from llmops.metrics import ACCELERATOR_HOURS, RESTARTS_TRIGGERED

KIND = decide.KIND
FINISHED = ("Succeeded", "Failed")


def observe(run: TrainingRun, body: Mapping[str, Any]) -> decide.Observed:
    kube, namespace = common.kube(), body["metadata"]["namespace"]
    dataset = common.read_resource(API_VERSION, "Dataset", run.spec.dataset_ref.name, namespace)
    parent_ref = run.spec.init.training_run if run.spec.init else None
    parent = (
        common.read_resource(API_VERSION, KIND, parent_ref.name, namespace) if parent_ref else None
    )
    job_name = decide.job_name(run, run.status)
    job = kube.get("batch/v1", "Job", job_name, namespace)
    if job is None:
        return decide.Observed(body, dataset, parent)
    pods = kube.list("v1", "Pod", namespace, label_selector=f"job-name={job_name}")
    leader = next((p for p in pods if decide.is_leader(p)), None)
    progress = None
    if leader is not None and decide.gang_running(run, pods):  # only then is progress read
        progress = last_progress(kube.pod_log_tail(leader["metadata"]["name"], namespace))
    report = read_record(TrainerReport, termination_message(leader))
    warnings: list[str] = []
    # FailedCreate explains only pods the Job could not create: an API read when some are
    # missing, not on every reconcile of a gang that exists (pending or running).
    active = [p for p in pods if (p.get("status") or {}).get("phase") not in FINISHED]
    if len(active) < run.spec.resources.num_nodes:
        warnings = common.failed_creates(job, namespace)
    workload = common.kueue_workload(job, namespace) if run.spec.scheduling.queue_name else None
    return decide.Observed(body, dataset, parent, job, pods, progress, report, warnings, workload)


def act(run: TrainingRun, decision: decide.Decision) -> None:
    kube, namespace = common.kube(), run.metadata.namespace
    for child in decision.children:
        common.ensure_child(KIND, child.manifest, update=child.update)
    if decision.suspend_job is not None and decision.job_name:
        patch = decide.job_patch(decision.suspend_job)
        kube.patch("batch/v1", "Job", decision.job_name, namespace, patch)
    if decision.workload_active is not None and decision.workload_name:
        patch = {"spec": {"active": decision.workload_active}}
        kube.patch(*common.KUEUE_WORKLOAD, decision.workload_name, namespace, patch)
    if decision.delete_job and decision.job_name:
        kube.delete("batch/v1", "Job", decision.job_name, namespace)
    if decision.restarted:
        RESTARTS_TRIGGERED.labels(kind=KIND).inc()


def reconcile(body: Mapping[str, Any], patch: kopf.Patch) -> None:
    run = common.parse(TrainingRun, body, with_status=True)
    if run.status.phase in decide.TERMINAL:
        return
    decision = decide.decide(run, run.status, observe(run, body), common.now())
    act(run, decision)  # a failed write is retried with a fresh observation, status unwritten
    ACCELERATOR_HOURS.labels(
        training_run_namespace=run.metadata.namespace, training_run=run.metadata.name
    ).set(decision.status.accelerator_hours or 0.0)
    common.write_status(body, KIND, decision.status, decision.events, patch)


def forget_accelerator_hours(body: Mapping[str, Any]) -> None:
    """A deleted run leaves the accelerator-hours gauge (its status held the total)."""
    with contextlib.suppress(KeyError):
        ACCELERATOR_HOURS.remove(body["metadata"]["namespace"], body["metadata"]["name"])


common.register(
    KIND,
    "trainingruns",
    reconcile,
    deleted=forget_accelerator_hours,
    finished_phases=decide.TERMINAL,
)
