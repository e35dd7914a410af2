"""The TrainingSchedule rules as pure decisions: a new Dataset version or a cron time starts
run N+1 continuing from the newest succeeded run, one run at a time (Forbid concurrency),
nothing while suspended, and the history beyond its limit goes except what is served."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from llmops.api.trainingschedule import TrainingSchedule, TrainingScheduleStatus
from llmops.builders import trainingschedule as build
from llmops.decide import trainingschedule as decide

pytestmark = pytest.mark.unit

CREATED = datetime.datetime(2026, 11, 1, 0, 0, tzinfo=datetime.UTC)
NOW = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.UTC)
TOMORROW_3AM = datetime.datetime(2026, 11, 2, 3, 0, tzinfo=datetime.UTC)


def schedule_body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "TrainingSchedule",
        "metadata": {
            "name": "nightly",
            "namespace": "ml",
            "uid": "schedule-uid",
            "generation": 2,
            "creationTimestamp": "2026-11-01T00:00:00Z",
        },
        "spec": {
            "onDatasetChange": True,
            "historyLimit": 3,
            "template": {
                "datasetRef": {"name": "corpus"},
                "model": {"numLayers": 2, "numHeads": 2, "hiddenSize": 64},
                "hyperparameters": {"maxSteps": 100},
            },
            **spec,
        },
    }


def dataset(fingerprint: str | None, complete: bool = True) -> dict[str, Any]:
    status = "True" if complete else "False"
    return {
        "kind": "Dataset",
        "metadata": {"name": "corpus"},
        "status": {
            "fingerprint": fingerprint,
            "conditions": [{"type": "Complete", "status": status}],
        },
    }


def run(
    index: int,
    phase: str | None,
    fingerprint: str,
    trigger: str = "dataset-change",
    scheduled: datetime.datetime | None = None,
) -> build.Run:
    return build.Run(f"nightly-{index}", index, phase, scheduled, fingerprint, trigger)


def decided(
    body: dict[str, Any],
    *runs: build.Run,
    found: dict[str, Any] | None = None,
    served: frozenset[str] = frozenset(),
    status: TrainingScheduleStatus | None = None,
) -> decide.Decision:
    schedule = TrainingSchedule.model_validate(body)
    observed = decide.Observed(body=body, runs=list(runs), served=served, dataset=found)
    return decide.decide(schedule, status or TrainingScheduleStatus(), observed, NOW)


def condition(decision: decide.Decision, type_: str) -> tuple[str, str, str]:
    found = next(c for c in decision.status.conditions if c.type == type_)
    return found.status, found.reason, found.message


def test_a_new_dataset_version_starts_the_next_run_from_the_newest_succeeded_one() -> None:
    decision = decided(
        schedule_body(),
        run(2, "Failed", "fp-2"),  # listed in any order
        run(1, "Succeeded", "fp-1"),
        found=dataset("fp-3"),
    )
    (child,) = decision.children
    assert child.update is False  # a run, once started, is left as it is
    manifest = child.manifest
    assert manifest["metadata"]["name"] == "nightly-3"
    assert manifest["spec"]["init"] == {
        "trainingRun": {"name": "nightly-1", "checkpoint": "latest"}
    }
    assert manifest["metadata"]["annotations"] == {
        build.INDEX: "3",
        build.TRIGGER: "dataset-change",
        build.FINGERPRINT: "fp-3",
    }
    (owner,) = manifest["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("TrainingSchedule", "schedule-uid")
    status = decision.status
    assert status.phase == "Running"
    assert (status.active, status.last_run, status.last_succeeded_run) == (
        "nightly-3",
        "nightly-3",
        "nightly-1",
    )
    assert status.last_trigger == "dataset-change" and status.last_dataset_fingerprint == "fp-3"
    assert status.runs == 3 and status.last_schedule_time is None
    message = "nightly-3 (dataset-change) from nightly-1/latest"
    assert condition(decision, "Running") == ("True", "RunStarted", message)
    assert condition(decision, "Ready")[:2] == ("True", "ScheduleValid")
    assert condition(decision, "Suspended")[:2] == ("False", "Resumed")
    assert [(e.reason, e.message) for e in decision.events if e.reason == "RunStarted"] == [
        ("RunStarted", message)  # once, whether or not the Running condition was True
    ]
    assert decision.delete == []


def test_the_same_dataset_version_starts_nothing() -> None:
    decision = decided(schedule_body(), run(1, "Succeeded", "fp-1"), found=dataset("fp-1"))
    assert decision.children == []
    status = decision.status
    assert status.phase == "Waiting" and status.active is None
    assert status.last_run == status.last_succeeded_run == "nightly-1" and status.runs == 1


def test_continue_from_none_starts_from_the_template() -> None:
    decision = decided(
        schedule_body(continueFrom="none"), run(1, "Succeeded", "fp-1"), found=dataset("fp-2")
    )
    (child,) = decision.children
    assert "init" not in child.manifest["spec"]
    # The message still names the newest succeeded run with the policy (as it always did).
    assert condition(decision, "Running")[2] == "nightly-2 (dataset-change) from nightly-1/none"


def test_forbid_concurrency_a_trigger_waits_for_the_running_run() -> None:
    decision = decided(
        schedule_body(),
        run(1, "Succeeded", "fp-1"),
        run(2, "Running", "fp-2"),
        found=dataset("fp-3"),  # a new version while nightly-2 trains
    )
    assert decision.children == []
    status = decision.status
    assert status.phase == "Running" and status.active == "nightly-2"
    assert status.last_dataset_fingerprint == "fp-2"
    assert not any(e.reason == "RunStarted" for e in decision.events)


def test_a_cron_time_starts_a_run_and_the_next_one_is_reported() -> None:
    decision = decided(schedule_body(schedule="0 3 * * *"), found=dataset("fp-1"))
    (child,) = decision.children
    annotations = child.manifest["metadata"]["annotations"]
    scheduled = datetime.datetime(2026, 11, 1, 3, 0, tzinfo=datetime.UTC)
    assert annotations[build.TRIGGER] == "schedule"
    assert annotations[build.SCHEDULED_TIME] == scheduled.isoformat()
    assert child.manifest["metadata"]["name"] == "nightly-1"
    assert "init" not in child.manifest["spec"]  # nothing to continue from yet
    status = decision.status
    assert status.last_schedule_time == scheduled and status.next_schedule_time == TOMORROW_3AM
    assert status.to_dict()["nextScheduleTime"] == "2026-11-02T03:00:00Z"
    assert condition(decision, "Running")[2] == "nightly-1 (schedule)"


def test_a_due_run_waits_for_the_dataset() -> None:
    decision = decided(schedule_body(schedule="0 3 * * *"), found=dataset("fp-1", complete=False))
    assert decision.children == []
    assert decision.status.phase == "Waiting"
    assert condition(decision, "Running") == (
        "False",
        "WaitingForDataset",
        "Dataset 'corpus' is not ready",
    )
    missing = decided(schedule_body(schedule="0 3 * * *"), found=None)
    assert missing.children == [] and condition(missing, "Running")[1] == "WaitingForDataset"


def test_a_suspended_schedule_starts_no_run() -> None:
    decision = decided(
        schedule_body(suspend=True), run(1, "Succeeded", "fp-1"), found=dataset("fp-2")
    )
    assert decision.children == []
    assert decision.status.phase == "Suspended"
    assert condition(decision, "Suspended") == ("True", "Suspended", "no new runs while suspended")
    assert decision.status.last_succeeded_run == "nightly-1"  # the history is still reported
    assert [e.reason for e in decision.events] == ["ScheduleValid", "Suspended"]


def test_history_beyond_the_limit_goes_but_served_runs_stay() -> None:
    decision = decided(
        schedule_body(historyLimit=1),
        run(1, "Succeeded", "fp-1"),
        run(2, "Succeeded", "fp-2"),  # served by a ModelDeployment
        run(3, "Failed", "fp-3"),
        run(4, "Succeeded", "fp-4"),
        run(5, "Failed", "fp-5"),
        run(6, "Running", "fp-6"),
        found=dataset("fp-6"),
        served=frozenset({"nightly-2"}),
    )
    # Kept: nightly-5 (the limit), nightly-4 (the newest succeeded: the next run starts from
    # it), nightly-2 (served) and nightly-6 (running).
    assert decision.delete == ["nightly-1", "nightly-3"]
    assert decision.children == []
    status = decision.status
    assert status.runs == 4 and status.active == "nightly-6"
    assert status.last_succeeded_run == "nightly-4"


def test_the_history_counts_only_the_runs_kept() -> None:
    decision = decided(
        schedule_body(historyLimit=1),
        run(1, "Succeeded", "fp-1"),
        run(2, "Succeeded", "fp-2"),
        found=dataset("fp-3"),
    )
    assert decision.delete == ["nightly-1"]
    (child,) = decision.children
    assert child.manifest["metadata"]["name"] == "nightly-3"
    assert child.manifest["spec"]["init"]["trainingRun"]["name"] == "nightly-2"
    assert decision.status.runs == 2  # nightly-2 and the new one


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"schedule": "61 * * * *"}, "spec.schedule"),
        ({"timeZone": "Mars/Olympus"}, "spec.timeZone"),
    ],
)
def test_an_invalid_schedule_fails_and_starts_nothing(spec: dict[str, Any], says: str) -> None:
    decision = decided(schedule_body(**spec), found=dataset("fp-1"))
    assert decision.children == [] and decision.delete == []
    assert decision.status.phase == "Failed"
    status, reason, message = condition(decision, "Ready")
    assert (status, reason) == ("False", "InvalidSchedule") and message.startswith(says)
    assert all(c.observed_generation == 2 for c in decision.status.conditions)
