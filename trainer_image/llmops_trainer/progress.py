"""What rank 0 tells the outside world: progress.json, a log line, Prometheus metrics, and the
termination report. The records are the contract's models (`llmops.api.workload`), built
here from the trainer's `ProgressState` by pure functions, so a unit test can check that
every status field the operator fills is produced.

progress.json (in the output folder) is replaced atomically at every log interval, so the
operator always reads a whole document; the same document goes to stdout as one line
prefixed with `LLMOPS_PROGRESS `, for whoever follows the pod's log instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from llmops.api.workload import (
    PROGRESS_FILE,
    FinalReport,
    TrainerReport,
    TrainingPhase,
    TrainingProgress,
    ValidationScores,
    progress_log_line,
)

# Checkpoint state.json keys (stable across releases, so old checkpoints resume).
SAVED_KEYS = {
    "step": "step",
    "consumedSamples": "consumed_samples",
    "history": "history",
    "bestCheckpoint": "best_checkpoint",
    "bestValLoss": "best_validation_loss",
    "bestMetric": "best_metric",
    "evalsWithoutImprovement": "evals_without_improvement",
}


@dataclass
class ProgressState:
    """Where training stands; saved with every checkpoint and restored on resume."""

    step: int = 0
    consumed_samples: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl entries
    validation: ValidationScores | None = None  # the latest evaluation
    best_checkpoint: str | None = None
    best_validation_loss: float | None = None
    best_metric: float | None = None  # early stopping's metric at its best
    evals_without_improvement: int = 0
    latest_checkpoint: str | None = None
    latest_checkpoint_validation_loss: float | None = None

    def saved(self) -> dict[str, Any]:
        state = {key: getattr(self, name) for key, name in SAVED_KEYS.items()}
        state["lastValLoss"] = self.validation.loss if self.validation else None
        state["lastValidation"] = self.validation.to_dict() if self.validation else None
        return state

    def restore(self, saved: Mapping[str, Any]) -> None:
        for key, name in SAVED_KEYS.items():
            if key in saved:
                setattr(self, name, saved[key])
        if saved.get("lastValidation"):
            self.validation = ValidationScores.model_validate(saved["lastValidation"])
        elif saved.get("lastValLoss") is not None:
            self.validation = ValidationScores(loss=saved["lastValLoss"])

    def checkpointed(self, name: str) -> None:
        """A checkpoint of the current step was published."""
        loss = self.validation.loss if self.validation else None
        self.latest_checkpoint = name
        self.latest_checkpoint_validation_loss = loss
        if loss is not None and (
            self.best_validation_loss is None or loss < self.best_validation_loss
        ):
            self.best_checkpoint, self.best_validation_loss = name, loss

    def last_training_entry(self) -> Mapping[str, Any]:
        return next((h for h in reversed(self.history) if "trainLoss" in h), {})


def progress_record(
    state: ProgressState, phase: TrainingPhase, total_steps: int, num_samples: int
) -> TrainingProgress:
    last = state.last_training_entry()
    return TrainingProgress(
        phase=phase,
        step=state.step,
        total_steps=total_steps,
        epoch=state.consumed_samples / num_samples if num_samples else None,
        train_loss=last.get("trainLoss"),
        train_loss_text=last.get("trainLossText"),
        train_loss_supervised=last.get("trainLossSupervised"),
        learning_rate=last.get("learningRate"),
        grad_norm=last.get("gradNorm"),
        tokens_per_second=last.get("tokensPerSecond"),
        mfu=last.get("mfu"),
        validation=state.validation,
        latest_checkpoint=state.latest_checkpoint,
        latest_checkpoint_validation_loss=state.latest_checkpoint_validation_loss,
        best_checkpoint=state.best_checkpoint,
        best_checkpoint_validation_loss=state.best_validation_loss,
    )


def trainer_report(state: ProgressState, final: FinalReport) -> TrainerReport:
    evaluation = final.evaluation()
    return TrainerReport(
        step=state.step,
        final_evaluation=evaluation if evaluation.to_dict() else None,
        latest_checkpoint=state.latest_checkpoint,
        latest_checkpoint_validation_loss=state.latest_checkpoint_validation_loss,
        best_checkpoint=state.best_checkpoint,
        best_checkpoint_validation_loss=state.best_validation_loss,
    )


class Metrics:
    """The trainer's Prometheus metrics (base units, `llmops_training_` prefix)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, text: str) -> Gauge:
            return Gauge(f"llmops_training_{name}", text, registry=registry)

        self.loss = gauge("loss", "Training loss of the latest optimizer step.")
        self.loss_by_kind = Gauge(
            "llmops_training_loss_by_kind",
            "Training loss of the latest optimizer step's tokens of one kind (`text` or "
            "`supervised`), for a Dataset mixing plain text and supervised records.",
            ["kind"],
            registry=registry,
        )
        self.validation_loss = gauge("validation_loss", "Latest validation loss.")
        self.perplexity = gauge("validation_perplexity", "Latest validation perplexity.")
        self.train_split_loss = gauge(
            "train_split_loss",
            "Loss on the training split's evaluation subset at the latest evaluation "
            "(evaluation.trainSplit), scored as the validation loss is.",
        )
        self.learning_rate = gauge("learning_rate", "Current learning rate.")
        self.tokens_per_second = gauge(
            "tokens_per_second", "Training tokens per second over all processes."
        )
        self.mfu = gauge(
            "mfu",
            "Model FLOPs utilization (0-1): tokens/s x (6N + 12 x layers x width x context) "
            "/ peak FLOP/s of all accelerators.",
        )
        self.grad_norm = gauge("grad_norm", "Global gradient norm before clipping.")
        self.step = gauge("step", "Optimizer steps done.")
        self.total_steps = gauge("total_steps", "Optimizer steps planned.")
        self.memory = gauge(
            "accelerator_memory_bytes", "Peak accelerator memory allocated by rank 0."
        )
        self.tokens = Counter("llmops_training_tokens", "Tokens trained on.", registry=registry)
        self.checkpoint_seconds = Histogram(
            "llmops_training_checkpoint_duration_seconds",
            "Time to write, verify and publish a checkpoint.",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )

    def show(self, progress: TrainingProgress) -> None:
        validation = progress.validation
        for gauge, value in (
            (self.loss, progress.train_loss),
            (self.validation_loss, validation.loss if validation else None),
            (self.perplexity, validation.perplexity if validation else None),
            (self.learning_rate, progress.learning_rate),
            (self.tokens_per_second, progress.tokens_per_second),
            (self.mfu, progress.mfu),
            (self.grad_norm, progress.grad_norm),
            (self.step, progress.step),
            (self.total_steps, progress.total_steps),
        ):
            if value is not None:
                gauge.set(value)
        for kind, value in (
            ("text", progress.train_loss_text),
            ("supervised", progress.train_loss_supervised),
        ):
            if value is not None:
                self.loss_by_kind.labels(kind=kind).set(value)


class Reporter:
    """Progress and metrics; does nothing on ranks other than 0."""

    def __init__(self, enabled: bool, output_dir: Path, metrics_port: int) -> None:
        self.enabled = enabled
        self.path = output_dir / PROGRESS_FILE
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            if metrics_port:
                start_http_server(metrics_port, registry=self.registry)

    def report(self, progress: TrainingProgress) -> None:
        if not self.enabled:
            return
        partial = self.path.with_name(f".{self.path.name}.tmp")
        partial.write_text(progress.to_json() + "\n")
        os.replace(partial, self.path)
        print(progress_log_line(progress), file=sys.stdout, flush=True)
        self.metrics.show(progress)


def read_progress(output_dir: Path) -> TrainingProgress | None:
    """The latest progress document, or None before the first one."""
    path = output_dir / PROGRESS_FILE
    if not path.is_file():
        return None
    return TrainingProgress.model_validate_json(path.read_text())
