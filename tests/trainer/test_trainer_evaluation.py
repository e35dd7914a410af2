"""Evaluation knobs on a real run: validation at step 0, the training split scored next to the
validation split, fresh evaluation subsets, and the log interval from the spec."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import REFERENCE_STEPS, reference_run
from helpers import Job


def test_fresh_subsets_train_split_and_the_spec_log_interval(
    reference: Job, job: Callable[..., Job]
) -> None:
    run = job(
        reference_run(evaluation={"sample": "fresh", "trainSplit": True, "logIntervalSteps": 5})
    )
    del run.env["LLMOPS_LOG_INTERVAL"]  # the tests' override: this run uses the spec's
    assert run.run() == 0, run.log.read_text()[-4000:]

    # The log interval comes from the spec; the reference's environment overrode its default.
    losses, expected = run.losses(), reference.losses()
    assert sorted(losses) == list(range(5, REFERENCE_STEPS + 1, 5))
    assert sorted(expected) == list(range(1, REFERENCE_STEPS + 1))
    # Evaluating (more, and other samples) leaves training as it was.
    for step, loss in losses.items():
        assert loss == pytest.approx(expected[step], abs=1e-4), f"step {step}"

    evaluations = {m["step"]: m for m in run.metrics() if "valLoss" in m}
    fixed = {m["step"]: m["valLoss"] for m in reference.metrics() if "valLoss" in m}
    assert sorted(evaluations) == sorted(fixed) == [0, 10, 20, 30, 40]
    # Step 0 is the first draw, which is the fixed subset; later ones score other samples of
    # the same weights, so their losses differ from the fixed subset's.
    assert evaluations[0]["valLoss"] == pytest.approx(fixed[0], abs=1e-6)
    for step in (10, 20, 30, 40):
        assert evaluations[step]["valLoss"] != pytest.approx(fixed[step], abs=1e-6), step

    # The overfitting curve: training-split loss next to the validation loss, every time.
    train_split = [evaluations[step]["trainSplitLoss"] for step in sorted(evaluations)]
    assert train_split[-1] < train_split[0] - 1.0
    assert train_split[0] == pytest.approx(evaluations[0]["valLoss"], abs=0.5)  # untrained
