"""Typed status updates shared by every kind: conditions with metav1.Condition semantics on
the API's `Condition` model, the events their transitions tell, and the patch that turns an
old status into a new one."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from llmops import conditions as cond
from llmops.api.common import Condition, ConditionStatus
from llmops.api.workload import MODEL_INIT_STAGE, FailureReport, read_record

# Conditions whose turning True is bad news (a Warning event).
WARNING_TYPES = frozenset({"Failed", "Degraded", "Restarting", "InvalidChild"})
# Conditions whose turning True is no event: a TrainingRun's plan fitting is the expected case
# (its estimate stays in the condition); at 1,000 runs created at once, that event was one
# API write in eight.
QUIET_TYPES = frozenset({"Planned"})


class Event(NamedTuple):
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


class Child(NamedTuple):
    """A child object to make exist as built; `update=False` for immutable specs (Jobs,
    bound claims): an existing one is left as it is."""

    manifest: dict[str, Any]
    update: bool = True


def now() -> datetime.datetime:
    """The current time at the API server's resolution (whole seconds, UTC)."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def timestamp(value: datetime.datetime) -> str:
    """RFC 3339 in UTC, as the API server writes times."""
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def transition_event(
    type_: str, status: str, reason: str, message: str, before: tuple[str, str] | None
) -> Event | None:
    """The event a condition update tells: one turning True, or changing reason while True.
    `before` is the condition's earlier (status, reason), None when it is new."""
    if status != "True" or before == (status, reason) or type_ in QUIET_TYPES:
        return None
    kind: Literal["Normal", "Warning"] = "Warning" if type_ in WARNING_TYPES else "Normal"
    return Event(kind, reason, message or type_)


@dataclass
class Conditions:
    """Sets conditions on a status model's `conditions` list and collects the events of
    transitions: a condition turning True (or changing reason while True) is an event."""

    conditions: list[Condition]
    generation: int | None
    now: datetime.datetime
    events: list[Event]

    def set(self, type_: str, status: ConditionStatus, reason: str, message: str = "") -> None:
        index = next((i for i, c in enumerate(self.conditions) if c.type == type_), None)
        before = self.conditions[index] if index is not None else None
        kept = before is not None and before.status == status
        condition = Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message,
            observed_generation=self.generation,
            last_transition_time=before.last_transition_time if before and kept else self.now,
        )
        if index is None:
            self.conditions.append(condition)
        else:
            self.conditions[index] = condition
        event = transition_event(
            type_, status, reason, message, (before.status, before.reason) if before else None
        )
        if event is not None and event not in self.events:  # Complete and Ready: one event
            self.events.append(event)

    def get(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def is_true(self, type_: str) -> bool:
        found = self.get(type_)
        return found is not None and found.status == "True"


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch from `old` to `new` (top-level keys): changed values, and None for keys
    that went away (a merge patch deletes a key set to null)."""
    patch = {key: value for key, value in new.items() if old.get(key) != value}
    patch.update({key: None for key in old if key not in new})
    return patch


def conditions_of(obj: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    return list(((obj or {}).get("status") or {}).get("conditions") or [])


def is_complete(obj: Mapping[str, Any] | None, type_: str = "Complete") -> bool:
    return obj is not None and any(
        c.get("type") == type_ and c.get("status") == "True" for c in conditions_of(obj)
    )


def job_failure(job: Mapping[str, Any] | None) -> str | None:
    """`reason: message` of a Job's Failed condition, or None while it has not failed."""
    for condition in conditions_of(job):
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return f"{condition.get('reason', 'Failed')}: {condition.get('message', '')}".strip()
    return None


def finish(
    status: Any,  # a status model with phase, completion_time and conditions
    conditions: Conditions,
    phase: str,
    reason: str,
    message: str,
    now: datetime.datetime,
) -> None:
    status.phase = phase
    status.completion_time = now
    for type_, value, why, text in finishing_conditions(phase, reason, message):
        conditions.set(type_, value, why, text)


def finishing_conditions(
    phase: str, reason: str, message: str
) -> list[tuple[str, ConditionStatus, str, str]]:
    """How a job-like resource ends: Succeeded sets Complete, Failed sets Failed; Ready
    follows and Running goes False."""
    succeeded = phase == "Succeeded"
    return [
        ("Running", "False", reason, ""),
        ("Complete" if succeeded else "Failed", "True", reason, message),
        ("Ready", "True" if succeeded else "False", reason, message),
    ]


def termination_message(pod: Mapping[str, Any] | None) -> str | None:
    """What a succeeded pod's container left as its termination message."""
    status = (pod or {}).get("status") or {}
    if status.get("phase") != "Succeeded":
        return None
    for container in status.get("containerStatuses") or []:
        message = ((container.get("state") or {}).get("terminated") or {}).get("message")
        if message:
            return str(message)
    return None


# Container waiting reasons that will not resolve by waiting a little longer.
STUCK_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
    }
)


def why_not_running(
    pods: Sequence[Mapping[str, Any]], job_warnings: Sequence[str] = ()
) -> str | None:
    """What keeps a Job's pods from running, in the API's own words: the Job could not create
    them (FailedCreate events), the scheduler cannot place them, or a container is stuck."""
    found: list[str] = [f"Job: {warning}" for warning in job_warnings]
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "pod")
        status = pod.get("status") or {}
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                found.append(f"{name}: {condition.get('reason')}: {condition.get('message', '')}")
        for container in [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_REASONS:
                found.append(f"{name}: {waiting['reason']}: {waiting.get('message', '')}")
    if not found:
        return None
    unique = list(dict.fromkeys(text.strip().rstrip(":") for text in found))
    return "; ".join(unique[:3]) + (f" (and {len(unique) - 3} more)" if len(unique) > 3 else "")


def model_init_failure(pods: Sequence[Mapping[str, Any]]) -> FailureReport | None:
    """The model initializer's report, when an init container failed on a bad model source
    (Kubernetes keeps its termination message in initContainerStatuses)."""
    return failure_report(pods, MODEL_INIT_STAGE)


def failure_report(pods: Sequence[Mapping[str, Any]], stage: str) -> FailureReport | None:
    """The first FailureReport of `stage` a failed container of these pods left."""
    for pod in pods:
        status = pod.get("status") or {}
        for container in [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]:
            terminated = (container.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode", 0) == 0:
                continue
            report = read_record(FailureReport, terminated.get("message"))
            if report is not None and report.stage == stage:
                return report
    return None


@dataclass
class StatusDraft:
    """Status changes of one reconcile as camelCase fields (the kinds not yet decided on
    typed status models), with the condition transitions that become events."""

    body: Mapping[str, Any]
    kind: str
    status: dict[str, Any] = field(init=False)
    events: list[Event] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.status = dict(self.body.get("status") or {})

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")

    def set(self, **fields: Any) -> None:
        self.status.update(fields)

    def condition(
        self, type_: str, status: cond.ConditionStatus, reason: str, message: str = ""
    ) -> None:
        before = cond.get_condition(self.status.get("conditions"), type_)
        self.status["conditions"] = cond.set_condition(
            self.status.get("conditions"),
            type_,
            status,
            reason,
            message,
            generation=self.body["metadata"].get("generation"),
        )
        earlier = (str(before.get("status")), str(before.get("reason"))) if before else None
        event = transition_event(type_, status, reason, message, earlier)
        if event is not None and event not in self.events:  # Complete and Ready: one event
            self.events.append(event)

    def finish(self, phase: str, reason: str, message: str, when: datetime.datetime) -> None:
        self.set(phase=phase, completionTime=timestamp(when))
        for type_, value, why, text in finishing_conditions(phase, reason, message):
            self.condition(type_, value, why, text)
