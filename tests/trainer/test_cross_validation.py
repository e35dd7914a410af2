"""A k-fold cross-validation run for real: it trains on the other folds of the training split
only, and its periodic and final validation score its held-out fold."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import CONTEXT, Job, make_dataset, training_run

from llmops_trainer.batches import Windows, fold_bounds
from llmops_trainer.shards import read_manifest


def test_a_fold_run_validates_on_its_held_out_fold(tmp_path: Path, job: Callable[..., Job]) -> None:
    data = make_dataset(tmp_path / "sft", supervised=True)
    run = training_run(
        model={"objective": "sft"},
        hyperparameters={"maxSteps": 6, "warmupSteps": 1},
        resources={"numNodes": 1, "procsPerNode": 1},
        checkpointing={"intervalSteps": 6, "keepLast": 1},
        evaluation={"intervalSteps": 3, "batches": 2, "metrics": ["perplexity"]},
        crossValidation={"folds": 2, "fold": 1},
    )
    fold = job(run, data=data)
    assert fold.run(timeout=120) == 0, fold.log.read_text()[-4000:]

    samples = len(Windows(data, read_manifest(data), "train", CONTEXT))
    held_out = fold_bounds(samples, 2, 1)
    trained = [s for step in fold.samples().values() for s in step]
    assert len(trained) == 6 * 4
    assert not any(s in held_out for s in trained)  # never a held-out sample

    validation = {m["step"]: m["valLoss"] for m in fold.metrics() if "valLoss" in m}
    assert {3, 6} <= set(validation)
    report = json.loads((fold.output / "eval_report.json").read_text())
    final = report["final"]
    assert final["split"] == "fold-1/2"
    # The fixed evaluation subset of the fold, scored by the same weights at step 6.
    assert final["loss"] == pytest.approx(validation[6], rel=1e-4)
    assert report["worstPassages"] and all(w["sample"] in held_out for w in report["worstPassages"])
