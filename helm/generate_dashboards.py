"""Writes the chart's Grafana dashboards (helm/llmops/dashboards/*.json) from code.

    python helm/generate_dashboards.py          # rewrite the JSON files
    python helm/generate_dashboards.py --check  # exit 1 if they are stale

Every panel queries metrics our components export: the operator's (llmops.metrics), the
trainer's rank 0 (llmops_training_*, label llmops_training_run) and the servers'
(llmops_serving_*, label llmops_model_deployment), or the pinned vLLM release's (vllm:*, the
same label, for ModelDeployments with runtime vllm); tests/unit/test_dashboards.py checks it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "llmops" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass
class Panel:
    title: str
    exprs: dict[str, str]  # legend -> PromQL
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    description: str = ""


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    variables: list[tuple[str, str, str]]  # (name, label, label_values query)
    rows: list[tuple[str, list[Panel]]] = field(default_factory=list)


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
    }


def render(dashboard: Dashboard) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row_title, row_panels in dashboard.rows:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        x = 0
        for panel in row_panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(
                {
                    "id": panel_id,
                    "type": panel.kind,
                    "title": panel.title,
                    "description": panel.description,
                    "datasource": DATASOURCE,
                    "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
                    "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
                    if panel.kind == "timeseries"
                    else {"reduceOptions": {"calcs": ["lastNotNull"]}},
                    "targets": [
                        {
                            "datasource": DATASOURCE,
                            "expr": expr,
                            "legendFormat": legend,
                            "refId": chr(ord("A") + index),
                        }
                        for index, (legend, expr) in enumerate(panel.exprs.items())
                    ],
                }
            )
            panel_id += 1
            x += panel.width
        y += 8
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["llmops"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                },
                *(_variable(*v) for v in dashboard.variables),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


TR = 'namespace=~"$namespace", llmops_training_run=~"$run"'
MD = 'namespace=~"$namespace", llmops_model_deployment=~"$deployment"'
BY_RUN = "{{namespace}}/{{llmops_training_run}}"
BY_MD = "{{namespace}}/{{llmops_model_deployment}}"


# Serving series of either runtime, for the variables (a deployment runs one or the other).
SERVING_SERIES = '{__name__=~"llmops_serving_model_info|vllm:num_requests_running"}'


def _quantiles(
    metric: str, by: str = "namespace, llmops_model_deployment", legend: str = ""
) -> dict[str, str]:
    return {
        f"{legend}p{q} {BY_MD}": (
            f"histogram_quantile(0.{q}, sum by ({by}, le) (rate({metric}_bucket{{{MD}}}[5m])))"
        )
        for q in ("50", "95", "99")
    }


def _both(ours: str, vllm: str) -> dict[str, str]:
    """p50/p95/p99 of a latency histogram of the built-in server and of vLLM."""
    return {**_quantiles(ours), **_quantiles(vllm, legend="vllm ")}


def dashboards() -> list[Dashboard]:
    training = Dashboard(
        "llmops-training",
        "llmops / Training",
        "TrainingRuns: loss curves, throughput, MFU, memory and restarts (rank 0 of each gang); "
        "Sweeps: trials by state, best objective.",
        [
            ("namespace", "Namespace", "label_values(llmops_training_step, namespace)"),
            ("run", "TrainingRun", "label_values(llmops_training_step, llmops_training_run)"),
        ],
        [
            (
                "Loss",
                [
                    Panel("Training loss", {BY_RUN: f"llmops_training_loss{{{TR}}}"}),
                    Panel(
                        "Validation loss and perplexity",
                        {
                            f"loss {BY_RUN}": f"llmops_training_validation_loss{{{TR}}}",
                            f"perplexity {BY_RUN}": (
                                f"llmops_training_validation_perplexity{{{TR}}}"
                            ),
                        },
                    ),
                    Panel("Gradient norm", {BY_RUN: f"llmops_training_grad_norm{{{TR}}}"}),
                    Panel("Learning rate", {BY_RUN: f"llmops_training_learning_rate{{{TR}}}"}),
                ],
            ),
            (
                "Throughput",
                [
                    Panel(
                        "Tokens per second",
                        {BY_RUN: f"llmops_training_tokens_per_second{{{TR}}}"},
                        unit="short",
                    ),
                    Panel(
                        "Model FLOPs utilization",
                        {BY_RUN: f"llmops_training_mfu{{{TR}}}"},
                        unit="percentunit",
                    ),
                    Panel(
                        "Progress",
                        {
                            BY_RUN: (
                                f"llmops_training_step{{{TR}}}"
                                f" / llmops_training_total_steps{{{TR}}}"
                            )
                        },
                        unit="percentunit",
                        kind="gauge",
                    ),
                    Panel(
                        "Tokens trained (rate)",
                        {BY_RUN: f"rate(llmops_training_tokens_total{{{TR}}}[5m])"},
                    ),
                ],
            ),
            (
                "Resources and restarts",
                [
                    Panel(
                        "Accelerator memory (rank 0, peak)",
                        {BY_RUN: f"llmops_training_accelerator_memory_bytes{{{TR}}}"},
                        unit="bytes",
                    ),
                    Panel(
                        "Checkpoint duration p95",
                        {
                            BY_RUN: "histogram_quantile(0.95, sum by (namespace, "
                            "llmops_training_run, le) (rate("
                            f"llmops_training_checkpoint_duration_seconds_bucket{{{TR}}}[1h])))"
                        },
                        unit="s",
                    ),
                    Panel(
                        "Gang restarts (operator)",
                        {
                            "restarts": (
                                'sum(increase(llmops_operator_restarts_triggered_total{kind="TrainingRun"}[1h]))'
                            )
                        },
                    ),
                    Panel(
                        "TrainingRuns by phase",
                        {
                            "{{phase}}": (
                                'sum by (phase) (llmops_operator_resources{kind="TrainingRun"})'
                            )
                        },
                    ),
                    Panel(
                        "Accelerator-hours per run (cost)",
                        {
                            "{{training_run_namespace}}/{{training_run}}": (
                                "llmops_trainingrun_accelerator_hours"
                            )
                        },
                    ),
                ],
            ),
            (
                "Sweeps",
                [
                    Panel(
                        "Sweep trials by state",
                        {
                            "{{sweep_namespace}}/{{llmops_sweep}} {{state}}": (
                                "sum by (sweep_namespace, llmops_sweep, state) "
                                "(llmops_operator_sweep_trials)"
                            )
                        },
                    ),
                    Panel(
                        "Best objective per sweep",
                        {
                            "{{sweep_namespace}}/{{llmops_sweep}} {{metric}}": (
                                "llmops_operator_sweep_best_objective"
                            )
                        },
                    ),
                    Panel(
                        "Trials created and pruned",
                        {
                            "created ({{algorithm}})": "sum by (algorithm) "
                            "(increase(llmops_operator_sweep_trials_created_total[1h]))",
                            "pruned ({{rule}})": "sum by (rule) "
                            "(increase(llmops_operator_sweep_trials_pruned_total[1h]))",
                        },
                    ),
                    Panel(
                        "Sweeps by phase",
                        {"{{phase}}": 'sum by (phase) (llmops_operator_resources{kind="Sweep"})'},
                    ),
                ],
            ),
        ],
    )
    serving = Dashboard(
        "llmops-serving",
        "llmops / Serving",
        "ModelDeployments: requests, time to first token, latency percentiles, queue, replicas; "
        "the built-in server's metrics and vLLM's (runtime vllm, legends starting with vllm).",
        [
            ("namespace", "Namespace", f"label_values({SERVING_SERIES}, namespace)"),
            (
                "deployment",
                "ModelDeployment",
                f"label_values({SERVING_SERIES}, llmops_model_deployment)",
            ),
        ],
        [
            (
                "Traffic",
                [
                    Panel(
                        "Requests per second by finish reason",
                        {
                            f"{{{{finish_reason}}}} {BY_MD}": (
                                "sum by (namespace, llmops_model_deployment, finish_reason) "
                                f"(rate(llmops_serving_requests_total{{{MD}}}[5m]))"
                            ),
                            f"vllm {{{{finished_reason}}}} {BY_MD}": (
                                "sum by (namespace, llmops_model_deployment, finished_reason) "
                                f"(rate(vllm:request_success_total{{{MD}}}[5m]))"
                            ),
                        },
                        unit="reqps",
                    ),
                    Panel(
                        "Rejected requests by reason",
                        {
                            f"{{{{reason}}}} {BY_MD}": (
                                "sum by (namespace, llmops_model_deployment, reason) "
                                f"(rate(llmops_serving_requests_rejected_total{{{MD}}}[5m]))"
                            ),
                            f"vllm {{{{reason}}}} {BY_MD}": (
                                "sum by (namespace, llmops_model_deployment, reason) "
                                f"(rate(vllm:admission_rejections_total{{{MD}}}[5m]))"
                            ),
                        },
                        unit="reqps",
                    ),
                    Panel(
                        "Tokens per second",
                        {
                            f"generated {BY_MD}": (
                                "sum by (namespace, llmops_model_deployment) "
                                f"(rate(llmops_serving_generation_tokens_total{{{MD}}}[5m]))"
                            ),
                            f"prompt {BY_MD}": (
                                "sum by (namespace, llmops_model_deployment) "
                                f"(rate(llmops_serving_prompt_tokens_total{{{MD}}}[5m]))"
                            ),
                            f"vllm generated {BY_MD}": (
                                "sum by (namespace, llmops_model_deployment) "
                                f"(rate(vllm:generation_tokens_total{{{MD}}}[5m]))"
                            ),
                            f"vllm prompt {BY_MD}": (
                                "sum by (namespace, llmops_model_deployment) "
                                f"(rate(vllm:prompt_tokens_total{{{MD}}}[5m]))"
                            ),
                        },
                    ),
                    Panel(
                        "Replicas serving",
                        {
                            BY_MD: "count by (namespace, llmops_model_deployment) "
                            f"(llmops_serving_model_info{{{MD}}})",
                            # One engine per vLLM pod: its scheduler gauge counts the replicas.
                            f"vllm {BY_MD}": "count by (namespace, llmops_model_deployment) "
                            f"(vllm:num_requests_running{{{MD}}})",
                        },
                    ),
                ],
            ),
            (
                "Latency",
                [
                    Panel(
                        "Time to first token",
                        _both(
                            "llmops_serving_time_to_first_token_seconds",
                            "vllm:time_to_first_token_seconds",
                        ),
                        unit="s",
                    ),
                    Panel(
                        "End-to-end request latency",
                        _both(
                            "llmops_serving_e2e_request_latency_seconds",
                            "vllm:e2e_request_latency_seconds",
                        ),
                        unit="s",
                    ),
                    Panel(
                        "Inter-token latency",
                        _both(
                            "llmops_serving_inter_token_latency_seconds",
                            "vllm:inter_token_latency_seconds",
                        ),
                        unit="s",
                    ),
                    Panel(
                        "Batch size p50",
                        {
                            BY_MD: "histogram_quantile(0.5, sum by (namespace, "
                            "llmops_model_deployment, le) "
                            f"(rate(llmops_serving_batch_size_bucket{{{MD}}}[5m])))"
                        },
                    ),
                ],
            ),
            (
                "Queue",
                [
                    Panel(
                        "Requests running and waiting",
                        {
                            f"running {BY_MD}": "sum by (namespace, llmops_model_deployment) "
                            f"(llmops_serving_requests_running{{{MD}}})",
                            f"waiting {BY_MD}": "sum by (namespace, llmops_model_deployment) "
                            f"(llmops_serving_requests_waiting{{{MD}}})",
                            f"vllm running {BY_MD}": "sum by (namespace, llmops_model_deployment) "
                            f"(vllm:num_requests_running{{{MD}}})",
                            f"vllm waiting {BY_MD}": "sum by (namespace, llmops_model_deployment) "
                            f"(vllm:num_requests_waiting{{{MD}}})",
                        },
                    ),
                    Panel(
                        "KV cache usage (vLLM)",
                        {
                            f"vllm max {BY_MD}": "max by (namespace, llmops_model_deployment) "
                            f"(vllm:kv_cache_usage_perc{{{MD}}})"
                        },
                        unit="percentunit",
                        description=(
                            "Fraction of the KV cache blocks in use, highest replica; near 1 "
                            "with requests waiting means the replicas are full."
                        ),
                    ),
                ],
            ),
        ],
    )
    data = Dashboard(
        "llmops-data",
        "llmops / Data",
        "Datasets: preprocessing runs by phase, jobs created, failures. Per-step document and "
        "drop counts are in each Dataset's status (`kubectl get ds -o yaml`).",
        [],
        [
            (
                "Datasets",
                [
                    Panel(
                        "Datasets by phase",
                        {"{{phase}}": 'sum by (phase) (llmops_operator_resources{kind="Dataset"})'},
                    ),
                    Panel(
                        "Preprocessing objects created",
                        {
                            "{{child_kind}}": "sum by (child_kind) (increase("
                            'llmops_operator_children_created_total{kind="Dataset"}[1h]))'
                        },
                    ),
                    Panel(
                        "Failed Datasets",
                        {
                            "failed": "sum(llmops_operator_resources"
                            '{kind="Dataset", phase="Failed"})'
                        },
                        kind="stat",
                    ),
                    Panel(
                        "Dataset reconcile errors",
                        {
                            "{{error}}": "sum by (error) (rate("
                            'llmops_operator_reconcile_errors_total{kind="Dataset"}[5m]))'
                        },
                    ),
                ],
            )
        ],
    )
    operator = Dashboard(
        "llmops-operator",
        "llmops / Operator",
        "The operator: up, reconcile latency and errors, resources by phase, memory.",
        [],
        [
            (
                "Health",
                [
                    Panel("Up", {"up": 'sum(up{job="llmops-operator"})'}, kind="stat", width=6),
                    Panel(
                        "Resident memory",
                        {"rss": 'process_resident_memory_bytes{job="llmops-operator"}'},
                        unit="bytes",
                        width=9,
                    ),
                    Panel(
                        "CPU",
                        {"cpu": 'rate(process_cpu_seconds_total{job="llmops-operator"}[5m])'},
                        unit="percentunit",
                        width=9,
                    ),
                ],
            ),
            (
                "Reconcile",
                [
                    Panel(
                        "Reconcile duration p50/p99",
                        {
                            f"p{q} {{{{kind}}}}": f"histogram_quantile(0.{q}, sum by (kind, le) "
                            "(rate(llmops_operator_reconcile_duration_seconds_bucket[5m])))"
                            for q in ("50", "99")
                        },
                        unit="s",
                    ),
                    Panel(
                        "Reconciles per second",
                        {
                            "{{kind}}": "sum by (kind) "
                            "(rate(llmops_operator_reconcile_duration_seconds_count[5m]))"
                        },
                        unit="ops",
                    ),
                    Panel(
                        "Reconcile errors",
                        {
                            "{{kind}} {{error}}": "sum by (kind, error) "
                            "(rate(llmops_operator_reconcile_errors_total[5m]))"
                        },
                        unit="ops",
                    ),
                    Panel(
                        "Children created",
                        {
                            "{{kind}} -> {{child_kind}}": "sum by (kind, child_kind) "
                            "(rate(llmops_operator_children_created_total[5m]))"
                        },
                        unit="ops",
                    ),
                    Panel(
                        "Resources by phase",
                        {"{{kind}} {{phase}}": "sum by (kind, phase) (llmops_operator_resources)"},
                        width=24,
                    ),
                ],
            ),
        ],
    )
    return [training, serving, data, operator]


def rendered() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"{d.uid.removeprefix('llmops-')}.json": json.dumps(render(d), indent=2) + "\n"
        for d in dashboards()
    }


def main(argv: list[str]) -> int:
    files = rendered()
    if "--check" in argv:
        stale = [
            name
            for name, text in files.items()
            if not (OUT / name).is_file() or (OUT / name).read_text() != text
        ]
        stale += [p.name for p in OUT.glob("*.json") if p.name not in files]
        if stale:
            print(f"stale dashboards: {', '.join(sorted(stale))}; run {sys.argv[0]}")
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
