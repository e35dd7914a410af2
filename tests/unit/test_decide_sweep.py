"""The Sweep rules as pure decisions: trials created up to parallelTrials at the next unused
index, the best trial and leaderboard, the ways a sweep ends (trials finished, budget, failed
trials, an invalid trial spec), early stopping and suspend/resume, without a control plane."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from pydantic import ValidationError

from llmops.api.sweep import Sweep, SweepStatus
from llmops.builders import sweep as build
from llmops.decide import sweep as decide

pytestmark = pytest.mark.unit

NOW = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.UTC)
TEMPLATE = {
    "datasetRef": {"name": "corpus"},
    "model": {"numLayers": 2, "numHeads": 2, "hiddenSize": 64},
    "hyperparameters": {"maxSteps": 100},
}
VALUES = ["0.001", "0.002", "0.003", "0.004"]
GRID = {
    "name": "lr",
    "path": "hyperparameters.learningRate",
    "type": "categorical",
    "values": VALUES,
}
SUSPEND = {"spec": {"suspend": True}}
RESUME = {"spec": {"suspend": False}}


def sweep_body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "Sweep",
        "metadata": {"name": "lr", "namespace": "ml", "uid": "sweep-uid", "generation": 3},
        "spec": {"template": TEMPLATE, "parameters": [GRID], "algorithm": "grid", **spec},
    }


def trial(
    index: int,
    phase: str | None = None,
    *,
    loss: float | None = None,
    step: int | None = None,
    suspend: bool = False,
    hours: float = 0.0,
) -> dict[str, Any]:
    """A trial TrainingRun as the API server returns it, with the grid point of its index."""
    lr = float(VALUES[index])
    status: dict[str, Any] = {"acceleratorHours": hours}
    if phase:
        status["phase"] = phase
    if loss is not None:
        status["metrics"] = {"validationLoss": loss}
        status["checkpoints"] = {"best": {"uri": f"s3://checkpoints/lr-trial-{index}/best"}}
    if step is not None:
        status["step"] = step
    spec = build.set_path(TEMPLATE, "hyperparameters.learningRate", lr)
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {
            "name": f"lr-trial-{index}",
            "labels": {build.SWEEP_LABEL: "lr", build.INDEX_LABEL: str(index)},
            "annotations": {build.PARAMETERS_ANNOTATION: json.dumps({"lr": lr})},
        },
        "spec": {**spec, "suspend": suspend},
        "status": status,
    }


def decided(
    body: dict[str, Any],
    *trials: dict[str, Any],
    status: SweepStatus | None = None,
    now: datetime.datetime = NOW,
) -> decide.Decision:
    sweep = Sweep.model_validate(body)
    observed = decide.Observed(body=body, trials=list(trials))
    return decide.decide(sweep, status or SweepStatus(), observed, now)


def condition(decision: decide.Decision, type_: str) -> tuple[str, str, str]:
    found = next(c for c in decision.status.conditions if c.type == type_)
    return found.status, found.reason, found.message


def reasons(decision: decide.Decision) -> list[str]:
    return [event.reason for event in decision.events]


def names(decision: decide.Decision) -> list[str]:
    return [child.manifest["metadata"]["name"] for child in decision.children]


def test_trials_are_created_up_to_parallel_trials_with_the_grid_points() -> None:
    decision = decided(sweep_body(parallelTrials=2, maxTrials=10))
    assert names(decision) == ["lr-trial-0", "lr-trial-1"]
    first, second = (child.manifest for child in decision.children)
    assert all(child.update is False for child in decision.children)  # a trial keeps its params
    assert first["spec"]["hyperparameters"]["learningRate"] == 0.001
    assert second["spec"]["hyperparameters"]["learningRate"] == 0.002
    assert json.loads(first["metadata"]["annotations"][build.PARAMETERS_ANNOTATION]) == {
        "lr": 0.001
    }
    assert first["metadata"]["labels"][build.INDEX_LABEL] == "0"
    (owner,) = first["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("Sweep", "sweep-uid", True)
    assert reasons(decision) == ["TrialCreated", "TrialCreated", "TrialsCreated"]
    assert decision.events[0].message == "lr-trial-0: {'lr': '0.001'}"
    status = decision.status
    assert status.phase == "Pending" and status.start_time == NOW
    assert condition(decision, "Created") == ("True", "TrialsCreated", "2 trial(s)")
    assert condition(decision, "Running") == (
        "False",
        "WaitingForTrials",
        "0 running, 0 pending, 0/4 finished",  # maxTrials capped at the grid size
    )
    assert condition(decision, "Ready")[:2] == ("False", "SweepInProgress")
    assert condition(decision, "Suspended")[:2] == ("False", "Resumed")
    assert decision.patches == []


def test_a_finished_trial_frees_its_slot_for_the_next_unused_index() -> None:
    body = sweep_body(parallelTrials=2)
    started = NOW - datetime.timedelta(minutes=5)
    decision = decided(
        body,
        trial(0, "Succeeded", loss=2.0),
        trial(2, "Running"),  # index 1 is unused (e.g. deleted by hand): it is taken next
        status=SweepStatus(start_time=started),
    )
    assert names(decision) == ["lr-trial-1"]
    params = decision.children[0].manifest["metadata"]["annotations"]
    assert json.loads(params[build.PARAMETERS_ANNOTATION]) == {"lr": 0.002}
    status = decision.status
    assert status.start_time == started  # kept
    assert status.phase == "Running"
    assert status.trials is not None
    assert (status.trials.succeeded, status.trials.running, status.trials.finished) == (1, 1, 1)
    assert [r.name for r in status.trial_records] == ["lr-trial-0", "lr-trial-2"]
    assert condition(decision, "Created")[2] == "3 trial(s)"
    assert condition(decision, "Running") == (
        "True",
        "TrialsRunning",
        "1 running, 0 pending, 1/4 finished",
    )


def test_no_trial_is_created_while_parallel_trials_are_active() -> None:
    decision = decided(sweep_body(parallelTrials=2), trial(0, "Running"), trial(1, "Pending"))
    assert decision.children == [] and decision.patches == []
    assert "TrialCreated" not in reasons(decision)
    assert condition(decision, "Created")[2] == "2 trial(s)"


def test_the_best_trial_and_leaderboard_and_the_sweep_ends_when_every_trial_finished() -> None:
    losses = {0: 2.0, 1: 3.0, 2: 1.5, 3: 2.5}
    trials = [trial(i, "Succeeded", loss=loss) for i, loss in losses.items()]
    decision = decided(sweep_body(parallelTrials=2), *trials)
    status = decision.status
    assert decision.children == []
    assert status.phase == "Succeeded" and status.completion_time == NOW
    assert condition(decision, "Complete") == (
        "True",
        "TrialsFinished",
        "4 trial(s) finished: 4 succeeded, 0 failed, 0 pruned",
    )
    assert condition(decision, "Ready")[:2] == ("True", "TrialsFinished")
    assert condition(decision, "Running")[:2] == ("False", "TrialsFinished")
    best = status.best_trial
    assert best is not None
    assert (best.name, best.index, best.value) == ("lr-trial-2", 2, 1.5)
    assert best.parameters == {"lr": "0.003"}
    assert best.checkpoint_uri == "s3://checkpoints/lr-trial-2/best"
    assert [e.name for e in status.leaderboard] == [
        "lr-trial-2",
        "lr-trial-0",
        "lr-trial-3",
        "lr-trial-1",
    ]
    assert reasons(decision)[0] == "NewBestTrial"
    assert decision.events[0].message == "lr-trial-2: validationLoss=1.5"
    assert "TrialsFinished" in reasons(decision)
    # The wire form is what the status always showed.
    wire = status.to_dict()
    assert wire["bestTrial"]["checkpointUri"] == "s3://checkpoints/lr-trial-2/best"
    assert wire["trials"]["succeeded"] == 4 and wire["trials"]["finished"] == 4
    assert wire["trialRecords"][2] == {
        "name": "lr-trial-2",
        "index": 2,
        "state": "Succeeded",
        "parameters": {"lr": "0.003"},
        "value": 1.5,
        "intermediate": [],
    }


def test_the_same_best_trial_is_announced_once() -> None:
    body = sweep_body(parallelTrials=2)
    first = decided(body, trial(0, "Succeeded", loss=2.0), trial(1, "Running"))
    assert "NewBestTrial" in reasons(first)
    again = decided(body, trial(0, "Succeeded", loss=2.0), trial(1, "Running"), status=first.status)
    assert "NewBestTrial" not in reasons(again)
    better = decided(
        body, trial(0, "Succeeded", loss=2.0), trial(1, "Succeeded", loss=1.0), status=first.status
    )
    assert [e.message for e in better.events if e.reason == "NewBestTrial"] == [
        "lr-trial-1: validationLoss=1"
    ]


def test_max_failed_trials_fails_the_sweep_and_suspends_active_trials() -> None:
    decision = decided(
        sweep_body(parallelTrials=3, maxFailedTrials=1),
        trial(0, "Failed"),
        trial(1, "Running"),
        trial(2, "Pending"),
    )
    assert decision.children == []  # no trial after the sweep failed
    assert decision.patches == [
        decide.TrialPatch("lr-trial-1", SUSPEND),
        decide.TrialPatch("lr-trial-2", SUSPEND),
    ]
    status = decision.status
    assert status.phase == "Failed" and status.completion_time == NOW
    assert condition(decision, "Failed") == (
        "True",
        "MaxFailedTrialsReached",
        "1 trial(s) failed (maxFailedTrials=1)",
    )
    assert condition(decision, "Ready")[:2] == ("False", "MaxFailedTrialsReached")
    assert status.trials is not None
    assert (status.trials.failed, status.trials.suspended, status.trials.running) == (1, 2, 0)
    assert [r.state for r in status.trial_records] == ["Failed", "Suspended", "Suspended"]
    events = {e.reason: e.type for e in decision.events}
    assert events["MaxFailedTrialsReached"] == "Warning"


def test_wall_time_budget_ends_the_sweep_with_the_best_trial_so_far() -> None:
    started = NOW - datetime.timedelta(seconds=10)
    decision = decided(
        sweep_body(parallelTrials=3, budget={"maxWallTimeSeconds": 8}),
        trial(0, "Succeeded", loss=2.0),
        trial(1, "Running"),
        trial(2, "Pending"),
        status=SweepStatus(start_time=started),
    )
    assert decision.children == []
    assert [p.name for p in decision.patches] == ["lr-trial-1", "lr-trial-2"]
    assert all(p.patch == SUSPEND and not p.pruned for p in decision.patches)
    assert decision.status.phase == "Succeeded"
    assert condition(decision, "Complete") == (
        "True",
        "BudgetExhausted",
        "10s since the sweep started (maxWallTimeSeconds=8)",
    )
    assert decision.status.best_trial is not None
    assert decision.status.best_trial.name == "lr-trial-0"
    assert [r.state for r in decision.status.trial_records] == [
        "Succeeded",
        "Suspended",
        "Suspended",
    ]


def test_accelerator_hours_budget_counts_every_trial() -> None:
    decision = decided(
        sweep_body(parallelTrials=2, budget={"maxAcceleratorHours": 0.5}),
        trial(0, "Running", hours=0.25),
        trial(1, "Running", hours=0.3),
    )
    assert decision.status.accelerator_hours == 0.55
    assert condition(decision, "Complete") == (
        "True",
        "BudgetExhausted",
        "0.55 accelerator hours used (maxAcceleratorHours=0.5)",
    )
    assert [p.patch for p in decision.patches] == [SUSPEND, SUSPEND]
    assert decision.children == []


def test_a_budget_not_yet_spent_lets_the_sweep_go_on() -> None:
    decision = decided(
        sweep_body(parallelTrials=2, budget={"maxAcceleratorHours": 1.0}),
        trial(0, "Running", hours=0.25),
    )
    assert decision.status.phase == "Running"
    assert names(decision) == ["lr-trial-1"]
    assert decision.patches == []


def test_a_suspended_sweep_suspends_its_trials_and_creates_none() -> None:
    decision = decided(
        sweep_body(parallelTrials=3, suspend=True), trial(0, "Running"), trial(1, "Pending")
    )
    assert decision.children == []
    assert decision.patches == [
        decide.TrialPatch("lr-trial-0", SUSPEND),
        decide.TrialPatch("lr-trial-1", SUSPEND),
    ]
    assert decision.status.phase == "Suspended"
    assert condition(decision, "Suspended") == (
        "True",
        "Suspended",
        "trials suspended; checkpoints kept",
    )
    assert condition(decision, "Running")[:2] == ("False", "Suspended")
    assert "Suspended" in reasons(decision)


def test_a_resumed_sweep_resumes_its_suspended_trials_and_keeps_their_slots() -> None:
    body = sweep_body(parallelTrials=2)
    suspended = decided(
        sweep_body(parallelTrials=2, suspend=True), trial(0, "Running"), trial(1, "Running")
    ).status
    decision = decided(
        body,
        trial(0, "Suspended", suspend=True),
        trial(1, "Suspended", suspend=True),
        status=suspended,
    )
    assert decision.patches == [
        decide.TrialPatch("lr-trial-0", RESUME),
        decide.TrialPatch("lr-trial-1", RESUME),
    ]
    assert decision.children == []  # resumed, not replaced
    assert decision.status.phase == "Running"
    assert condition(decision, "Suspended")[:2] == ("False", "Resumed")
    assert condition(decision, "Running") == (
        "True",
        "TrialsRunning",
        "2 running, 0 pending, 0/4 finished",
    )


def test_a_suggested_trial_spec_that_is_no_valid_training_run_fails_the_sweep() -> None:
    # learningRate is at most 10: a draw above it is no valid TrainingRun spec.
    lr = {"name": "lr", "path": "hyperparameters.learningRate", "type": "float"}
    body = sweep_body(algorithm="random", parameters=[{**lr, "min": 11, "max": 20}])
    decision = decided(body)
    assert decision.children == []
    assert decision.status.phase == "Failed" and decision.status.completion_time == NOW
    status, reason, message = condition(decision, "Failed")
    assert (status, reason) == ("True", "InvalidTrialSpec")
    assert "hyperparameters.learningRate" in message and "lr=" in message
    assert "InvalidTrialSpec" in reasons(decision)


def test_a_spec_the_schema_cannot_check_fails_the_sweep_naming_the_field() -> None:
    layers = {"name": "layers", "path": "model.numLayers", "type": "categorical"}
    body = sweep_body(parameters=[{**layers, "values": ["2", "many"]}])
    with pytest.raises(ValidationError) as raised:
        Sweep.model_validate(body)
    decision = decide.invalid_spec(SweepStatus(), 3, raised.value, NOW)
    assert decision.status.phase == "Failed" and decision.status.completion_time == NOW
    status, reason, message = condition(decision, "Failed")
    assert (status, reason) == ("True", "InvalidSpec")
    assert message.startswith("invalid Sweep: ") and "'many' is not an integer" in message
    assert all(c.observed_generation == 3 for c in decision.status.conditions)


def test_early_stopping_prunes_a_trial_behind_the_median() -> None:
    body = sweep_body(
        parallelTrials=4, maxTrials=4, earlyStopping={"minTrials": 3, "startStep": 10}
    )
    trials = [trial(i, "Running", loss=2.0, step=20) for i in range(3)]
    trials.append(trial(3, "Running", loss=4.5, step=20))
    decision = decided(body, *trials)
    assert decision.patches == [
        decide.TrialPatch("lr-trial-3", build.suspend_patch(pruned=True), pruned=True)
    ]
    assert decision.patches[0].patch["metadata"]["annotations"][build.PRUNED_ANNOTATION] == "true"
    pruned = [e for e in decision.events if e.reason == "TrialPruned"]
    assert [e.message for e in pruned] == [
        "lr-trial-3 stopped at step 20 (4.5): worse than the median"
    ]
    record = decision.status.trial_records[3]
    assert record.state == "Pruned" and [(p.step, p.value) for p in record.intermediate] == [
        (20, 4.5)
    ]
    assert decision.status.trials is not None
    assert (decision.status.trials.pruned, decision.status.trials.running) == (1, 3)
    assert [e.name for e in decision.status.leaderboard] == ["lr-trial-3"]  # best value so far
    assert decision.children == []  # maxTrials reached


def test_intermediate_values_accumulate_from_the_recorded_curve() -> None:
    body = sweep_body(parallelTrials=1, maxTrials=1)
    first = decided(body, trial(0, "Running", loss=3.0, step=10))
    later = decided(body, trial(0, "Running", loss=2.5, step=20), status=first.status)
    (record,) = later.status.trial_records
    assert [(p.step, p.value) for p in record.intermediate] == [(10, 3.0), (20, 2.5)]


def test_a_finished_sweep_is_left_as_it_is() -> None:
    done = decided(sweep_body(parallelTrials=1, maxTrials=1), trial(0, "Succeeded", loss=1.0))
    assert done.status.phase == "Succeeded"
    again = decided(sweep_body(parallelTrials=1, maxTrials=1), status=done.status)
    assert again.children == [] and again.patches == [] and again.events == []
    assert again.status == done.status
