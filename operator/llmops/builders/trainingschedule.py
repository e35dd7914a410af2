"""Pure decisions of a TrainingSchedule: which trigger is due and the next run's manifest.

Everything a decision needs is read from the runs themselves (each carries its index, the cron
time it was started for and the Dataset fingerprint it trains on, in annotations), so a
restarted operator derives the same state and never starts a run twice.
"""

from __future__ import annotations

import datetime
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter

from llmops import GROUP
from llmops.api import API_VERSION
from llmops.api.trainingschedule import TrainingSchedule
from llmops.builders.common import child_labels, owner_reference

INDEX = f"{GROUP}/run-index"
SCHEDULED_TIME = f"{GROUP}/scheduled-time"
FINGERPRINT = f"{GROUP}/dataset-fingerprint"
TRIGGER = f"{GROUP}/trigger"
FINISHED = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Run:
    """What a schedule needs to know of one of its TrainingRuns."""

    name: str
    index: int
    phase: str | None
    scheduled_time: datetime.datetime | None
    fingerprint: str | None
    trigger: str | None = None

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Run:
        annotations = body["metadata"].get("annotations") or {}
        scheduled = annotations.get(SCHEDULED_TIME)
        return cls(
            name=body["metadata"]["name"],
            index=int(annotations.get(INDEX, "0")),
            phase=(body.get("status") or {}).get("phase"),
            scheduled_time=datetime.datetime.fromisoformat(scheduled) if scheduled else None,
            fingerprint=annotations.get(FINGERPRINT) or None,
            trigger=annotations.get(TRIGGER),
        )


@dataclass(frozen=True)
class Due:
    """A run to start: why, and for which cron time (None for a dataset change)."""

    trigger: str
    scheduled_time: datetime.datetime | None


def validate_schedule(schedule: TrainingSchedule) -> str | None:
    """What is wrong with the cron expression or time zone (the CRD checks only the shape)."""
    spec = schedule.spec
    try:
        ZoneInfo(spec.time_zone)
    except (KeyError, ValueError):
        return f"spec.timeZone: unknown time zone {spec.time_zone!r}"
    if spec.schedule is not None and not croniter.is_valid(spec.schedule):
        return f"spec.schedule: {spec.schedule!r} is not a valid cron expression"
    return None


def cron_times(
    schedule: TrainingSchedule, after: datetime.datetime, now: datetime.datetime
) -> tuple[datetime.datetime | None, datetime.datetime | None]:
    """(the latest cron time in (after, now], or None; the first cron time after now)."""
    if schedule.spec.schedule is None:
        return None, None
    zone = ZoneInfo(schedule.spec.time_zone)
    times = croniter(schedule.spec.schedule, after.astimezone(zone))
    latest = None
    upcoming: datetime.datetime = times.get_next(datetime.datetime)
    while upcoming <= now:
        latest = upcoming
        upcoming = times.get_next(datetime.datetime)
    utc = datetime.UTC
    return (latest.astimezone(utc) if latest else None), upcoming.astimezone(utc)


def due(
    schedule: TrainingSchedule,
    runs: Sequence[Run],
    created: datetime.datetime,
    fingerprint: str | None,
    now: datetime.datetime,
) -> tuple[Due | None, datetime.datetime | None]:
    """(the run to start now, if any; the next cron time). Cron times count from the newest
    scheduled run (or the schedule's creation); a dataset change is a fingerprint no run has
    trained on."""
    scheduled = [r.scheduled_time for r in runs if r.scheduled_time is not None]
    latest, upcoming = cron_times(schedule, max(scheduled, default=created), now)
    if latest is not None:
        return Due("schedule", latest), upcoming
    newest = max(runs, key=lambda r: r.index, default=None)
    if (
        schedule.spec.on_dataset_change
        and fingerprint
        and (newest is None or newest.fingerprint != fingerprint)
    ):
        return Due("dataset-change", None), upcoming
    return None, upcoming


def run_name(schedule_name: str, index: int) -> str:
    return f"{schedule_name}-{index}"


def training_run(
    body: Mapping[str, Any],
    schedule: TrainingSchedule,
    index: int,
    reason: Due,
    fingerprint: str | None,
    previous: Run | None,
) -> dict[str, Any]:
    """The TrainingRun of run `index`: the template, starting from the previous succeeded
    run's checkpoint unless continueFrom is none."""
    spec = schedule.spec.template.to_dict()
    if previous is not None and schedule.spec.continue_from != "none":
        spec["init"] = {
            "trainingRun": {"name": previous.name, "checkpoint": schedule.spec.continue_from}
        }
    annotations = {INDEX: str(index), TRIGGER: reason.trigger, FINGERPRINT: fingerprint or ""}
    if reason.scheduled_time is not None:
        annotations[SCHEDULED_TIME] = reason.scheduled_time.isoformat()
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainingRun",
        "metadata": {
            "name": run_name(schedule.metadata.name, index),
            "namespace": body["metadata"]["namespace"],
            "labels": child_labels(body, "training"),
            "annotations": annotations,
            "ownerReferences": [owner_reference(body)],
        },
        "spec": spec,
    }


def expired(runs: Sequence[Run], history_limit: int, served: Collection[str] = ()) -> list[Run]:
    """Finished runs beyond the history limit, oldest first. Kept whatever the limit: the
    newest succeeded run (the next run starts from it) and runs a ModelDeployment serves
    (deleting one would delete the checkpoints being served)."""
    finished = sorted((r for r in runs if r.finished), key=lambda r: r.index, reverse=True)
    succeeded = [r for r in finished if r.phase == "Succeeded"]
    keep = {r.name for r in finished[:history_limit]} | {r.name for r in succeeded[:1]}
    keep |= set(served)
    return sorted((r for r in finished if r.name not in keep), key=lambda r: r.index)
