"""A tiny real sweep: the Sweep's search suggests learning rates, each trial's TrainingRun spec
is built as the controller builds it and trained for real (DeepSpeed on CPU, torchrun), its
progress turned into TrainingRun status as the TrainingRun controller does, and the Sweep's
best trial and leaderboard computed from those statuses."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any

from helpers import Job, training_run

from llmops.api.sweep import Sweep
from llmops.api.trainingrun import TrainingRunStatus
from llmops.builders import sweep as build
from llmops.decide.trainingrun import apply_progress
from llmops.search import suggest, trial_budget
from llmops_trainer.progress import read_progress


def sweep_body() -> dict[str, Any]:
    template = training_run(
        hyperparameters={"maxSteps": 16, "warmupSteps": 2, "minLearningRate": 0.00001},
        resources={"numNodes": 1, "procsPerNode": 2},
        checkpointing={"intervalSteps": 16, "keepLast": 1},
        evaluation={"intervalSteps": 8, "batches": 2, "metrics": ["perplexity"]},
    )["spec"]
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "Sweep",
        "metadata": {"name": "toy-lr", "namespace": "default", "uid": "uid-toy", "generation": 1},
        "spec": {
            "template": template,
            "algorithm": "grid",
            "maxTrials": 4,
            "parameters": [
                {
                    "name": "lr",
                    "path": "hyperparameters.learningRate",
                    "type": "log-uniform",
                    "min": 0.0001,
                    "max": 0.03,
                    "gridPoints": 4,
                }
            ],
        },
    }


def test_a_tiny_sweep_reports_the_trial_with_the_lowest_validation_loss(
    job: Callable[..., Job],
) -> None:
    body = sweep_body()
    sweep = Sweep.model_validate(body)
    children: list[dict[str, Any]] = []
    assert trial_budget(sweep.spec) == 4
    for index in range(trial_budget(sweep.spec)):
        observed = [build.observe(c, "validationLoss", None) for c in children]
        params = suggest(sweep.spec, index, [o.trial for o in observed])
        trial = build.trial_manifest(body, sweep, index, params)
        run = job(trial, name=trial["metadata"]["name"])
        code = run.run(timeout=300)
        assert code == 0, run.log.read_text()[-4000:]
        record = read_progress(run.output)
        assert record is not None and record.phase == "Completed"
        status = TrainingRunStatus(phase="Succeeded")
        apply_progress(status, record, "pvc://unused", datetime.datetime.now(datetime.UTC))
        trial["status"] = status.to_dict()
        children.append(trial)

    observed = [build.observe(c, "validationLoss", None) for c in children]
    losses = {o.name: o.trial.value for o in observed}
    assert all(isinstance(v, float) for v in losses.values())
    assert len(set(losses.values())) == 4  # the learning rate made a difference
    best = build.best_trial(observed, "minimize")
    board = build.leaderboard(observed, "minimize")
    print("\nleaderboard:\n" + "\n".join(json.dumps(e) for e in board))
    assert best is not None
    assert best["name"] == min(losses, key=lambda n: losses[n] or 0.0)
    assert best["value"] == min(v for v in losses.values() if v is not None)
    assert [e["value"] for e in board] == sorted(v for v in losses.values() if v is not None)
    lrs = [c["spec"]["hyperparameters"]["learningRate"] for c in children]
    assert lrs[0] == 0.0001 and lrs[-1] == 0.03 and lrs == sorted(lrs)
