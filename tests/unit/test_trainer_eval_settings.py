"""Evaluation knobs: which samples an evaluation scores (fixed or fresh), and the spec fields
(step-0 validation, training-split evaluation, log interval)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmops.api.trainingrun import Evaluation, TrainingRunSpec

torch = pytest.importorskip("torch")

from llmops_trainer.batches import eval_indices  # noqa: E402


def test_defaults_and_bounds() -> None:
    evaluation = Evaluation()
    assert evaluation.sample == "fixed"
    assert evaluation.at_start is True and evaluation.train_split is False
    assert evaluation.log_interval_steps == 10
    parsed = Evaluation.model_validate(
        {"sample": "fresh", "trainSplit": True, "atStart": False, "logIntervalSteps": 1}
    )
    assert (parsed.sample, parsed.train_split, parsed.at_start) == ("fresh", True, False)
    for bad in ({"sample": "random"}, {"logIntervalSteps": 0}):
        with pytest.raises(ValidationError) as error:
            Evaluation.model_validate(bad)
        assert next(iter(bad)) in str(error.value)
    spec = TrainingRunSpec.model_validate(
        {"datasetRef": {"name": "d"}, "hyperparameters": {"maxSteps": 5}}
    )
    assert spec.to_dict()["evaluation"]["logIntervalSteps"] == 10


def test_the_fixed_subset_is_the_same_every_time_and_seeded() -> None:
    first = eval_indices(1000, 64, seed=7, world_size=2, rank=0)
    assert first == eval_indices(1000, 64, seed=7, world_size=2, rank=0, draw=0)
    assert first != eval_indices(1000, 64, seed=8, world_size=2, rank=0)
    other_rank = eval_indices(1000, 64, seed=7, world_size=2, rank=1)
    assert len(first) == len(other_rank) == 32 and not set(first) & set(other_rank)


def test_fresh_draws_cover_the_split_without_repeats_until_it_is_used_up() -> None:
    samples, count = 1000, 100
    draws = [
        eval_indices(samples, count, seed=7, world_size=2, rank=r, draw=d)
        for d in range(10)
        for r in range(2)
    ]
    seen = [index for part in draws for index in part]
    assert sorted(seen) == list(range(samples))  # ten draws: the whole split, once
    # Deterministic: a resumed run draws the same subset at the same evaluation.
    assert eval_indices(samples, count, 7, 2, 1, draw=3) == draws[7]
    # The eleventh draw starts the next (reshuffled) pass over the split.
    later = eval_indices(samples, count, seed=7, world_size=2, rank=0, draw=10)
    assert len(later) == 50 and later != draws[0]
