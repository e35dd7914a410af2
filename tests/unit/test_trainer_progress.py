from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmops.api.workload import TrainingProgress, ValidationScores, parse_progress_line
from llmops_trainer.model_card import render, sparkline
from llmops_trainer.progress import ProgressState, Reporter, read_progress


def test_rank_0_writes_progress_file_log_line_and_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reporter = Reporter(True, tmp_path, metrics_port=0)
    record = TrainingProgress(phase="Training", step=3, total_steps=10, train_loss=2.5)
    reporter.report(record)
    assert read_progress(tmp_path) == record
    line = capsys.readouterr().out.strip()
    assert parse_progress_line(line) == record
    assert parse_progress_line("some other line") is None
    assert reporter.registry.get_sample_value("llmops_training_loss") == 2.5
    assert reporter.registry.get_sample_value("llmops_training_step") == 3


def test_other_ranks_report_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Reporter(False, tmp_path / "out", metrics_port=0).report(TrainingProgress(phase="Training"))
    assert read_progress(tmp_path / "out") is None and capsys.readouterr().out == ""


def test_progress_state_survives_a_checkpoint_round_trip() -> None:
    state = ProgressState(step=7, consumed_samples=70)
    state.validation = ValidationScores(loss=2.0, perplexity=7.4, accuracy=0.3)
    state.checkpointed("step-7")
    restored = ProgressState()
    restored.restore(json.loads(json.dumps(state.saved())))
    assert (restored.step, restored.consumed_samples) == (7, 70)
    assert restored.validation == state.validation
    assert (restored.best_checkpoint, restored.best_validation_loss) == ("step-7", 2.0)
    # A checkpoint written before validation scores were saved whole still resumes.
    old = ProgressState()
    old.restore({"step": 3, "lastValLoss": 1.5, "bestValLoss": 1.5, "bestCheckpoint": "step-3"})
    assert old.validation == ValidationScores(loss=1.5) and old.best_checkpoint == "step-3"


def test_model_card_has_data_curves_and_metrics() -> None:
    assert sparkline([3.0, 2.0, 1.0]) == "█▄ "
    card = render(
        "demo",
        {"model": {"objective": "causal-lm"}},
        {"name": "web", "fingerprint": "abc123", "vocab_size": 100, "supervised": False},
        {"num_layers": 2, "hidden_size": 16, "parameters": 1234},
        [{"step": 1, "trainLoss": 3.0}, {"step": 2, "trainLoss": 2.0}, {"step": 2, "valLoss": 2.1}],
        {"perplexity": 8.2},
        [{"loss": 5.0, "text": "a | b"}],
        [],
    )
    assert "abc123" in card and "| perplexity | 8.2 |" in card and "a \\| b" in card
    assert "| 2 | 2.1 |" in card
