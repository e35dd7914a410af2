"""Pure decisions of retraining and roll-out: which schedule trigger is due, the next run's
manifest, history trimming, the evaluation gate and TrainingRun budgets."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from pydantic import ValidationError

from llmops.api.modeldeployment import EvaluationGate, ModelSource
from llmops.api.trainingrun import TrainingRun, TrainingRunStatus
from llmops.api.trainingschedule import TrainingSchedule
from llmops.builders import trainingschedule as build
from llmops.builders.modeldeployment import gate_verdict
from llmops.decide.trainingrun import accelerators, budget_exhausted

UTC = datetime.UTC
CREATED = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
TEMPLATE = {"datasetRef": {"name": "corpus"}, "hyperparameters": {"maxSteps": 10}}


def status(**fields: Any) -> TrainingRunStatus:
    return TrainingRunStatus.model_validate(fields)


def schedule(**spec: Any) -> TrainingSchedule:
    return TrainingSchedule.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "TrainingSchedule",
            "metadata": {"name": "nightly", "namespace": "ml", "uid": "u1"},
            "spec": {"template": TEMPLATE, **spec},
        }
    )


def run(index: int, phase: str | None = "Succeeded", **fields: Any) -> build.Run:
    return build.Run(f"nightly-{index}", index, phase, fields.get("at"), fields.get("fp"))


def test_cron_fires_once_for_the_latest_missed_time_and_names_the_next() -> None:
    daily = schedule(schedule="0 3 * * *")
    now = datetime.datetime(2026, 11, 4, 10, 0, tzinfo=UTC)
    reason, upcoming = build.due(daily, [], CREATED, None, now)
    assert reason == build.Due("schedule", datetime.datetime(2026, 11, 4, 3, 0, tzinfo=UTC))
    assert upcoming == datetime.datetime(2026, 11, 5, 3, 0, tzinfo=UTC)
    served = [run(1, "Running", at=datetime.datetime(2026, 11, 4, 3, 0, tzinfo=UTC))]
    assert build.due(daily, served, CREATED, None, now)[0] is None


def test_cron_times_follow_the_time_zone() -> None:
    berlin = schedule(schedule="0 3 * * *", timeZone="Europe/Berlin")
    now = datetime.datetime(2026, 11, 2, 2, 30, tzinfo=UTC)
    reason, _ = build.due(berlin, [], CREATED, None, now)
    assert reason is not None and reason.scheduled_time == datetime.datetime(
        2026, 11, 2, 2, 0, tzinfo=UTC
    )  # 03:00 in Berlin (CET, UTC+1)


def test_a_new_dataset_fingerprint_is_due_once() -> None:
    on_change = schedule(onDatasetChange=True)
    now = CREATED + datetime.timedelta(hours=1)
    assert build.due(on_change, [], CREATED, "fp-1", now)[0] == build.Due("dataset-change", None)
    trained = [run(1, fp="fp-1")]
    assert build.due(on_change, trained, CREATED, "fp-1", now)[0] is None
    assert build.due(on_change, trained, CREATED, "fp-2", now)[0] is not None
    assert build.due(on_change, [], CREATED, None, now)[0] is None  # no version yet


def test_the_next_run_continues_from_the_previous_one() -> None:
    body = {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "TrainingSchedule",
        "metadata": {"name": "nightly", "namespace": "ml", "uid": "u1"},
    }
    when = datetime.datetime(2026, 11, 4, 3, 0, tzinfo=UTC)
    manifest = build.training_run(
        body,
        schedule(schedule="@daily", continueFrom="best"),
        4,
        build.Due("schedule", when),
        "fp-9",
        run(3),
    )
    assert manifest["metadata"]["name"] == "nightly-4"
    assert manifest["spec"]["init"] == {"trainingRun": {"name": "nightly-3", "checkpoint": "best"}}
    assert manifest["metadata"]["labels"]["llmops.dev/training-schedule"] == "nightly"
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "u1"
    parsed = build.Run.of(manifest)  # what the next reconcile reads back
    assert (parsed.index, parsed.scheduled_time, parsed.fingerprint) == (4, when, "fp-9")
    TrainingRun.model_validate(manifest)  # a valid TrainingRun
    fresh = build.training_run(
        body,
        schedule(schedule="@daily", continueFrom="none"),
        5,
        build.Due("dataset-change", None),
        "fp-9",
        run(4),
    )
    assert "init" not in fresh["spec"]


def test_history_keeps_the_limit_the_newest_success_and_served_runs() -> None:
    runs = [run(1), run(2, "Failed"), run(3, "Failed"), run(4, "Running")]
    assert [r.name for r in build.expired(runs, 1)] == ["nightly-2"]  # 1: newest success
    assert [r.name for r in build.expired(runs, 1, served={"nightly-2"})] == []
    assert build.expired(runs, 3) == []


def test_schedule_validation() -> None:
    assert build.validate_schedule(schedule(schedule="61 * * * *")) is not None
    assert "timeZone" in str(
        build.validate_schedule(schedule(schedule="@daily", timeZone="Mars/Base"))
    )
    assert build.validate_schedule(schedule(schedule="*/15 * * * 1-5")) is None
    with pytest.raises(ValidationError, match="set schedule, onDatasetChange or both"):
        schedule()
    with pytest.raises(ValidationError, match="at most 38 characters"):
        TrainingSchedule.model_validate(
            {
                "apiVersion": "llmops.dev/v1alpha1",
                "kind": "TrainingSchedule",
                "metadata": {"name": "n" * 40},
                "spec": {"template": TEMPLATE, "schedule": "@daily"},
            }
        )


def test_gate_verdicts() -> None:
    loss = EvaluationGate(metric="loss", max_regression=0.05)
    assert gate_verdict(loss, {"loss": 2.09}, {"loss": 2.0}) is None  # within 5%
    assert "worse than the served model's 2" in str(
        gate_verdict(loss, {"loss": 2.2}, {"loss": 2.0})
    )
    assert "no final evaluation" in str(gate_verdict(loss, None, {"loss": 2.0}))
    assert gate_verdict(loss, {"loss": 9.0}, None) is None  # nothing to compare with
    accuracy = EvaluationGate(metric="accuracy")
    assert gate_verdict(accuracy, {"accuracy": 0.5}, {"accuracy": 0.4}) is None
    assert gate_verdict(accuracy, {"accuracy": 0.39}, {"accuracy": 0.4}) is not None
    with pytest.raises(ValidationError, match="a gate compares evaluations"):
        ModelSource.model_validate({"uri": "/models/x", "gate": {}})


def test_budgets() -> None:
    tr = TrainingRun.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "gpt"},
            "spec": {
                **TEMPLATE,
                "resources": {"numNodes": 2, "gpusPerNode": 8, "procsPerNode": 8},
                "budget": {"maxAcceleratorHours": 10, "maxWallTimeSeconds": 3600},
            },
        }
    )
    assert accelerators(tr) == 16
    now = datetime.datetime(2026, 11, 1, 13, 0, tzinfo=UTC)
    assert (
        budget_exhausted(tr, status(acceleratorHours=9.5, startTime="2026-11-01T12:30:00Z"), now)
        is None
    )
    assert "10 accelerator-hours" in str(budget_exhausted(tr, status(acceleratorHours=10.0), now))
    assert "maxWallTimeSeconds=3600" in str(
        budget_exhausted(tr, status(startTime="2026-11-01T11:59:00Z"), now)
    )
