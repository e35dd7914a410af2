"""Sweep search: grid enumeration, reproducible random draws, TPE learning from trials, and
the median stopping rule."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from llmops.api.sweep import SweepSpec
from llmops.search import (
    Trial,
    grid_axis,
    grid_point,
    grid_size,
    median_rule_prunes,
    random_point,
    rank,
    suggest,
    tpe_point,
    trial_budget,
)

TEMPLATE = {"datasetRef": {"name": "corpus"}, "hyperparameters": {"maxSteps": 100}}


def sweep_spec(*parameters: dict[str, Any], **spec: Any) -> SweepSpec:
    return SweepSpec.model_validate({"template": TEMPLATE, "parameters": list(parameters), **spec})


LR = {
    "name": "lr",
    "path": "hyperparameters.learningRate",
    "type": "log-uniform",
    "min": 1e-4,
    "max": 1e-2,
}
LAYERS = {"name": "layers", "path": "model.numLayers", "type": "int", "min": 2, "max": 8, "step": 3}
SCHEDULE = {
    "name": "schedule",
    "path": "hyperparameters.schedule",
    "type": "categorical",
    "values": ["cosine", "linear"],
}
DROPOUT = {
    "name": "dropout",
    "path": "model.dropout",
    "type": "float",
    "min": 0.0,
    "max": 0.2,
    "gridPoints": 5,
}


def test_grid_axes() -> None:
    spec = sweep_spec(LR, LAYERS, SCHEDULE, DROPOUT)
    lr, layers, schedule, dropout = spec.parameters
    assert grid_axis(layers) == [2, 5, 8]
    assert grid_axis(schedule) == ["cosine", "linear"]
    assert grid_axis(dropout) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert grid_axis(lr) == pytest.approx([1e-4, 1e-3, 1e-2])  # log-spaced, 3 by default
    assert grid_size(spec.parameters) == 3 * 3 * 2 * 5


def test_grid_point_i_is_the_ith_combination_of_the_product() -> None:
    spec = sweep_spec(LR, LAYERS, SCHEDULE)
    axes = [grid_axis(p) for p in spec.parameters]
    expected = [
        dict(zip(["lr", "layers", "schedule"], combo, strict=True))
        for combo in itertools.product(*axes)
    ]
    assert [grid_point(spec.parameters, i) for i in range(len(expected))] == expected
    with pytest.raises(IndexError):
        grid_point(spec.parameters, len(expected))


def test_grid_caps_the_trial_budget_at_the_grid_size() -> None:
    assert trial_budget(sweep_spec(SCHEDULE, algorithm="grid", maxTrials=10)) == 2
    assert trial_budget(sweep_spec(LAYERS, SCHEDULE, algorithm="grid", maxTrials=4)) == 4
    assert trial_budget(sweep_spec(SCHEDULE, algorithm="random", maxTrials=10)) == 10


def test_categorical_values_take_the_fields_type() -> None:
    spec = sweep_spec(
        {
            "name": "stage",
            "path": "deepspeed.zeroStage",
            "type": "categorical",
            "values": ["1", "3"],
        },
        {
            "name": "spot",
            "path": "scheduling.spot",
            "type": "categorical",
            "values": ["true", "false"],
        },
    )
    assert grid_axis(spec.parameters[0]) == [1, 3]
    assert grid_axis(spec.parameters[1]) == [True, False]


def test_random_is_reproducible_per_index_and_in_range() -> None:
    spec = sweep_spec(LR, LAYERS, SCHEDULE, DROPOUT, algorithm="random", seed=42)
    first = [suggest(spec, i, []) for i in range(20)]
    # Any order, any history: trial i always gets the same values (an operator restart
    # reproduces the sweep).
    assert [suggest(spec, i, []) for i in reversed(range(20))] == first[::-1]
    assert random_point(spec.parameters, 43, 0) != first[0]  # the seed matters
    assert len({p["lr"] for p in first}) == 20
    for point in first:
        assert 1e-4 <= point["lr"] <= 1e-2
        assert point["layers"] in (2, 5, 8)
        assert point["schedule"] in ("cosine", "linear")
        assert 0.0 <= point["dropout"] <= 0.2
    # log-uniform: about as many draws below the geometric midpoint as above it
    below = sum(p["lr"] < 1e-3 for p in first)
    assert 5 <= below <= 15


def test_tpe_prefers_the_better_region() -> None:
    spec = sweep_spec(
        {"name": "x", "path": "model.dropout", "type": "float", "min": 0.0, "max": 0.9}
    )
    # 30 finished trials spread over the range; the objective is best at x = 0.7.
    history = [
        Trial(i, {"x": 0.9 * i / 29}, "Succeeded", (0.9 * i / 29 - 0.7) ** 2) for i in range(30)
    ]
    tpe = [tpe_point(spec.parameters, history, 0, i, "minimize")["x"] for i in range(30, 50)]
    uniform = [random_point(spec.parameters, 0, i)["x"] for i in range(30, 50)]
    tpe_distance = sum(abs(x - 0.7) for x in tpe) / len(tpe)
    uniform_distance = sum(abs(x - 0.7) for x in uniform) / len(uniform)
    assert tpe_distance < 0.1 < uniform_distance
    # Maximizing the same values sends it to the ends instead.
    far = [tpe_point(spec.parameters, history, 0, i, "maximize")["x"] for i in range(30, 40)]
    assert sum(abs(x - 0.7) for x in far) / len(far) > 0.3


def test_tpe_is_reproducible_and_takes_running_trials_into_account() -> None:
    spec = sweep_spec(LR, SCHEDULE)
    history = [
        Trial(0, {"lr": 1e-3, "schedule": "cosine"}, "Succeeded", 2.0),
        Trial(1, {"lr": 5e-3, "schedule": "linear"}, "Failed"),
        Trial(2, {"lr": 2e-4, "schedule": "cosine"}, "Pruned", None, ((10, 3.0),)),
        Trial(3, {"lr": 3e-3, "schedule": "linear"}, "Running"),
    ]
    once = tpe_point(spec.parameters, history, 5, 4, "minimize")
    assert tpe_point(spec.parameters, list(reversed(history)), 5, 4, "minimize") == once
    assert 1e-4 <= once["lr"] <= 1e-2
    # A trial from an older search space (its value lies outside the range) is left out.
    stale = [*history, Trial(4, {"lr": 0.5, "schedule": "cosine"}, "Succeeded", 0.1)]
    assert 1e-4 <= tpe_point(spec.parameters, stale, 5, 5, "minimize")["lr"] <= 1e-2


def curve(*values: float, every: int = 10) -> list[tuple[int, float]]:
    return [(every * (i + 1), v) for i, v in enumerate(values)]


def test_median_rule_stops_a_trial_worse_than_the_median() -> None:
    others = [curve(3.0, 2.5, 2.0), curve(3.1, 2.6, 2.1), curve(2.9, 2.4, 1.9)]
    kwargs: dict[str, Any] = {"min_trials": 3, "start_step": 0, "direction": "minimize"}
    # At step 20 the others' best so far are 2.5, 2.6, 2.4: median 2.5.
    assert median_rule_prunes(curve(3.5, 3.0), others, **kwargs)
    assert not median_rule_prunes(curve(3.5, 2.45), others, **kwargs)
    # Its best so far counts, not its latest value.
    assert not median_rule_prunes(curve(2.0, 3.0), others, **kwargs)


def test_median_rule_waits_for_enough_trials_and_the_start_step() -> None:
    bad = curve(9.0, 9.0)
    others = [curve(3.0, 2.5), curve(3.1, 2.6), curve(2.9)]  # the last has not reached step 20
    assert not median_rule_prunes(bad, others, min_trials=3, start_step=0, direction="minimize")
    assert median_rule_prunes(bad, others, min_trials=2, start_step=0, direction="minimize")
    assert not median_rule_prunes(bad, others, min_trials=2, start_step=30, direction="minimize")
    assert not median_rule_prunes([], others, min_trials=1, start_step=0, direction="minimize")


def test_median_rule_maximizing() -> None:
    others = [curve(0.5, 0.6), curve(0.55, 0.65), curve(0.52, 0.62)]
    assert median_rule_prunes(
        curve(0.3, 0.4), others, min_trials=3, start_step=0, direction="maximize"
    )
    assert not median_rule_prunes(
        curve(0.6, 0.7), others, min_trials=3, start_step=0, direction="maximize"
    )


def test_rank_orders_by_direction_then_index() -> None:
    trials = [
        Trial(0, {}, "Succeeded", 2.0),
        Trial(1, {}, "Succeeded", 1.0),
        Trial(2, {}, "Failed"),
        Trial(3, {}, "Succeeded", 1.0),
    ]
    assert [t.index for t in rank(trials, "minimize")] == [1, 3, 0]
    assert [t.index for t in rank(trials, "maximize")] == [0, 1, 3]
    assert math.isclose(rank(trials, "minimize")[0].value or 0, 1.0)
