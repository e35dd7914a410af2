"""Dataset controller: runs the chain of stage Jobs of the current spec version (slice,
dedup, prepare, tokenize, finalize: each created once the one before has completed) and
reports the stage, each stage's progress and the outcome, with the finalize step's
statistics, in the Dataset status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import kopf

from llmops.api import API_VERSION
from llmops.api.dataset import Dataset
from llmops.builders import dataset as build
from llmops.conditions import now_rfc3339
from llmops.controllers import common
from llmops.decide.dataset import (
    RUNNING_REASONS,
    advance,
    fail,
    failure_of,
    final_report,
    mark_processed,
    served_models,
    stage_failed,
    stage_message,
    wait_for_models,
)
from llmops.decide.status import why_not_running

KIND = "Dataset"


def reconcile(body: Mapping[str, Any], patch: kopf.Patch) -> None:
    dataset = common.parse(Dataset, body)
    status = common.StatusWriter(body, KIND)
    generation = int(body["metadata"].get("generation") or 1)
    processed = status.status.get("observedGeneration") == generation
    if status.phase in ("Succeeded", "Failed") and processed:
        return  # this version is done; a spec change starts the next one
    try:
        _reconcile(body, dataset, generation, status)
    finally:
        status.write(patch)


def _reconcile(
    body: Mapping[str, Any], dataset: Dataset, generation: int, status: common.StatusWriter
) -> None:
    namespace: str = body["metadata"]["namespace"]
    _delete_stale_jobs(dataset.metadata.name, namespace, generation)
    common.ensure_child(KIND, build.config_map(body))
    claim = build.output_claim(body, dataset)
    if claim is not None:
        common.ensure_child(KIND, claim, update=False)
    if status.status.get("startTime") is None or status.phase in ("Succeeded", "Failed"):
        status.set(startTime=now_rfc3339(), completionTime=None)
        status.condition("Complete", "False", "Processing", f"version {build.version(generation)}")
        status.condition("Failed", "False", "Processing")
    tokenizer_uri = _reference_tokenizer(dataset, namespace, status)
    if tokenizer_uri is False:
        return
    deployments = _model_deployments(dataset, namespace, status)
    if deployments is None:
        return
    try:
        stages = build.stage_jobs(body, dataset, generation, tokenizer_uri, deployments)
    except ValueError as error:  # a spec the workload cannot be given (e.g. two S3 Secrets)
        fail(status, "UnsupportedSpec", str(error))
        return
    # Observe every stage's Job, decide which one runs next, create it if it is missing.
    kube = common.kube()
    observed = {
        job["metadata"]["name"]: kube.get("batch/v1", "Job", job["metadata"]["name"], namespace)
        for _, job in stages
    }
    step = advance(stages, observed)
    if step.create is not None:
        observed[step.create["metadata"]["name"]] = common.ensure_child(
            KIND, step.create, update=False
        )
        step = advance(stages, observed)
    status.condition(
        "Created",
        "True",
        "JobsCreated",
        f"{dataset.spec.parallelism} slice(s), version {build.version(generation)}",
    )
    status.set(stage=step.stage, stages=[item.to_dict() for item in step.progress])
    if step.done:
        final = observed[step.progress[-1].job] or {}
        mark_processed(status, dataset, generation, final_report(_pods(final, namespace)))
        return
    assert step.stage is not None
    current = next(item for item in step.progress if item.name == step.stage)
    job = observed[current.job] or {}
    if step.failure is not None:
        reason, message = stage_failed(step.stage, step.failure)
        fail(status, *failure_of(_pods(job, namespace), reason, message))
        return
    progress = stage_message(current)
    # Pods that exist are "active" even when nothing can schedule them: say why.
    problem = why_not_running(_pods(job, namespace), common.failed_creates(job, namespace))
    if problem:
        status.set(phase="Pending")
        not_schedulable = f"{build.ROLES[step.stage].capitalize()}NotSchedulable"
        status.condition("Running", "False", not_schedulable, f"{progress}: {problem}")
        return
    active = (job.get("status") or {}).get("active", 0)
    started = active or current.succeeded or step.stage != step.progress[0].name
    status.set(phase="Running" if started else "Pending")
    status.condition(
        "Running", "True" if active else "False", RUNNING_REASONS[step.stage], progress
    )


def _delete_stale_jobs(name: str, namespace: str, generation: int) -> None:
    """Jobs of older versions are stale: the spec they processed is gone. Their output stays."""
    kube = common.kube()
    for job in kube.list("batch/v1", "Job", namespace, label_selector=f"llmops.dev/dataset={name}"):
        if job["metadata"]["labels"].get("llmops.dev/generation") != str(generation):
            kube.delete("batch/v1", "Job", job["metadata"]["name"], namespace)


def _reference_tokenizer(
    dataset: Dataset, namespace: str, status: common.StatusWriter
) -> str | Literal[False] | None:
    """The tokenizer of the Dataset `tokenizer.datasetRef` names: its URI, None without a
    reference, False while that Dataset has none yet (the status says so)."""
    reference = dataset.spec.tokenizer.dataset_ref
    if reference is None:
        return None
    other = common.read_resource(API_VERSION, KIND, reference.name, namespace)
    tokenizer_uri = ((other or {}).get("status") or {}).get("tokenizerUri")
    if common.is_complete(other) and tokenizer_uri:
        return str(tokenizer_uri)
    status.set(phase="Pending")
    why = f"Dataset {reference.name!r} has no tokenizer yet"
    status.condition("Created", "False", "WaitingForTokenizer", why)
    return False


def _model_deployments(
    dataset: Dataset, namespace: str, status: common.StatusWriter
) -> dict[str, build.ServedModel] | None:
    """The ModelDeployments the spec's language models name, resolved; None while one does
    not exist (the status says which)."""
    names = build.model_deployment_names(dataset)
    found = {n: common.read_resource(API_VERSION, "ModelDeployment", n, namespace) for n in names}
    resolved, missing = served_models(dataset, namespace, found)
    if missing:
        wait_for_models(status, missing)
        return None
    return resolved


def _pods(job: Mapping[str, Any], namespace: str) -> list[dict[str, Any]]:
    selector = f"job-name={job['metadata']['name']}"
    pods: list[dict[str, Any]] = common.kube().list("v1", "Pod", namespace, label_selector=selector)
    return pods


common.register(KIND, "datasets", reconcile)
