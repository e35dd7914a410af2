"""The chart's Grafana dashboards and alert rules query only metrics our components export.

What is exported is read from the code itself: the operator's registry (llmops.metrics plus
prometheus-client's process collectors) and every metrics class of the trainer image (each
class in an llmops_trainer module that uses prometheus_client and takes a `registry`),
instantiated on a fresh registry; and, for runtime vllm, the metrics of the pinned vLLM
release (vllm_interface.txt, read from its source).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector
from vllm_interface import load, series

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "llmops"
TRAINER = ROOT / "trainer_image" / "llmops_trainer"
# Series Prometheus itself writes for every scrape target.
PROMETHEUS_OWN = {"up"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def _generator():
    spec = importlib.util.spec_from_file_location(
        "generate_dashboards", ROOT / "helm" / "generate_dashboards.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _series(registry: Collector) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def operator_series() -> set[str]:
    import prometheus_client

    import llmops.metrics  # noqa: F401  (registers the operator's metrics)

    return _series(prometheus_client.REGISTRY)


def trainer_series() -> set[str]:
    names: set[str] = set()
    for path in sorted(TRAINER.rglob("*.py")):
        if "prometheus_client" not in path.read_text():
            continue
        module_name = ".".join(path.relative_to(TRAINER.parent).with_suffix("").parts)
        module = importlib.import_module(module_name.removesuffix(".__init__"))
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            parameters = inspect.signature(cls.__init__).parameters
            if list(parameters)[1:] == ["registry"]:
                registry = CollectorRegistry()
                cls(registry)
                names |= _series(registry)
    return names


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return operator_series() | trainer_series() | series(load()) | PROMETHEUS_OWN


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan", "Inf", "NaN"}


def metrics_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = _QUOTED.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _GROUPING.sub("", text)
    text = _RANGE.sub("", text)
    return {
        match.group(1)
        for match in _IDENT.finditer(text)
        if not match.group(2) and match.group(1) not in _KEYWORDS
    }


def test_the_metric_name_parser():
    assert metrics_in(
        'histogram_quantile(0.95, sum by (a, le) (rate(x_bucket{b=~"$c", d="e"}[5m])))'
        " / y offset 10m and bool z"
    ) == {"x_bucket", "y", "z"}


def test_the_exported_metrics_are_read_from_the_code(exported: set[str]):
    assert "llmops_operator_reconcile_duration_seconds_bucket" in exported
    assert "llmops_training_loss" in exported
    assert "llmops_serving_time_to_first_token_seconds_bucket" in exported
    assert "process_resident_memory_bytes" in exported


def test_dashboards_are_generated_from_code_and_fresh():
    generator = _generator()
    files = generator.rendered()
    assert set(files) == {"training.json", "serving.json", "data.json", "operator.json"}
    for name, text in files.items():
        assert (CHART / "dashboards" / name).read_text() == text, (
            f"{name} is stale: run python helm/generate_dashboards.py"
        )


def _panels() -> list[tuple[str, dict]]:
    found = []
    for path in sorted((CHART / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        found += [(dashboard["title"], p) for p in dashboard["panels"] if p["type"] != "row"]
    return found


def test_every_panel_queries_metrics_our_components_export(exported: set[str]):
    panels = _panels()
    assert len(panels) >= 30
    for dashboard, panel in panels:
        assert panel["targets"], f"{dashboard} / {panel['title']} has no query"
        for target in panel["targets"]:
            used = metrics_in(target["expr"])
            assert used, f"{dashboard} / {panel['title']}: no metric in {target['expr']!r}"
            unknown = used - exported
            assert not unknown, f"{dashboard} / {panel['title']} queries {sorted(unknown)}"


def test_dashboards_cover_training_serving_data_and_the_operator(exported: set[str]):
    used = {m for _, p in _panels() for t in p["targets"] for m in metrics_in(t["expr"])}
    for needed in (
        "llmops_training_loss",
        "llmops_training_tokens_per_second",
        "llmops_training_mfu",
        "llmops_training_accelerator_memory_bytes",
        "llmops_operator_restarts_triggered_total",
        "llmops_serving_requests_total",
        "llmops_serving_time_to_first_token_seconds_bucket",
        "llmops_serving_e2e_request_latency_seconds_bucket",
        "llmops_serving_requests_waiting",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:generation_tokens_total",
        "llmops_operator_resources",
        "llmops_operator_reconcile_errors_total",
    ):
        assert needed in used


def test_alert_rules_query_metrics_our_components_export(exported: set[str]):
    rules = yaml.safe_load((CHART / "rules" / "llmops.rules.yaml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert {
        "LLMOpsTrainingStalled",
        "LLMOpsTrainingLossNaN",
        "LLMOpsTrainingLossDiverging",
        "LLMOpsTrainingRunFailed",
        "LLMOpsTrainingRestartLoop",
        "LLMOpsDatasetJobFailed",
        "LLMOpsServingErrorRateHigh",
        "LLMOpsServingLatencySLO",
        "LLMOpsServingKVCacheFull",
        "LLMOpsOperatorDown",
    } <= set(alerts)
    # The serving alerts cover both runtimes.
    for name in ("LLMOpsServingErrorRateHigh", "LLMOpsServingLatencySLO"):
        used = metrics_in(alerts[name])
        assert any(m.startswith("llmops_serving_") for m in used), name
        assert any(m.startswith("vllm:") for m in used), name
    for name, expr in alerts.items():
        used = metrics_in(expr)
        assert used and not used - exported, f"{name} queries {sorted(used - exported)}"


def test_the_keda_query_label_is_the_one_the_pod_monitor_writes():
    """KEDA's Prometheus trigger selects llmops_model_deployment, which the chart's serving
    PodMonitor copies from the pod label llmops.dev/model-deployment."""
    from llmops.builders import modeldeployment

    source = inspect.getsource(modeldeployment)
    assert 'llmops_model_deployment="' in source
    monitor = (CHART / "templates" / "podmonitor.yaml").read_text()
    assert (
        "sourceLabels: [__meta_kubernetes_pod_label_llmops_dev_model_deployment]\n"
        "          targetLabel: llmops_model_deployment"
    ) in monitor
