"""The server's Prometheus metrics: vLLM's serving metrics in our naming (`llmops_serving_`,
base units, `_total` counters, `_seconds` histograms). The HPA and KEDA scale on
`llmops_serving_requests_running`, `llmops_serving_requests_waiting` and the rate of
`llmops_serving_generation_tokens_total`."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmops.api.workload import ServingMetric

PREFIX = ServingMetric.PREFIX
# vLLM's bucket boundaries, so dashboards built for one read the other the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5)  # fmt: skip
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.running = Gauge(
            ServingMetric.REQUESTS_RUNNING, "Requests being decoded.", registry=registry
        )
        self.waiting = Gauge(
            ServingMetric.REQUESTS_WAITING,
            "Requests queued for a decoding slot.",
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            ServingMetric.TIME_TO_FIRST_TOKEN,
            "Time from a request's arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            ServingMetric.INTER_TOKEN_LATENCY,
            "Time between consecutive generated tokens of a request.",
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.e2e_latency = Histogram(
            ServingMetric.E2E_LATENCY,
            "Time from a request's arrival to its last token.",
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            ServingMetric.BATCH_SIZE,
            "Sequences decoded together in one step.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            ServingMetric.PROMPT_TOKENS, "Prompt tokens processed.", registry=registry
        )
        self.generation_tokens = Counter(
            ServingMetric.GENERATION_TOKENS, "Tokens generated.", registry=registry
        )
        self.requests = Counter(
            PREFIX + "requests",
            "Finished generations by finish reason (stop, length, cancelled, error).",
            ["finish_reason"],
            registry=registry,
        )
        self.rejected = Counter(
            PREFIX + "requests_rejected",
            "Requests refused before generation, by reason (invalid, too_large, unauthorized, "
            "queue_full, draining, not_found).",
            ["reason"],
            registry=registry,
        )
        self.model_info = Gauge(
            PREFIX + "model_info",
            "The model served (always 1).",
            ["model", "source", "context_length"],
            registry=registry,
        )

    def track_queue(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Read the queue sizes at scrape time, so the gauges are never stale."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
