"""What rank 0 tells the outside world: progress.json, a log line, Prometheus metrics.

progress.json (in LLMOPS_OUTPUT_DIR) is replaced atomically at every log interval, so the
operator always reads a whole document; the same document goes to stdout as one line
prefixed with `LLMOPS_PROGRESS `, for whoever follows the pod's log instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PROGRESS_FILE = "progress.json"
LOG_PREFIX = "LLMOPS_PROGRESS "
PHASES = ("Starting", "Training", "Evaluating", "Completed", "Interrupted", "Failed")


class Metrics:
    """The trainer's Prometheus metrics (base units, `llmops_training_` prefix)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, text: str) -> Gauge:
            return Gauge(f"llmops_training_{name}", text, registry=registry)

        self.loss = gauge("loss", "Training loss of the latest optimizer step.")
        self.validation_loss = gauge("validation_loss", "Latest validation loss.")
        self.perplexity = gauge("validation_perplexity", "Latest validation perplexity.")
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

    def report(self, progress: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(progress, sort_keys=True)
        partial = self.path.with_name(f".{self.path.name}.tmp")
        partial.write_text(line + "\n")
        os.replace(partial, self.path)
        print(LOG_PREFIX + line, file=sys.stdout, flush=True)
        m = self.metrics
        for gauge, key in (
            (m.loss, "trainLoss"),
            (m.validation_loss, "valLoss"),
            (m.perplexity, "perplexity"),
            (m.learning_rate, "learningRate"),
            (m.tokens_per_second, "tokensPerSecond"),
            (m.mfu, "mfu"),
            (m.grad_norm, "gradNorm"),
            (m.step, "step"),
            (m.total_steps, "totalSteps"),
        ):
            if progress.get(key) is not None:
                gauge.set(progress[key])


def read_progress(output_dir: Path) -> dict[str, Any] | None:
    """The latest progress document, or None before the first one."""
    path = output_dir / PROGRESS_FILE
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def parse_log_line(line: str) -> dict[str, Any] | None:
    """The progress document of a log line, or None for any other line."""
    if not line.startswith(LOG_PREFIX):
        return None
    data: dict[str, Any] = json.loads(line[len(LOG_PREFIX) :])
    return data
