"""Dataset outcomes shared by the controller and the local runtime: a processed version's
status from the merge step's report, and a failed version."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llmops.api.dataset import Dataset
from llmops.api.workload import DataMergeReport, read_record
from llmops.builders import dataset as build
from llmops.conditions import now_rfc3339
from llmops.decide.status import StatusDraft, model_init_failure, termination_message


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
    tokenizer.fromModel source made it fail (ModelNotFound, ChecksumMismatch, ...)."""
    problem = model_init_failure(pods)
    if problem is not None:
        return problem.reason, f"tokenizer.fromModel: {problem.message}"
    return reason, message
