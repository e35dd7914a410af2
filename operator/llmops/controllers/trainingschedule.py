"""TrainingSchedule controller: starts a TrainingRun when the cron time comes or the Dataset
gets a new version, one at a time, each continuing from the previous run's checkpoint, and
keeps the history of finished runs within its limit.

Level-triggered and restart-safe: the state (newest cron time served, fingerprints trained
on) is read back from the runs' annotations at every reconcile, and run names are
`<schedule>-<index>`, so a restarted operator neither repeats nor skips a run.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any, cast

import kopf

from llmops.api import API_VERSION
from llmops.api.trainingschedule import TrainingSchedule
from llmops.builders import trainingschedule as build
from llmops.builders.common import OWNER_LABEL
from llmops.controllers import common

KIND = "TrainingSchedule"


def _timestamp(value: datetime.datetime | None) -> str | None:
    return common.timestamp(value) if value else None


def reconcile(body: Mapping[str, Any], patch: kopf.Patch) -> None:
    schedule = common.parse(TrainingSchedule, body)
    status = common.StatusWriter(body, KIND)
    try:
        _reconcile(body, schedule, status, common.now())
    finally:
        status.write(patch)


def _reconcile(
    body: Mapping[str, Any],
    schedule: TrainingSchedule,
    status: common.StatusWriter,
    now: datetime.datetime,
) -> None:
    namespace: str = body["metadata"]["namespace"]
    name = schedule.metadata.name
    problem = build.validate_schedule(schedule)
    if problem:
        status.set(phase="Failed")
        status.condition("Ready", "False", "InvalidSchedule", problem)
        return
    kube = common.kube()
    selector = f"{OWNER_LABEL[KIND]}={name}"
    runs = sorted(
        (
            build.Run.of(r)
            for r in kube.list(API_VERSION, "TrainingRun", namespace, label_selector=selector)
        ),
        key=lambda r: r.index,
    )
    served: set[str] = {
        str(run_name)
        for md in kube.list(API_VERSION, "ModelDeployment", namespace)
        if (run_name := (md.get("status") or {}).get("servedRun"))
    }
    for old in build.expired(runs, schedule.spec.history_limit, served):
        kube.delete(API_VERSION, "TrainingRun", old.name, namespace)
        runs.remove(old)

    dataset_name = schedule.spec.template.dataset_ref.name
    dataset = kube.get(API_VERSION, "Dataset", dataset_name, namespace)
    fingerprint = None
    if common.is_complete(dataset):
        assert dataset is not None
        fingerprint = (dataset.get("status") or {}).get("fingerprint")
    created = common.parse_time(body["metadata"]["creationTimestamp"])
    assert created is not None
    reason, upcoming = build.due(schedule, runs, created, fingerprint, now)
    active = next((r for r in runs if not r.finished), None)
    succeeded = [r for r in runs if r.phase == "Succeeded"]
    newest = runs[-1] if runs else None
    scheduled = [r.scheduled_time for r in runs if r.scheduled_time]
    status.set(
        active=active.name if active else None,
        lastRun=newest.name if newest else None,
        lastSucceededRun=succeeded[-1].name if succeeded else None,
        lastTrigger=newest.trigger if newest else None,
        lastScheduleTime=_timestamp(max(scheduled, default=None)),
        nextScheduleTime=_timestamp(upcoming),
        lastDatasetFingerprint=newest.fingerprint if newest else None,
        runs=len(runs),
    )
    status.condition("Ready", "True", "ScheduleValid")

    if schedule.spec.suspend:
        status.set(phase="Suspended")
        status.condition("Suspended", "True", "Suspended", "no new runs while suspended")
        return
    status.condition("Suspended", "False", "Resumed")
    if reason is None or active is not None:
        # Forbid concurrency: a trigger that comes while a run is going waits for it.
        status.set(phase="Running" if active else "Waiting")
        return
    if fingerprint is None:
        status.set(phase="Waiting")
        status.condition(
            "Running", "False", "WaitingForDataset", f"Dataset {dataset_name!r} is not ready"
        )
        return
    index = (newest.index if newest else 0) + 1
    previous = succeeded[-1] if succeeded else None
    manifest = build.training_run(body, schedule, index, reason, fingerprint, previous)
    common.ensure_child(KIND, manifest, update=False)
    started = manifest["metadata"]["name"]
    status.set(
        phase="Running",
        active=started,
        lastRun=started,
        lastTrigger=reason.trigger,
        lastDatasetFingerprint=fingerprint,
        runs=len(runs) + 1,
    )
    if reason.scheduled_time is not None:
        status.set(lastScheduleTime=_timestamp(reason.scheduled_time))
    origin = f" from {previous.name}/{schedule.spec.continue_from}" if previous else ""
    message = f"{started} ({reason.trigger}){origin}"
    status.condition("Running", "True", "RunStarted", message)
    kopf.event(cast(kopf.Body, body), type="Normal", reason="RunStarted", message=message)


common.register(KIND, "trainingschedules", reconcile)
