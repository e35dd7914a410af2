"""The server's Prometheus metrics: vLLM's serving metrics in our naming (`llmops_serving_`,
base units, `_total` counters, `_seconds` histograms). The HPA and KEDA scale on
`llmops_serving_requests_running`, `llmops_serving_requests_waiting` and the rate of
`llmops_serving_generation_tokens_total`.

As vLLM does, every series carries the served model's name (`model_name`); it is added when
the metrics are exposed, so the code that counts does not repeat it. Counters and histograms
are exposed without prometheus-client's `_created` series, which no dashboard reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from llmops.api.workload import ServingMetric

PREFIX = ServingMetric.PREFIX
# vLLM's bucket boundaries, so dashboards built for one read the other the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5)  # fmt: skip
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0)  # fmt: skip
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                 40.0, 80.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# vLLM's token-count buckets (1, 2, 5 per decade).
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000, 200000, 500000, 1000000)  # fmt: skip
MODEL_LABEL = "model_name"


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.model_name = ""  # the served name, put on every series when exposed
        self.running = Gauge(
            ServingMetric.REQUESTS_RUNNING, "Requests being decoded.", registry=registry
        )
        self.waiting = Gauge(
            ServingMetric.REQUESTS_WAITING,
            "Requests queued for a decoding slot (admitted or waiting for admission).",
            registry=registry,
        )
        self.kv_cache_usage = Gauge(
            ServingMetric.KV_CACHE_USAGE,
            "Share (0-1) of the KV cache's token positions held by running sequences.",
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
        self.queue_time = Histogram(
            ServingMetric.QUEUE_TIME,
            "Time a sequence waited between its arrival and its prefill.",
            buckets=QUEUE_BUCKETS,
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
        self.request_prompt_tokens = Histogram(
            ServingMetric.REQUEST_PROMPT_TOKENS,
            "Prompt tokens of each finished sequence.",
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.request_generation_tokens = Histogram(
            ServingMetric.REQUEST_GENERATION_TOKENS,
            "Generated tokens of each finished sequence.",
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            ServingMetric.REQUESTS,
            "Finished generations by finish reason (stop, length, cancelled, error).",
            ["finish_reason"],
            registry=registry,
        )
        self.rejected = Counter(
            ServingMetric.REQUESTS_REJECTED,
            "Requests refused before generation, by reason (invalid, context_length, "
            "max_tokens, too_large, unauthorized, auth_unavailable, queue_full, draining, "
            "loading, not_found, error).",
            ["reason"],
            registry=registry,
        )
        self.http_responses = Counter(
            ServingMetric.HTTP_REQUESTS,
            "HTTP responses by route, method and status code (every 4xx and 5xx included).",
            ["path", "method", "status"],
            registry=registry,
        )
        self.adapter_loads = Counter(
            ServingMetric.ADAPTER_LOADS,
            "LoRA adapter versions loaded while serving, by outcome (loaded, failed: the "
            "version served before stays).",
            ["outcome"],
            registry=registry,
        )
        self.model_info = Gauge(
            ServingMetric.MODEL_INFO,
            "The model served (always 1).",
            ["model", "source", "context_length"],
            registry=registry,
        )

    def track_engine(
        self,
        running: Callable[[], float],
        waiting: Callable[[], float],
        kv_cache_usage: Callable[[], float],
    ) -> None:
        """Read the engine's state at scrape time, so the gauges are never stale."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.kv_cache_usage.set_function(kv_cache_usage)

    def exposition(self) -> bytes:
        """The text format, every series labelled with the model name, no `_created`."""
        return generate_latest(_Exposed(self.registry, {MODEL_LABEL: self.model_name}))


class _Exposed:
    """A registry's families as exposed: constant labels added, `_created` samples dropped."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self.registry = registry
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            exposed = Metric(family.name, family.documentation, family.type, family.unit)
            exposed.samples = [
                sample._replace(labels={**self.labels, **sample.labels})
                for sample in family.samples
                if not sample.name.endswith("_created")
            ]
            yield exposed
