"""A Sweep in the local runtime: the Sweep decide is driven round by round, its trial
TrainingRuns are created in the state directory and trained one at a time (the trainer is
played here by a stand-in that writes each run's final status), and the Sweep's status is
saved with the fold mean and standard deviation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops.local import state
from llmops.local import sweep as local_sweep
from llmops.local.context import Context, key_of
from llmops.local.status import details

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LOSSES = {0: 1.0, 1: 2.0, 2: 3.0}


class NoView:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def update(self, key: Any, **fields: Any) -> None:
        pass

    def message(self, text: str) -> None:
        self.messages.append(text)

    def failure(self, key: Any, log_file: str, tail: str) -> None:
        raise AssertionError(tail)


def test_a_cross_validation_sweep_runs_its_folds_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = list(yaml.safe_load_all((ROOT / "examples" / "cross-validation.yaml").read_text()))
    layout = state.Layout(tmp_path / "state")
    sweep = state.adopt(layout, docs[1])
    view = NoView()
    ctx = Context(layout=layout, view=view)
    ctx.objects[key_of(sweep)] = sweep
    trained: list[str] = []

    def train(ctx: Context, body: dict[str, Any]) -> bool:
        # One run at a time: every other fold run is either finished or not created yet.
        others = [r for r in local_sweep.trial_runs(ctx, sweep) if r is not body]
        assert all(r["status"].get("phase") == "Succeeded" for r in others)
        fold = body["spec"]["crossValidation"]["fold"]
        trained.append(body["metadata"]["name"])
        ctx.save(
            body,
            {
                "phase": "Succeeded",
                "metrics": {"validationLoss": LOSSES[fold]},
                "acceleratorHours": 0.25,
            },
        )
        return True

    monkeypatch.setattr(local_sweep.training, "run", train)
    assert local_sweep.run(ctx, sweep) is True
    assert trained == [f"qa-cv-trial-0-fold-{f}" for f in range(3)]
    saved = state.load_object(layout, "Sweep", "default", "qa-cv")
    assert saved is not None
    status = saved["status"]
    assert status["phase"] == "Succeeded"
    assert status["bestTrial"]["value"] == pytest.approx(2.0)
    assert status["bestTrial"]["stdev"] == pytest.approx(1.0)
    assert status["trialRecords"][0]["folds"] == [1.0, 2.0, 3.0]
    assert status["acceleratorHours"] == pytest.approx(0.75)
    assert "best qa-cv-trial-0: 2 ± 1" in details(saved)
    assert any("± 1" in message for message in view.messages)
    # A second `llmops run` finds it finished.
    assert local_sweep.run(ctx, saved) is True
    assert len(trained) == 3
