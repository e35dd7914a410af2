from __future__ import annotations

from pathlib import Path

import pytest

from llmops_trainer.model_card import render, sparkline
from llmops_trainer.progress import Reporter, parse_log_line, read_progress


def test_rank_0_writes_progress_file_log_line_and_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reporter = Reporter(True, tmp_path, metrics_port=0)
    reporter.report(
        {"phase": "Training", "step": 3, "totalSteps": 10, "trainLoss": 2.5, "mfu": None}
    )
    assert read_progress(tmp_path) == {
        "phase": "Training",
        "step": 3,
        "totalSteps": 10,
        "trainLoss": 2.5,
        "mfu": None,
    }
    line = capsys.readouterr().out.strip()
    assert parse_log_line(line) == read_progress(tmp_path)
    assert parse_log_line("some other line") is None
    assert reporter.registry.get_sample_value("llmops_training_loss") == 2.5
    assert reporter.registry.get_sample_value("llmops_training_step") == 3


def test_other_ranks_report_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Reporter(False, tmp_path / "out", metrics_port=0).report({"step": 1})
    assert read_progress(tmp_path / "out") is None and capsys.readouterr().out == ""


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
