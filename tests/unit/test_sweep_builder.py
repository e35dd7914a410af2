"""Sweep API validation and the trial builder: parameter paths are checked and named, trial
specs carry the parameters at their paths, and a trial's labels, annotations and owner
reference let the controller read the sweep back from the API server."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from llmops.api import KINDS, Sweep, TrainingRunSpec
from llmops.api.sweep import MAX_INTERMEDIATE_VALUES, TUNABLE_PATHS, Budget
from llmops.builders import sweep as build

TEMPLATE = {
    "datasetRef": {"name": "corpus"},
    "model": {"numLayers": 2, "numHeads": 2, "hiddenSize": 64},
    "hyperparameters": {"maxSteps": 100, "learningRate": 0.001, "minLearningRate": 0.0},
}
LR = {
    "name": "lr",
    "path": "hyperparameters.learningRate",
    "type": "float",
    "min": 1e-4,
    "max": 1e-2,
}


def sweep_body(*parameters: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "Sweep",
        "metadata": {"name": "lr-search", "namespace": "ml", "uid": "uid-1", "generation": 1},
        "spec": {"template": TEMPLATE, "parameters": list(parameters or [LR]), **spec},
    }


def error_of(body: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as raised:
        Sweep.model_validate(body)
    return str(raised.value)


def test_kind_is_registered_with_the_api() -> None:
    assert KINDS["Sweep"] is Sweep
    assert Sweep.model_validate(sweep_body()).spec.algorithm == "tpe"


def test_tunable_paths_are_the_scalar_fields_of_a_training_run_spec() -> None:
    assert TUNABLE_PATHS["hyperparameters.learningRate"] is float
    assert TUNABLE_PATHS["model.numLayers"] is int
    assert TUNABLE_PATHS["hyperparameters.schedule"] is str
    assert TUNABLE_PATHS["scheduling.spot"] is bool
    assert "suspend" not in TUNABLE_PATHS and "datasetRef.name" not in TUNABLE_PATHS
    assert "deepspeed.config" not in TUNABLE_PATHS  # free-form: not a scalar


def test_unknown_path_is_rejected_naming_the_field() -> None:
    message = error_of(sweep_body({**LR, "path": "hyperparameters.learningrate"}))
    assert "spec.parameters.0.path" in message
    assert "'hyperparameters.learningrate' is not a field of the TrainingRun spec" in message


@pytest.mark.parametrize(
    ("parameter", "field", "words"),
    [
        ({**LR, "min": 0.1, "max": 0.01}, "min", "min must not exceed max"),
        ({**LR, "values": ["0.1"]}, "values", "values is required for type categorical"),
        ({**LR, "type": "categorical", "min": None, "max": None}, "values", "values is required"),
        ({**LR, "type": "log-uniform", "min": 0.0}, "min", "greater than 0"),
        ({**LR, "step": 2}, "step", "step applies to type int only"),
        (
            {
                "name": "n",
                "path": "model.numLayers",
                "type": "int",
                "min": 1,
                "max": 4,
                "gridPoints": 3,
            },
            "gridPoints",
            "gridPoints applies to types float and log-uniform only",
        ),
        (
            {"name": "n", "path": "model.numLayers", "type": "int", "min": 1.5, "max": 4},
            "min",
            "whole numbers",
        ),
        (
            {"name": "n", "path": "model.numLayers", "type": "float", "min": 1, "max": 4},
            "type",
            "need a floating-point field",
        ),
        (
            {"name": "s", "path": "hyperparameters.schedule", "type": "float", "min": 1, "max": 4},
            "type",
            "need a floating-point field",
        ),
        (
            {"name": "s", "path": "hyperparameters.schedule", "type": "int", "min": 1, "max": 4},
            "type",
            "type int needs an integer field",
        ),
        (
            {"name": "n", "path": "model.numLayers", "type": "categorical", "values": ["2", "x"]},
            "values",
            "'x'",
        ),
    ],
)
def test_parameter_rules_name_the_field(parameter: dict[str, Any], field: str, words: str) -> None:
    parameter = {k: v for k, v in parameter.items() if v is not None}
    message = error_of(sweep_body(parameter))
    assert field in message and words in message


def test_duplicate_names_and_paths_are_rejected() -> None:
    assert "names must be distinct" in error_of(sweep_body(LR, {**LR, "min": 0.001}))
    assert "each path" in error_of(sweep_body(LR, {**LR, "name": "lr2"}))


def test_trial_manifest_applies_parameters_at_their_paths() -> None:
    body = sweep_body(
        LR,
        {"name": "layers", "path": "model.numLayers", "type": "int", "min": 2, "max": 4},
        {"name": "stage", "path": "deepspeed.zeroStage", "type": "categorical", "values": ["2"]},
    )
    sweep = Sweep.model_validate(body)
    params = {"lr": 0.003, "layers": 4, "stage": 2}
    trial = build.trial_manifest(body, sweep, 7, params)

    assert trial["kind"] == "TrainingRun" and trial["metadata"]["name"] == "lr-search-trial-7"
    spec = TrainingRunSpec.model_validate(trial["spec"])
    assert spec.hyperparameters.learning_rate == 0.003
    assert spec.model.num_layers == 4 and spec.model.hidden_size == 64  # the rest kept
    assert spec.deepspeed.zero_stage == 2
    assert spec.dataset_ref.name == "corpus"
    labels = trial["metadata"]["labels"]
    assert labels["llmops.dev/sweep"] == "lr-search"
    assert labels["llmops.dev/trial-index"] == "7"
    assert labels["app.kubernetes.io/managed-by"] == "llmops"
    assert labels["app.kubernetes.io/component"] == "trial"
    annotations = trial["metadata"]["annotations"]
    assert json.loads(annotations["llmops.dev/trial-parameters"]) == params
    (owner,) = trial["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "Sweep",
        "lr-search",
        "uid-1",
        True,
    )
    assert body["spec"]["template"] == TEMPLATE  # the template itself is untouched


def test_invalid_trial_spec_is_refused_naming_parameter_and_field() -> None:
    body = sweep_body({**LR, "min": 0.0, "max": 20.0})  # learningRate is at most 10
    sweep = Sweep.model_validate(body)
    with pytest.raises(build.InvalidTrial) as raised:
        build.trial_manifest(body, sweep, 0, {"lr": 15.0})
    assert "lr=15.0" in str(raised.value)
    assert "hyperparameters.learningRate" in str(raised.value)


def child(index: int, phase: str | None, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"lr-search-trial-{index}",
            "labels": {"llmops.dev/trial-index": str(index)},
            "annotations": {"llmops.dev/trial-parameters": json.dumps({"lr": 0.001 * (index + 1)})},
        },
        "spec": {},
        "status": {"phase": phase, **status},
    }


def test_observed_trials_leaderboard_and_best() -> None:
    children = [
        child(0, "Succeeded", metrics={"validationLoss": 2.5}, modelUri="s3://b/0/model"),
        child(
            1,
            "Succeeded",
            metrics={"validationLoss": 2.0},
            checkpoints={"best": {"name": "step-90", "step": 90, "uri": "s3://b/1/step-90"}},
            acceleratorHours=1.5,
        ),
        child(2, "Failed"),
        child(3, "Running", step=40, metrics={"validationLoss": 3.0}),
    ]
    pruned = child(4, "Suspended")
    pruned["metadata"]["annotations"]["llmops.dev/trial-pruned"] = "true"
    children.append(pruned)
    previous = {"lr-search-trial-4": {"intermediate": [{"step": 10, "value": 4.0}]}}
    observed = [
        build.observe(c, "validationLoss", previous.get(c["metadata"]["name"])) for c in children
    ]

    assert [o.trial.state for o in observed] == [
        "Succeeded",
        "Succeeded",
        "Failed",
        "Running",
        "Pruned",
    ]
    assert observed[3].trial.intermediate == ((40, 3.0),)
    assert build.counts(observed) == {
        "pending": 0,
        "running": 1,
        "succeeded": 2,
        "failed": 1,
        "pruned": 1,
        "suspended": 0,
        "finished": 4,
    }
    best = build.best_trial(observed, "minimize")
    assert best == {
        "name": "lr-search-trial-1",
        "index": 1,
        "parameters": {"lr": "0.002"},
        "value": 2.0,
        "checkpointUri": "s3://b/1/step-90",
    }
    board = build.leaderboard(observed, "minimize")
    assert [(e["name"], e["value"], e["state"]) for e in board] == [
        ("lr-search-trial-1", 2.0, "Succeeded"),
        ("lr-search-trial-0", 2.5, "Succeeded"),
        ("lr-search-trial-4", 4.0, "Pruned"),
    ]


def test_intermediate_values_are_recorded_per_step_and_capped() -> None:
    points: list[dict[str, Any]] = []
    for step in range(0, 200, 2):
        points = build.merge_intermediate(points, (step, 10.0 - step / 100))
        points = build.merge_intermediate(points, (step, 10.0 - step / 100))  # seen twice
    assert len(points) <= MAX_INTERMEDIATE_VALUES
    assert points[0]["step"] == 0 and points[-1]["step"] == 198
    assert [p["step"] for p in points] == sorted({p["step"] for p in points})
    assert build.merge_intermediate(points, (10, 0.0)) == points  # an older step is ignored


def test_suspend_patch_marks_pruned_trials() -> None:
    assert build.suspend_patch() == {"spec": {"suspend": True}}
    assert build.suspend_patch(pruned=True)["metadata"]["annotations"] == {
        "llmops.dev/trial-pruned": "true"
    }
    assert build.suspend_patch(suspend=False) == {"spec": {"suspend": False}}


def test_budget_counts_accelerator_hours_and_wall_time() -> None:
    running = child(0, "Running", acceleratorHours=3.0)
    no_hours = child(1, "Succeeded", metrics={"validationLoss": 1.0})  # field absent: 0
    observed = [build.observe(c, "validationLoss", None) for c in (running, no_hours)]
    hours = Budget.model_validate({"maxAcceleratorHours": 4.0})
    assert build.budget_exhausted(hours, observed, 10**6) is None
    spent = [build.observe(child(2, "Running", acceleratorHours=1.0), "validationLoss", None)]
    assert "4.00 accelerator hours" in (build.budget_exhausted(hours, observed + spent, 0) or "")
    wall = Budget.model_validate({"maxWallTimeSeconds": 60})
    assert build.budget_exhausted(wall, observed, 59.5) is None
    assert "maxWallTimeSeconds=60" in (build.budget_exhausted(wall, observed, 60) or "")
    assert build.budget_exhausted(None, observed, 10**9) is None


def test_a_running_trials_unwritten_hours_count_towards_the_budget() -> None:
    """A trial's status counts its hours once a minute; the Sweep's budget sees the time
    since as well (2 pods x 8 GPUs for 30 s = 0.1333 GPU-hours), without writing it."""
    import datetime

    from llmops.api.sweep import Budget

    now = datetime.datetime(2026, 11, 1, 12, 0, 30, tzinfo=datetime.UTC)
    trial = child(0, "Running", acceleratorHours=1.0)
    trial["spec"] = {
        "datasetRef": {"name": "corpus"},
        "hyperparameters": {"maxSteps": 10},
        "resources": {"numNodes": 2, "procsPerNode": 8, "gpusPerNode": 8},
    }
    trial["status"]["accountedUntil"] = "2026-11-01T12:00:00Z"
    observed = build.observe(trial, "validationLoss", None, now)
    assert observed.accelerator_hours == 1.0
    assert observed.unaccounted_hours == pytest.approx(16 * 30 / 3600)
    assert build.budget_exhausted(Budget(maxAcceleratorHours=1.1), [observed], 30.0)
    assert build.budget_exhausted(Budget(maxAcceleratorHours=1.2), [observed], 30.0) is None
