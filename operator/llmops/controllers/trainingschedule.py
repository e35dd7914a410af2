"""TrainingSchedule controller: starts a TrainingRun when the cron time comes or the Dataset
gets a new version, one at a time, each continuing from the previous run's checkpoint, and
keeps the history of finished runs within its limit.

observe (the schedule's runs, the runs ModelDeployments serve, the Dataset) ->
`llmops.decide.trainingschedule.decide` -> act (delete expired runs, start the next one) and
write the status. Level-triggered and restart-safe: the state (newest cron time served,
fingerprints trained on) is read back from the runs' annotations at every reconcile, and run
names are `<schedule>-<index>`, so a restarted operator neither repeats nor skips a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from llmops.api import API_VERSION
from llmops.api.trainingschedule import TrainingSchedule
from llmops.builders import trainingschedule as build
from llmops.builders.common import OWNER_LABEL
from llmops.controllers import common
from llmops.decide import trainingschedule as decide

KIND = decide.KIND


def observe(schedule: TrainingSchedule, body: Mapping[str, Any]) -> decide.Observed:
    kube, namespace = common.kube(), body["metadata"]["namespace"]
    selector = f"{OWNER_LABEL[KIND]}={schedule.metadata.name}"
    runs = kube.list(API_VERSION, "TrainingRun", namespace, label_selector=selector)
    served = frozenset(
        str(run_name)
        for md in kube.list(API_VERSION, "ModelDeployment", namespace)
        if (run_name := (md.get("status") or {}).get("servedRun"))
    )
    dataset_name = schedule.spec.template.dataset_ref.name
    dataset = common.read_resource(API_VERSION, "Dataset", dataset_name, namespace)
    return decide.Observed(body, [build.Run.of(r) for r in runs], served, dataset)


def act(schedule: TrainingSchedule, decision: decide.Decision) -> None:
    kube, namespace = common.kube(), schedule.metadata.namespace
    for name in decision.delete:
        kube.delete(API_VERSION, "TrainingRun", name, namespace)
    for child in decision.children:
        common.ensure_child(KIND, child.manifest, update=child.update)


def reconcile(body: Mapping[str, Any], patch: kopf.Patch) -> None:
    schedule = common.parse(TrainingSchedule, body, with_status=True)
    decision = decide.decide(schedule, schedule.status, observe(schedule, body), common.now())
    act(schedule, decision)  # a failed write is retried with a fresh observation, status unwritten
    common.write_status(body, KIND, decision.status, decision.events, patch)


# Its cron is a deadline of its own: looked at every interval, idle or not.
common.register(KIND, "trainingschedules", reconcile, idle_backoff=False)
