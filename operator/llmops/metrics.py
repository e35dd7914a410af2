"""Operator metrics (prometheus-client); names follow the project's metric conventions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_SECONDS = Histogram(
    "llmops_operator_reconcile_duration_seconds",
    "Time spent in one reconcile of a resource.",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter(
    "llmops_operator_reconcile_errors_total",
    "Reconciles that ended in an error, by kind and error class.",
    ["kind", "error"],
)
RESOURCES = Gauge(
    "llmops_operator_resources",
    "Custom resources known to the operator, by kind and phase.",
    ["kind", "phase"],
)
CHILDREN_CREATED = Counter(
    "llmops_operator_children_created_total",
    "Child objects created by the operator, by owner kind and child kind.",
    ["kind", "child_kind"],
)
RESTARTS_TRIGGERED = Counter(
    "llmops_operator_restarts_triggered_total",
    "Workload restarts the operator started (e.g. a training gang after a failure).",
    ["kind"],
)
ACCELERATOR_HOURS = Gauge(
    "llmops_trainingrun_accelerator_hours",
    "Accelerator-hours a TrainingRun has used (GPU-hours; pod-hours for a CPU gang), as in its "
    "status.acceleratorHours.",
    # Not `namespace`: Prometheus sets that label to the operator's own namespace.
    ["training_run_namespace", "training_run"],
)
SWEEP_TRIALS_CREATED = Counter(
    "llmops_operator_sweep_trials_created_total",
    "Trial TrainingRuns created by Sweeps, by search algorithm.",
    ["algorithm"],
)
SWEEP_TRIALS = Gauge(
    "llmops_operator_sweep_trials",
    "Trials of each Sweep, by state (pending, running, succeeded, failed, pruned, suspended).",
    # Not `namespace`: Prometheus sets that label to the operator's own namespace.
    ["sweep_namespace", "llmops_sweep", "state"],
)
SWEEP_BEST_OBJECTIVE = Gauge(
    "llmops_operator_sweep_best_objective",
    "Objective value of each Sweep's best trial so far, by objective metric.",
    ["sweep_namespace", "llmops_sweep", "metric"],
)
SWEEP_TRIALS_PRUNED = Counter(
    "llmops_operator_sweep_trials_pruned_total",
    "Trials the early-stopping rule stopped.",
    ["rule"],
)


@contextmanager
def observe_reconcile(kind: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    except Exception as error:
        RECONCILE_ERRORS.labels(kind=kind, error=type(error).__name__).inc()
        raise
    finally:
        RECONCILE_SECONDS.labels(kind=kind).observe(time.perf_counter() - started)
