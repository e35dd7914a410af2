"""A Dataset, locally: the chain of stage Jobs (slice, dedup, prepare, tokenize, finalize;
all indexes of each), from the operator's builders, with the status the Dataset controller
would write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmops.api.common import SecretKeySelector
from llmops.api.dataset import Dataset
from llmops.builders import dataset as build
from llmops.decide.dataset import (
    RUNNING_REASONS,
    fail,
    failure_of,
    final_report,
    mark_processed,
    progress_of,
    stage_failed,
    stage_message,
)
from llmops.decide.status import StatusDraft
from llmops.local.common import copy_if_exists, host_path, timestamp
from llmops.local.context import Context, key_of
from llmops.local.job import JobResult, run_job
from llmops.local.process import Process, tail

KIND = "Dataset"
CARD = "README.md"  # the engine writes the dataset card as the output's README


def output_dir(ctx: Context, dataset: Dataset, generation: int) -> Path:
    namespace = dataset.metadata.namespace or "default"
    return host_path(ctx.layout, namespace, build.output_uri(dataset, generation))


def check_local(dataset: Dataset) -> None:
    if dataset.spec.output is not None and dataset.spec.output.s3 is not None:
        raise ValueError("spec.output.s3: the local runtime writes to volumes only")


def served_locally(ctx: Context, dataset: Dataset) -> dict[str, build.ServedModel]:
    """The ModelDeployments the spec's language models name, as this run (or an earlier
    `llmops run --detach`) serves them: their local URL and served name."""
    namespace = dataset.metadata.namespace or "default"
    served: dict[str, build.ServedModel] = {}
    for name in build.model_deployment_names(dataset):
        body = ctx.get("ModelDeployment", namespace, name) or {}
        status = body.get("status") or {}
        if not status.get("url") or status.get("phase") != "Ready":
            raise ValueError(
                f"ModelDeployment {name!r} is not served locally: put it in the same "
                "`llmops run` (it starts first) or serve it with `llmops run --detach`"
            )
        secret = ((body.get("spec") or {}).get("server") or {}).get("authTokenSecret")
        served[name] = build.ServedModel(
            url=str(status["url"]),
            model=str(status.get("model") or name),
            auth_token_secret=SecretKeySelector.model_validate(secret) if secret else None,
        )
    return served


def run(ctx: Context, body: dict[str, Any]) -> bool:
    """True when the Dataset ends Succeeded (now or in an earlier run)."""
    dataset = Dataset.model_validate(
        {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")}
    )
    check_local(dataset)
    generation = int(body["metadata"]["generation"])
    status = StatusDraft(body, KIND)
    key = key_of(body)
    out = output_dir(ctx, dataset, generation)
    done = status.phase == "Succeeded" and status.status.get("observedGeneration") == generation
    if done and (out / "manifest.json").is_file():
        ctx.view.update(key, note="up to date (output kept from an earlier run)")
        return True

    stages = build.stage_jobs(body, dataset, generation, deployments=served_locally(ctx, dataset))
    ctx.record_children(
        body,
        [build.config_map(body), build.output_claim(body, dataset), *(j for _, j in stages)],
    )
    status.set(startTime=timestamp(), completionTime=None)
    status.condition("Complete", "False", "Processing", f"version {build.version(generation)}")
    status.condition("Failed", "False", "Processing")
    status.condition(
        "Created",
        "True",
        "JobsCreated",
        f"{dataset.spec.parallelism} slice(s), version {build.version(generation)}",
    )
    status.set(phase="Running")

    # The stages in order, each Job once the one before has succeeded, as the controller
    # runs them (decide.dataset.advance), with the same per-stage progress in the status.
    progress = [progress_of(stage, job, None) for stage, job in stages]
    result: JobResult | None = None
    for number, (stage, job) in enumerate(stages):
        progress[number] = progress[number].model_copy(update={"state": "Running"})
        status.set(stage=stage, stages=[item.to_dict() for item in progress])
        status.condition("Running", "True", RUNNING_REASONS[stage], stage_message(progress[number]))
        ctx.save(body, status.status)
        result = _run(ctx, body, job)
        completions = progress[number].completions
        progress[number] = progress[number].model_copy(
            update={
                "state": "Complete" if result.succeeded else "Failed",
                "succeeded": completions if result.succeeded else 0,
            }
        )
        status.set(stages=[item.to_dict() for item in progress])
        if not result.succeeded:
            return _stopped(ctx, body, status, result, stage)
    assert result is not None

    # From here on, what the Dataset controller does when the finalize Job completes.
    status.set(stage=None)
    mark_processed(status, dataset, generation, final_report(result.pod_objects()))
    ctx.save(body, status.status)
    kind, namespace, name = key
    copy_if_exists(out / CARD, ctx.layout.resource_dir(kind, namespace, name) / "dataset_card.md")
    return True


def _run(ctx: Context, body: dict[str, Any], job: dict[str, Any]) -> JobResult:
    name = job["metadata"]["name"]
    template = job["spec"]["template"]
    key = key_of(body)
    stage = template["metadata"]["labels"].get("llmops.dev/stage", "")
    completions = int(job["spec"].get("completions") or 1)

    def start(index: int | None) -> Process:
        pod = ctx.prepare_pod(body, template, f"{name}-{index or 0}", index=index)
        ctx.view.update(key, note=f"{stage} {'' if index is None else index}".strip())
        return ctx.start(body, pod)

    ctx.view.update(key, note=f"{stage}: {completions} pod(s)")
    return run_job(job, start, ctx.stop)


def _stopped(
    ctx: Context, body: dict[str, Any], status: StatusDraft, result: JobResult, stage: str
) -> bool:
    if result.interrupted:
        status.set(phase="Pending")
        status.condition("Running", "False", "Interrupted", "stopped; `llmops run` resumes")
        ctx.save(body, status.status)
        return False
    reason, message = stage_failed(stage, result.failure or "failed")
    fail(status, *failure_of(result.pod_objects(), reason, message))
    ctx.save(body, status.status)
    if result.failed_pod is not None:
        log = Path(result.failed_pod.log_file)
        ctx.view.failure(key_of(body), str(log), tail(log))
    return False
