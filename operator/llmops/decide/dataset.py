"""Dataset outcomes shared by the controller and the local runtime: a processed version's
status from the merge step's report, and a failed version."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from llmops.api.dataset import Dataset
from llmops.api.modeldeployment import ModelDeployment
from llmops.api.workload import LLM_ENDPOINT_FAILED, DataMergeReport, read_record
from llmops.builders import dataset as build
from llmops.builders import modeldeployment as md_build
from llmops.conditions import now_rfc3339
from llmops.decide.status import (
    StatusDraft,
    failure_report,
    model_init_failure,
    termination_message,
)

SLICE_STAGE = "slice"  # data_command's stage of the slice pods (their FailureReport's stage)


def merge_report(pods: Sequence[Mapping[str, Any]]) -> DataMergeReport | None:
    """The statistics a succeeded merge pod left as its termination message."""
    for pod in pods:
        report = read_record(DataMergeReport, termination_message(pod))
        if report is not None:
            return report
    return None


def mark_processed(
    status: StatusDraft, dataset: Dataset, generation: int, report: DataMergeReport | None
) -> None:
    """The status of a version whose merge step succeeded, with the statistics it reported
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
        + ("" if report is not None else " (the merge step reported no statistics)"),
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
