"""Dataset outcomes shared by the controller and the local runtime: which stage's Job runs
next, per-stage progress, a processed version's status from the finalize step's report, and a
failed version (the condition's reason names the failed stage)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from llmops.api.dataset import Dataset, StageProgress
from llmops.api.modeldeployment import ModelDeployment
from llmops.api.workload import LLM_ENDPOINT_FAILED, DataMergeReport, read_record
from llmops.builders import dataset as build
from llmops.builders import modeldeployment as md_build
from llmops.conditions import now_rfc3339
from llmops.decide.status import (
    StatusDraft,
    failure_report,
    is_complete,
    job_failure,
    model_init_failure,
    termination_message,
)

SLICE_STAGE = "slice"  # data_command's stage of the slice pods (their FailureReport's stage)
# Per stage: the reason of a Failed condition and of the Running condition while it runs.
FAILED_REASONS = {
    "slice": "SliceFailed",
    "dedup": "DedupFailed",
    "prepare": "PrepareFailed",
    "tokenize": "TokenizeFailed",
    "finalize": "FinalizeFailed",
}
RUNNING_REASONS = {
    "slice": "Slicing",
    "dedup": "Deduplicating",
    "prepare": "Preparing",
    "tokenize": "Tokenizing",
    "finalize": "Finalizing",
}
WHAT = {
    "slice": "slices done",
    "dedup": "dedup groups done (LSH buckets, exact copies)",
    "prepare": "prepare done (clusters, splits, tokenizer)",
    "tokenize": "tokenize pods done (shards)",
    "finalize": "finalize done (manifest, card)",
}


def progress_of(
    stage: str, manifest: Mapping[str, Any], job: Mapping[str, Any] | None
) -> StageProgress:
    """A stage's progress from its Job (None: not created yet)."""
    completions = int(manifest["spec"].get("completions") or 1)
    observed = (job or {}).get("status") or {}
    state = "Pending"
    if job is not None:
        state = "Failed" if job_failure(job) else "Complete" if is_complete(job) else "Running"
    return StageProgress.model_validate(
        {
            "name": stage,
            "job": manifest["metadata"]["name"],
            "completions": completions,
            "succeeded": int(observed.get("succeeded") or 0),
            "failed": int(observed.get("failed") or 0),
            "state": state,
        }
    )


@dataclass
class Advance:
    """What a version's chain of Jobs needs now: `create` the Job of the first stage not
    complete when it does not exist yet (each stage starts only after the one before has
    completed); `stage` is that stage (None once all are complete); `failure` the message
    of its Job's failure; `progress` every stage's."""

    stage: str | None = None
    create: dict[str, Any] | None = None
    failure: str | None = None
    progress: list[StageProgress] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.stage is None and self.failure is None


def advance(
    stages: Sequence[tuple[str, dict[str, Any]]], observed: Mapping[str, Mapping[str, Any] | None]
) -> Advance:
    """`stages`: (stage, Job manifest) in order (build.stage_jobs); `observed`: Job name ->
    the Job as it is (None when it does not exist)."""
    out = Advance()
    for stage, manifest in stages:
        job = observed.get(manifest["metadata"]["name"])
        if out.stage is not None:  # a later stage: not started before this one completes
            job = None
        out.progress.append(progress_of(stage, manifest, job))
        if out.stage is not None or is_complete(job):
            continue
        out.stage = stage
        if job is None:
            out.create = manifest
        else:
            out.failure = job_failure(job)
    return out


def stage_message(item: StageProgress) -> str:
    """e.g. `2/3 slices done`."""
    return f"{item.succeeded}/{item.completions} {WHAT.get(item.name, 'done')}"


def stage_failed(stage: str, message: str) -> tuple[str, str]:
    """Reason and message of a failed stage's Failed condition (and Warning event)."""
    return FAILED_REASONS.get(stage, "ProcessingFailed"), f"stage {stage}: {message}"


def final_report(pods: Sequence[Mapping[str, Any]]) -> DataMergeReport | None:
    """The statistics a succeeded finalize pod left as its termination message."""
    for pod in pods:
        report = read_record(DataMergeReport, termination_message(pod))
        if report is not None:
            return report
    return None


def mark_processed(
    status: StatusDraft, dataset: Dataset, generation: int, report: DataMergeReport | None
) -> None:
    """The status of a version whose finalize step succeeded, with the statistics it reported
    (also used by the local runtime, so both report a Dataset the same way)."""
    if report is not None:
        status.set(**report.to_dict())
    output = build.output_uri(dataset, generation)
    status.set(
        phase="Succeeded",
        completionTime=now_rfc3339(),
        outputUri=output,
        tokenizerUri=f"{output}/tokenizer.json",
    )
    status.condition("Running", "False", "Processed")
    status.condition(
        "Complete",
        "True",
        "Processed",
        f"version {build.version(generation)} ready"
        + ("" if report is not None else " (the finalize step reported no statistics)"),
    )
    status.condition("Ready", "True", "Processed")


def fail(status: StatusDraft, reason: str, message: str) -> None:
    status.set(phase="Failed", completionTime=now_rfc3339())
    status.condition("Running", "False", reason)
    status.condition("Failed", "True", reason, message)
    status.condition("Ready", "False", reason, message)


def failure_of(pods: Sequence[Mapping[str, Any]], reason: str, message: str) -> tuple[str, str]:
    """Reason and message of a failed data Job: the model initializer's own reason when a bad
    tokenizer.fromModel source made it fail (ModelNotFound, ChecksumMismatch, ...), and a
    slice's `EndpointFailed` (its message names the endpoint and the HTTP status) when a
    language model refused or kept failing."""
    problem = model_init_failure(pods)
    if problem is not None:
        return problem.reason, f"tokenizer.fromModel: {problem.message}"
    report = failure_report(pods, SLICE_STAGE)
    if report is not None and report.reason == LLM_ENDPOINT_FAILED:
        return report.reason, report.message
    return reason, message


def served_models(
    dataset: Dataset, namespace: str, found: Mapping[str, Mapping[str, Any] | None]
) -> tuple[dict[str, build.ServedModel], list[str]]:
    """(the ModelDeployments the Dataset asks, resolved to their Service URL, served name and
    token Secret; why the others are not usable yet: missing, or no replica Available yet, so
    that slices never start against a server that cannot answer). `found`: name -> the object
    or None."""
    resolved: dict[str, build.ServedModel] = {}
    missing: list[str] = []
    for name in build.model_deployment_names(dataset):
        body = found.get(name)
        if body is None:
            missing.append(f"ModelDeployment {name!r} does not exist")
            continue
        available = any(
            c.get("type") == "Available" and c.get("status") == "True"
            for c in (body.get("status") or {}).get("conditions") or []
        )
        if not available:
            missing.append(f"ModelDeployment {name!r} has no replica Available yet")
            continue
        try:
            md = ModelDeployment.model_validate(
                {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")}
            )
        except (KeyError, ValidationError):
            missing.append(f"ModelDeployment {name!r} is not valid")
            continue
        resolved[name] = build.ServedModel(
            url=md_build.url(md, namespace),
            model=md_build.served_name(md),
            auth_token_secret=md.spec.server.auth_token_secret,
        )
    return resolved, missing


def wait_for_models(status: StatusDraft, missing: Sequence[str]) -> None:
    """The Dataset waits for the ModelDeployments its language models name (`missing`: why
    each is not usable yet)."""
    status.set(phase="Pending")
    status.condition(
        "Created",
        "False",
        "WaitingForModelDeployment",
        "; ".join(missing) + " (a language model of the spec)",
    )
