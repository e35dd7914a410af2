"""The HPA of a ModelDeployment asks the custom metrics API for names that the chart's
prometheus-adapter rules serve, from series the server exports (the built-in server's, or
the pinned vLLM release's with runtime vllm), with KEDA's meaning."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from prometheus_client import CollectorRegistry
from vllm_interface import load, series

from llmops.api.modeldeployment import Autoscaling, ModelDeployment
from llmops.builders.modeldeployment import METRIC_QUERIES, VLLM_METRIC_QUERIES, autoscaler
from llmops_trainer.serve.metrics import ServingMetrics

pytestmark = pytest.mark.unit

VALUES = Path(__file__).resolve().parents[2] / "helm" / "llmops" / "prometheus-adapter-values.yaml"
REQUEST_METRICS = [m for m in get_args(Autoscaling.model_fields["metric"].annotation) if m != "cpu"]
RUNTIMES = ["builtin", "vllm"]
QUERIES = {"builtin": METRIC_QUERIES, "vllm": VLLM_METRIC_QUERIES}


def _rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = yaml.safe_load(VALUES.read_text())["rules"]["custom"]
    return rules


def _exported(runtime: str = "builtin") -> set[str]:
    if runtime == "vllm":
        return series(load())
    registry = CollectorRegistry()
    ServingMetrics(registry)
    return {sample.name for family in registry.collect() for sample in family.samples}


def _selects(rule: dict[str, Any], series: str) -> bool:
    """Whether the rule's seriesQuery (`{__name__=...,...}` or `name{...}`) picks the series."""
    query = rule["seriesQuery"]
    named = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", query)
    if named:
        return named.group(1) == series
    matcher = re.search(r'__name__(=~|=)"([^"]*)"', query)
    assert matcher, query
    op, value = matcher.groups()
    return series == value if op == "=" else re.fullmatch(value, series) is not None


def _served_as(rule: dict[str, Any], series: str) -> str:
    """The adapter's naming: `matches` on the series name, rewritten by `as` (Go's ${1})."""
    found = re.search(rule["name"]["matches"], series)
    assert found, (rule["name"], series)
    return re.sub(r"\$\{(\d+)\}", lambda m: found.group(int(m.group(1))), rule["name"]["as"])


def _hpa_metric(metric: str, runtime: str) -> str:
    body: dict[str, Any] = {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "md", "namespace": "ml", "uid": "u"},
        "spec": {
            "model": {"trainingRun": {"name": "r"}},
            "autoscaling": {"maxReplicas": 4, "metric": metric, "target": 100},
            "runtime": runtime,
            "resources": {"gpus": 1},
        },
    }
    hpa = autoscaler(body, ModelDeployment.model_validate(body))
    assert hpa is not None and hpa["kind"] == "HorizontalPodAutoscaler"
    (spec,) = hpa["spec"]["metrics"]
    assert spec["type"] == "Pods"
    name: str = spec["pods"]["metric"]["name"]
    return name


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("metric", REQUEST_METRICS)
def test_the_adapter_serves_what_the_hpa_asks_for(metric: str, runtime: str) -> None:
    asked = _hpa_metric(metric, runtime)
    assert ":" not in asked  # a custom metrics API name
    # KEDA's query names the exported series, bare or inside rate(...[window]).
    keda = re.fullmatch(r"(?:rate\()?([\w:]+)(\[\w+\]\))?", QUERIES[runtime][metric])
    assert keda, QUERIES[runtime][metric]
    series, window = keda.group(1), keda.group(2)
    assert series in _exported(runtime)
    serving = [r for r in _rules() if _selects(r, series) and _served_as(r, series) == asked]
    assert len(serving) == 1, f"no adapter rule serves {asked} from {series}"
    (rule,) = serving
    # Per pod, from the labels the chart's serving PodMonitor writes.
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    query = rule["metricsQuery"]
    if window:  # a counter: the HPA gets the same rate KEDA queries
        assert series.endswith("_total") and not asked.endswith("_total")
        assert f"rate(<<.Series>>{{<<.LabelMatchers>>}}{window[:-1]})" in query
    else:  # a gauge, as it is
        assert "rate(" not in query and "<<.Series>>{<<.LabelMatchers>>}" in query


def test_every_rule_selects_an_exported_series() -> None:
    exported = _exported("builtin") | _exported("vllm")
    for rule in _rules():
        assert any(_selects(rule, name) for name in exported), rule["seriesQuery"]
