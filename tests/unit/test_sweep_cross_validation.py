"""k-fold cross-validation in a Sweep, as pure decisions: a trial is k fold TrainingRuns,
parallelTrials limits the runs active at once, a trial's state and value (the mean, with the
standard deviation) come from its folds, and suspend/resume reach every fold run. Plus the
admission rules of crossValidation on both kinds."""

from __future__ import annotations

import datetime
import json
import re
import statistics
from typing import Any

import pytest
from pydantic import ValidationError

from llmops.api.sweep import TUNABLE_PATHS, Sweep, SweepStatus
from llmops.api.trainingrun import TrainingRunSpec
from llmops.builders import sweep as build
from llmops.decide import sweep as decide

pytestmark = pytest.mark.unit

NOW = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.UTC)
TEMPLATE = {
    "datasetRef": {"name": "chat"},
    "model": {"numLayers": 2, "numHeads": 2, "hiddenSize": 64, "objective": "sft"},
    "hyperparameters": {"maxSteps": 100},
}
VALUES = ["0.001", "0.002"]
GRID = {"name": "lr", "path": "hyperparameters.learningRate", "type": "categorical"}
SUSPEND = {"spec": {"suspend": True}}
RESUME = {"spec": {"suspend": False}}


def sweep_body(folds: int = 3, parameters: bool = True, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "Sweep",
        "metadata": {"name": "cv", "namespace": "ml", "uid": "sweep-uid", "generation": 1},
        "spec": {
            "template": TEMPLATE,
            "parameters": [{**GRID, "values": VALUES}] if parameters else [],
            "algorithm": "grid",
            "crossValidation": {"folds": folds},
            **spec,
        },
    }


def run(
    index: int,
    fold: int,
    phase: str | None = None,
    *,
    loss: float | None = None,
    suspend: bool = False,
    hours: float = 0.0,
    folds: int = 3,
) -> dict[str, Any]:
    """A fold run as the API server returns it."""
    params = {"lr": float(VALUES[index])} if index < len(VALUES) else {}
    status: dict[str, Any] = {"acceleratorHours": hours}
    if phase:
        status["phase"] = phase
    if loss is not None:
        status["metrics"] = {"validationLoss": loss}
    spec = dict(TEMPLATE, crossValidation={"folds": folds, "fold": fold}, suspend=suspend)
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {
            "name": f"cv-trial-{index}-fold-{fold}",
            "labels": {
                build.SWEEP_LABEL: "cv",
                build.INDEX_LABEL: str(index),
                build.FOLD_LABEL: str(fold),
            },
            "annotations": {build.PARAMETERS_ANNOTATION: json.dumps(params)},
        },
        "spec": spec,
        "status": status,
    }


def decided(
    body: dict[str, Any], *runs: dict[str, Any], status: SweepStatus | None = None
) -> decide.Decision:
    sweep = Sweep.model_validate(body)
    return decide.decide(sweep, status or SweepStatus(), decide.Observed(body, list(runs)), NOW)


def names(decision: decide.Decision) -> list[str]:
    return [child.manifest["metadata"]["name"] for child in decision.children]


def patched(decision: decide.Decision) -> dict[str, dict[str, Any]]:
    return {p.name: p.patch for p in decision.patches}


def test_a_trial_is_k_fold_runs_created_up_to_parallel_trials_runs() -> None:
    decision = decided(sweep_body(parallelTrials=4))
    # Trial 0's three folds, then trial 1's first fold: four runs at once.
    assert names(decision) == [
        "cv-trial-0-fold-0",
        "cv-trial-0-fold-1",
        "cv-trial-0-fold-2",
        "cv-trial-1-fold-0",
    ]
    manifests = [child.manifest for child in decision.children]
    for manifest, (index, fold) in zip(manifests, [(0, 0), (0, 1), (0, 2), (1, 0)], strict=True):
        labels = manifest["metadata"]["labels"]
        assert labels[build.INDEX_LABEL] == str(index) and labels[build.FOLD_LABEL] == str(fold)
        assert manifest["spec"]["crossValidation"] == {"folds": 3, "fold": fold}
        assert manifest["spec"]["hyperparameters"]["learningRate"] == float(VALUES[index])
        TrainingRunSpec.model_validate(manifest["spec"])
    created = next(c for c in decision.status.conditions if c.type == "Created")
    assert created.message == "2 trial(s)"


def test_missing_folds_of_a_started_trial_come_before_a_new_trial() -> None:
    body = sweep_body(parallelTrials=2)
    decision = decided(body, run(0, 0, "Succeeded", loss=1.0), run(0, 1, "Running"))
    assert names(decision) == ["cv-trial-0-fold-2"]
    record = decision.status.trial_records[0]
    assert (record.name, record.state, record.folds) == ("cv-trial-0", "Running", [1.0])
    # The limit is on runs: two active runs take both slots.
    full = decided(body, run(0, 0, "Running"), run(0, 1, "Pending"))
    assert names(full) == []


def test_trial_states_follow_their_folds() -> None:
    assert build.fold_state(["Succeeded", "Succeeded", "Succeeded"], 3) == "Succeeded"
    assert build.fold_state(["Succeeded", "Succeeded"], 3) == "Pending"  # a fold to create
    assert build.fold_state(["Succeeded", "Running"], 3) == "Running"
    assert build.fold_state(["Succeeded", "Failed", "Running"], 3) == "Failed"
    assert build.fold_state(["Suspended", "Running", "Succeeded"], 3) == "Suspended"
    assert build.fold_state(["Pending", "Pending"], 2) == "Pending"


def test_a_trial_value_is_the_mean_of_its_folds_with_their_stdev() -> None:
    losses = [[1.0, 2.0, 3.0], [2.5, 2.5, 2.5]]
    runs = [run(i, f, "Succeeded", loss=losses[i][f], hours=0.5) for i in (0, 1) for f in (0, 1, 2)]
    decision = decided(sweep_body(parallelTrials=3), *runs)
    status = decision.status
    assert status.phase == "Succeeded"
    assert status.trials is not None and status.trials.succeeded == 2
    first, second = status.trial_records
    assert (first.name, first.value, first.folds) == ("cv-trial-0", 2.0, [1.0, 2.0, 3.0])
    assert first.stdev == pytest.approx(statistics.stdev([1.0, 2.0, 3.0]))
    assert (second.value, second.stdev) == (2.5, 0.0)
    assert status.best_trial is not None
    assert (status.best_trial.name, status.best_trial.value) == ("cv-trial-0", 2.0)
    assert status.best_trial.stdev == pytest.approx(1.0)
    assert status.best_trial.checkpoint_uri is None  # no one model of a cross-validated trial
    assert [e.name for e in status.leaderboard] == ["cv-trial-0", "cv-trial-1"]
    assert status.leaderboard[1].stdev == 0.0
    assert status.accelerator_hours == 3.0  # every fold run's hours
    assert names(decision) == []


def test_a_failed_fold_fails_its_trial_and_stops_its_other_folds() -> None:
    body = sweep_body(parallelTrials=3, maxFailedTrials=2)
    decision = decided(body, run(0, 0, "Failed"), run(0, 1, "Running"), run(0, 2, "Succeeded"))
    record = decision.status.trial_records[0]
    assert record.state == "Failed" and record.value is None
    assert patched(decision) == {"cv-trial-0-fold-1": SUSPEND}
    # Its slots go to the next trial; the failed trial's suspended fold takes none.
    again = decided(
        body, run(0, 0, "Failed"), run(0, 1, "Suspended", suspend=True), run(0, 2, "Succeeded")
    )
    assert names(again) == ["cv-trial-1-fold-0", "cv-trial-1-fold-1", "cv-trial-1-fold-2"]
    assert patched(again) == {}  # not resumed either


def test_suspending_and_resuming_the_sweep_reaches_every_fold_run() -> None:
    runs = [run(0, 0, "Succeeded", loss=1.0), run(0, 1, "Running"), run(0, 2, "Pending")]
    suspended = decided(sweep_body(parallelTrials=3, suspend=True), *runs)
    assert patched(suspended) == {"cv-trial-0-fold-1": SUSPEND, "cv-trial-0-fold-2": SUSPEND}
    assert suspended.status.phase == "Suspended" and names(suspended) == []
    stopped = [
        run(0, 0, "Succeeded", loss=1.0),
        run(0, 1, "Suspended", suspend=True),
        run(0, 2, "Suspended", suspend=True),
    ]
    assert decided(sweep_body(suspend=True), *stopped).status.trial_records[0].state == "Suspended"
    resumed = decided(sweep_body(parallelTrials=3), *stopped)
    assert patched(resumed) == {"cv-trial-0-fold-1": RESUME, "cv-trial-0-fold-2": RESUME}
    # The resumed folds take two slots, the third goes to trial 1's first fold.
    assert names(resumed) == ["cv-trial-1-fold-0"]


def test_the_budget_sums_every_fold_run_and_suspends_the_active_ones() -> None:
    body = sweep_body(parallelTrials=3, budget={"maxAcceleratorHours": 1.0})
    decision = decided(
        body, run(0, 0, "Succeeded", loss=1.0, hours=0.6), run(0, 1, "Running", hours=0.5)
    )
    assert decision.status.phase == "Succeeded"
    assert patched(decision) == {"cv-trial-0-fold-1": SUSPEND}
    assert names(decision) == []


def test_cross_validation_without_parameters_is_one_trial() -> None:
    body = sweep_body(folds=2, parameters=False, parallelTrials=5, algorithm="tpe")
    decision = decided(body)
    assert names(decision) == ["cv-trial-0-fold-0", "cv-trial-0-fold-1"]
    runs = [run(5, f, "Succeeded", loss=v, folds=2) for f, v in enumerate([1.5, 2.5])]
    for item in runs:  # trial index 0, no parameters
        item["metadata"]["labels"][build.INDEX_LABEL] = "0"
        item["metadata"]["name"] = item["metadata"]["name"].replace("trial-5", "trial-0")
    done = decided(body, *runs).status
    assert done.phase == "Succeeded" and done.best_trial is not None
    assert (done.best_trial.value, done.best_trial.parameters) == (2.0, {})
    assert done.best_trial.stdev == pytest.approx(statistics.stdev([1.5, 2.5]))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"earlyStopping": {"minTrials": 2}}, "earlyStopping"),
        ({"crossValidation": {"folds": 1}}, "crossValidation.folds"),
        ({"crossValidation": {"folds": 21}}, "crossValidation.folds"),
    ],
)
def test_admission_refuses_bad_cross_validation(change: dict[str, Any], says: str) -> None:
    body = sweep_body()
    body["spec"].update(change)
    with pytest.raises(ValidationError, match=re.escape(says)):
        Sweep.model_validate(body)


def test_admission_of_names_parameters_and_fold() -> None:
    long = sweep_body()
    long["metadata"]["name"] = "n" * 28
    with pytest.raises(ValidationError, match=r"metadata\.name"):
        Sweep.model_validate(long)
    plain = sweep_body(parameters=False)
    del plain["spec"]["crossValidation"]
    with pytest.raises(ValidationError, match="parameters"):
        Sweep.model_validate(plain)
    with pytest.raises(ValidationError, match="fold"):
        TrainingRunSpec.model_validate({**TEMPLATE, "crossValidation": {"folds": 3, "fold": 3}})
    assert not any(path.startswith("crossValidation") for path in TUNABLE_PATHS)
