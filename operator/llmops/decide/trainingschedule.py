"""TrainingSchedule: from the spec, the observed runs, the ModelDeployments that serve them and
the Dataset, decide the runs to delete (history beyond the limit), the run to start and the
new status.

The state (newest cron time served, fingerprints trained on) is read back from the runs'
annotations, and run names are `<schedule>-<index>`, so a decision made again after a
restart neither repeats nor skips a run. Runs go one at a time: a trigger that comes while
a run is going waits for it (Forbid concurrency), and each run continues from the newest
succeeded one's checkpoint (unless continueFrom is none).
"""

from __future__ import annotations

import datetime
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmops.api.trainingschedule import TrainingSchedule, TrainingScheduleStatus
from llmops.builders import trainingschedule as build
from llmops.decide.status import Child, Conditions, Event, is_complete, parse_time

KIND = "TrainingSchedule"


@dataclass(frozen=True)
class Observed:
    """What observe found: the schedule as read, its runs, what is served, its Dataset."""

    body: Mapping[str, Any]  # its metadata goes into the runs (owner reference, labels)
    runs: Sequence[build.Run] = ()
    served: Collection[str] = frozenset()  # TrainingRuns a ModelDeployment serves
    dataset: Mapping[str, Any] | None = None


@dataclass
class Decision:
    status: TrainingScheduleStatus
    events: list[Event] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)  # the run to start, never updated
    delete: list[str] = field(default_factory=list)  # expired runs (TrainingRun names)


def _utc(value: datetime.datetime | None) -> datetime.datetime | None:
    """A time as the status shows it: UTC, whole seconds."""
    return value.astimezone(datetime.UTC).replace(microsecond=0) if value else None


def fingerprint(dataset: Mapping[str, Any] | None) -> str | None:
    """The version of a processed Dataset; None while it is missing or not Complete."""
    if dataset is None or not is_complete(dataset):
        return None
    found = (dataset.get("status") or {}).get("fingerprint")
    return None if found is None else str(found)


def decide(
    schedule: TrainingSchedule,
    status: TrainingScheduleStatus,
    observed: Observed,
    now: datetime.datetime,
) -> Decision:
    new = status.model_copy(deep=True)
    decision = Decision(new)
    conditions = Conditions(new.conditions, schedule.metadata.generation, now, decision.events)
    problem = build.validate_schedule(schedule)
    if problem:
        new.phase = "Failed"
        conditions.set("Ready", "False", "InvalidSchedule", problem)
        return decision
    runs = _prune(schedule, observed, decision)
    version = fingerprint(observed.dataset)
    created = parse_time(observed.body["metadata"]["creationTimestamp"])
    assert created is not None
    reason, upcoming = build.due(schedule, runs, created, version, now)
    _history(new, runs, upcoming)
    conditions.set("Ready", "True", "ScheduleValid")
    if schedule.spec.suspend:
        new.phase = "Suspended"
        conditions.set("Suspended", "True", "Suspended", "no new runs while suspended")
        return decision
    conditions.set("Suspended", "False", "Resumed")
    if reason is None or new.active is not None:
        # Forbid concurrency: a trigger that comes while a run is going waits for it.
        new.phase = "Running" if new.active else "Waiting"
        return decision
    if version is None:
        new.phase = "Waiting"
        dataset = schedule.spec.template.dataset_ref.name
        conditions.set("Running", "False", "WaitingForDataset", f"Dataset {dataset!r} is not ready")
        return decision
    _start(schedule, observed.body, runs, reason, version, decision, conditions)
    return decision


def _prune(schedule: TrainingSchedule, observed: Observed, decision: Decision) -> list[build.Run]:
    """The runs by index, less the finished ones beyond the history limit (to delete); the
    newest succeeded run and the runs a ModelDeployment serves are kept whatever the limit."""
    runs = sorted(observed.runs, key=lambda r: r.index)
    expired = build.expired(runs, schedule.spec.history_limit, observed.served)
    decision.delete = [r.name for r in expired]
    return [r for r in runs if r not in expired]


def _history(
    status: TrainingScheduleStatus, runs: Sequence[build.Run], upcoming: datetime.datetime | None
) -> None:
    """What the runs that exist say: the one going, the newest, the newest succeeded."""
    active = next((r for r in runs if not r.finished), None)
    succeeded = [r for r in runs if r.phase == "Succeeded"]
    newest = runs[-1] if runs else None
    scheduled = [r.scheduled_time for r in runs if r.scheduled_time]
    status.active = active.name if active else None
    status.last_run = newest.name if newest else None
    status.last_succeeded_run = succeeded[-1].name if succeeded else None
    status.last_trigger = newest.trigger if newest else None
    status.last_schedule_time = _utc(max(scheduled, default=None))
    status.next_schedule_time = _utc(upcoming)
    status.last_dataset_fingerprint = newest.fingerprint if newest else None
    status.runs = len(runs)


def _start(
    schedule: TrainingSchedule,
    body: Mapping[str, Any],
    runs: Sequence[build.Run],
    reason: build.Due,
    version: str,
    decision: Decision,
    conditions: Conditions,
) -> None:
    """Run N+1, continuing from the newest succeeded run."""
    index = (runs[-1].index if runs else 0) + 1
    succeeded = [r for r in runs if r.phase == "Succeeded"]
    previous = succeeded[-1] if succeeded else None
    manifest = build.training_run(body, schedule, index, reason, version, previous)
    decision.children.append(Child(manifest, update=False))
    started = manifest["metadata"]["name"]
    status = decision.status
    status.phase = "Running"
    status.active = status.last_run = started
    status.last_trigger = reason.trigger
    status.last_dataset_fingerprint = version
    status.runs = len(runs) + 1
    if reason.scheduled_time is not None:
        status.last_schedule_time = _utc(reason.scheduled_time)
    origin = f" from {previous.name}/{schedule.spec.continue_from}" if previous else ""
    message = f"{started} ({reason.trigger}){origin}"
    conditions.set("Running", "True", "RunStarted", message)
    # Told also when the condition was already True from the run before (once).
    event = Event("Normal", "RunStarted", message)
    if event not in decision.events:
        decision.events.append(event)
