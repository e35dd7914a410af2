"""ModelDeployment -> its children: config, Deployment, Service, PodDisruptionBudget and an
autoscaler (HorizontalPodAutoscaler or KEDA ScaledObject).

The Deployment runs the built-in server or, with runtime vllm, vLLM's (builders/vllm.py);
the autoscalers query each runtime's own metric names for the same signals.

The autoscaler targets the ModelDeployment's own scale subresource, so spec.replicas stays the
single source of truth and the controller copies it to the Deployment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmops import config
from llmops.api import workload
from llmops.api.common import PretrainedModel, S3Location
from llmops.api.modeldeployment import (
    Autoscaling,
    EvaluationGate,
    ModelDeployment,
    ScalingRules,
)
from llmops.api.workload import (
    ADAPTERS_CONFIG_DIR,
    ADAPTERS_DIR,
    ADAPTERS_FILE,
    AUTH_DIR,
    CONFIG_DIR,
    MODEL_DIR,
    MODEL_URI_ANNOTATION,
    SERVING_CONFIG_FILE,
    TERMINATION_LOG,
    AdapterEntry,
    Env,
    ServingMetric,
    VllmMetric,
    server_command,
)
from llmops.builders import pods, pretrained, storage, vllm
from llmops.builders.common import child_labels, child_metadata, child_name
from llmops.builders.common import config_map as common_config_map

COMPONENT = "serving"
CONFIG_FILE = SERVING_CONFIG_FILE
# Loading weights can take minutes; the startup probe allows for it before liveness counts.
STARTUP_SECONDS = 600
PROBE_PERIOD = 5
# Metrics the servers export (llmops_trainer.serve), per replica, as KEDA queries them.
METRIC_QUERIES = {
    "in-flight-requests": ServingMetric.REQUESTS_RUNNING,
    "queue-depth": ServingMetric.REQUESTS_WAITING,
    "tokens-per-second": f"rate({ServingMetric.GENERATION_TOKENS}_total[1m])",
}
# The same signals under vLLM's names (runtime vllm).
VLLM_METRIC_QUERIES = {
    "in-flight-requests": VllmMetric.REQUESTS_RUNNING,
    "queue-depth": VllmMetric.REQUESTS_WAITING,
    "tokens-per-second": f"rate({VllmMetric.GENERATION_TOKENS}_total[1m])",
}
# What the HPA asks the custom metrics API for, per pod. The HPA averages the values as they
# come, so the token counter is asked for as its per-second rate, a series Prometheus does not
# have: the prometheus-adapter rules in helm/llmops/prometheus-adapter-values.yaml serve each
# name below, the rate over the same window as the KEDA query.
HPA_METRICS = {
    "in-flight-requests": ServingMetric.REQUESTS_RUNNING,
    "queue-depth": ServingMetric.REQUESTS_WAITING,
    "tokens-per-second": ServingMetric.GENERATION_TOKENS_PER_SECOND,
}
VLLM_HPA_METRICS = {
    "in-flight-requests": VllmMetric.HPA_REQUESTS_RUNNING,
    "queue-depth": VllmMetric.HPA_REQUESTS_WAITING,
    "tokens-per-second": VllmMetric.HPA_GENERATION_TOKENS_PER_SECOND,
}


def metric_queries(md: ModelDeployment) -> dict[str, str]:
    """PromQL of each autoscaling metric for the deployment's runtime (KEDA)."""
    return VLLM_METRIC_QUERIES if md.spec.runtime == "vllm" else METRIC_QUERIES


def hpa_metrics(md: ModelDeployment) -> dict[str, str]:
    """Custom metrics API name of each autoscaling metric for the deployment's runtime."""
    return VLLM_HPA_METRICS if md.spec.runtime == "vllm" else HPA_METRICS


def selector_labels(body: Mapping[str, Any]) -> dict[str, str]:
    labels = child_labels(body, COMPONENT, "server")
    return {
        k: labels[k]
        for k in ("app.kubernetes.io/instance", "llmops.dev/model-deployment", "llmops.dev/role")
    }


def selector_string(body: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(body).items()))


def served_name(md: ModelDeployment) -> str:
    return md.spec.model.served_name or md.metadata.name


def url(md: ModelDeployment, namespace: str) -> str:
    return f"http://{md.metadata.name}.{namespace}.svc:{md.spec.server.port}/v1"


def config_map(body: Mapping[str, Any]) -> dict[str, Any]:
    return common_config_map(body, CONFIG_FILE, COMPONENT)


# Where an s3:// model is downloaded to, in the pod's scratch space.
SCRATCH_MODEL_DIR = "/tmp/llmops-model"


def _model_volume(
    md: ModelDeployment, model_uri: str, s3: S3Location | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str, list[dict[str, Any]]]:
    """Volumes, mounts, the model folder inside the container and the init containers: a
    claim is mounted read-only; an s3:// model is fetched into scratch by the model
    initializer before the server starts (`s3`: the bucket's endpoint and credentials)."""
    if not model_uri.startswith("s3://"):
        volumes, mounts, path = storage.read_only_volume("model", model_uri, MODEL_DIR)
        assert path is not None
        return volumes, mounts, path, []
    source = PretrainedModel(
        uri=model_uri,
        endpoint=s3.endpoint if s3 else None,
        credentials_secret=s3.credentials_secret if s3 else None,
    )
    fetch = pretrained.model_input(
        source,
        target=SCRATCH_MODEL_DIR,
        shared=False,
        # The fetcher is llmops' own program: a vLLM image (resources.image) lacks it.
        resources=md.spec.resources
        if md.spec.runtime == "builtin"
        else md.spec.resources.model_copy(update={"image": None}),
        extra_mounts=[],
        any_model=True,
    )
    return [], [], SCRATCH_MODEL_DIR, [fetch.init_container]


@dataclass(frozen=True)
class ServedAdapter:
    """A LoRA adapter resolved to a folder: served as model `name`."""

    name: str
    uri: str
    rank: int | None = None  # known when it comes from a TrainingRun's spec
    source: str | None = None  # what the status calls it (run/checkpoint); None: the uri


def _adapter_volumes(
    adapters: Sequence[ServedAdapter],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[tuple[str, str]]]:
    """Read-only volumes and mounts of the adapters, and (name, folder in the container).
    One volume per claim, whatever the folders inside it: a new version of an adapter (a
    newer checkpoint of the same run) changes the folder only, not the pod template."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    folders: list[tuple[str, str]] = []
    claims: dict[str, str] = {}  # claim -> its mount path
    for adapter in adapters:
        if adapter.uri.startswith("s3://"):
            raise ValueError(f"adapter {adapter.name}: serving from s3:// is not supported yet")
        if adapter.uri.startswith("/"):
            folders.append((adapter.name, adapter.uri))
            continue
        _, claim, path = storage.parse_uri(adapter.uri)
        if claim not in claims:
            index = len(claims)
            found = storage.read_only_volume(
                f"adapter-{index}", f"pvc://{claim}", f"{ADAPTERS_DIR}/{index}"
            )
            volumes += found[0]
            mounts += found[1]
            claims[claim] = f"{ADAPTERS_DIR}/{index}"
        folders.append((adapter.name, f"{claims[claim]}/{path}".rstrip("/")))
    return volumes, mounts, folders


def adapters_config_map(
    body: Mapping[str, Any], adapters: Sequence[ServedAdapter]
) -> dict[str, Any]:
    """`<name>-adapters`: the adapters the built-in server is to serve (AdapterEntry records),
    a file it reads again every few seconds, so a new version rolls without a restart."""
    _, _, folders = _adapter_volumes(adapters)
    entries = [
        AdapterEntry(name=name, path=path, source=adapter.source or adapter.uri).to_dict()
        for adapter, (name, path) in zip(adapters, folders, strict=True)
    ]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(body, "adapters", COMPONENT),
        "data": {ADAPTERS_FILE: json.dumps(entries, indent=2)},
    }


def _builtin_server(
    md: ModelDeployment,
    model_dir: str,
    mounts: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    adapters: Sequence[ServedAdapter],
    adapter_folders: list[tuple[str, str]],
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The built-in server's container fields, mounts and volumes (besides scratch and model)."""
    spec = md.spec
    env = [
        {"name": Env.MODEL_DIR, "value": model_dir},
        {"name": "HOME", "value": "/tmp"},
    ]
    adapter_volumes: list[dict[str, Any]] = []
    adapter_mounts: list[dict[str, Any]] = []
    if md.spec.adapters:
        # Which folders to serve comes from a ConfigMap (adapters_config_map), not the pod
        # template: the kubelet updates the mounted file in place, the server reads it again.
        env.append({"name": Env.ADAPTERS_FILE, "value": f"{ADAPTERS_CONFIG_DIR}/{ADAPTERS_FILE}"})
        adapter_volumes = [
            {
                "name": "adapters-config",
                "configMap": {"name": child_name(md.metadata.name, "adapters")},
            }
        ]
        adapter_mounts = [
            {"name": "adapters-config", "mountPath": ADAPTERS_CONFIG_DIR, "readOnly": True}
        ]
    auth_volumes: list[dict[str, Any]] = []
    auth_mounts: list[dict[str, Any]] = []
    secret = spec.server.auth_token_secret
    if secret is not None:
        # Mounted as a file, never an env var: env values show up in `kubectl describe`.
        auth_volumes = [
            {
                "name": "auth",
                "secret": {
                    "secretName": secret.name,
                    "items": [{"key": secret.key, "path": "token"}],
                },
            }
        ]
        auth_mounts = [{"name": "auth", "mountPath": AUTH_DIR, "readOnly": True}]
        env.append({"name": Env.AUTH_TOKEN_FILE, "value": f"{AUTH_DIR}/token"})
    env.append({"name": Env.TERMINATION_LOG, "value": TERMINATION_LOG})
    http_get = {"port": "http"}
    fields = {
        "image": pods.trainer_image(spec.resources),
        "command": server_command(),
        "env": env,
        "startupProbe": {
            "httpGet": {**http_get, "path": "/healthz"},
            "periodSeconds": PROBE_PERIOD,
            "failureThreshold": STARTUP_SECONDS // PROBE_PERIOD,
        },
        "readinessProbe": {
            "httpGet": {**http_get, "path": "/readyz"},
            "periodSeconds": PROBE_PERIOD,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {**http_get, "path": "/healthz"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
    }
    config = "config"
    return (
        fields,
        [
            {"name": config, "mountPath": CONFIG_DIR, "readOnly": True},
            *mounts,
            *adapter_mounts,
            *auth_mounts,
        ],
        [
            {"name": config, "configMap": {"name": child_name(md.metadata.name, "config")}},
            *volumes,
            *adapter_volumes,
            *auth_volumes,
        ],
    )


def _vllm_server(
    md: ModelDeployment,
    model_dir: str,
    mounts: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    adapters: Sequence[ServedAdapter],
    adapter_folders: list[tuple[str, str]],
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """vLLM's container fields, mounts and volumes (besides scratch and model)."""
    home_volumes, home_mounts = vllm.home_volume()
    fields = vllm.container_fields(md, served_name(md), model_dir)
    if adapter_folders:
        # An adapter given by folder has a rank the operator cannot see: leave room for one.
        rank = max(a.rank or vllm.DEFAULT_LORA_RANK for a in adapters)
        fields["args"] += vllm.lora_args(adapter_folders, rank)
    return (
        fields,
        [*mounts, *home_mounts],
        [*volumes, *home_volumes],
    )


def deployment(
    body: Mapping[str, Any],
    md: ModelDeployment,
    replicas: int,
    model_uri: str,
    adapters: Sequence[ServedAdapter] = (),
    s3: S3Location | None = None,
) -> dict[str, Any]:
    """The serving Deployment. Either runtime yields the same Deployment (name, selector,
    labels, strategy), so switching runtime is a rolling update of its pod template. `s3`
    says how to reach the bucket of an s3:// model (a TrainingRun's checkpoint storage)."""
    spec = md.spec
    model_volumes, model_mounts, model_dir, init_containers = _model_volume(md, model_uri, s3)
    adapter_volumes, adapter_mounts, adapter_folders = _adapter_volumes(adapters)
    scratch_volumes, scratch_mounts = pods.scratch_volumes()
    server = _vllm_server if spec.runtime == "vllm" else _builtin_server
    fields, mounts, volumes = server(
        md,
        model_dir,
        [*scratch_mounts, *model_mounts, *adapter_mounts],
        [*scratch_volumes, *model_volumes, *adapter_volumes],
        adapters,
        adapter_folders,
    )
    labels = {**child_labels(body, COMPONENT, "server"), **selector_labels(body)}
    rollout: dict[str, Any] = {"type": spec.rollout.strategy}
    if spec.rollout.strategy == "RollingUpdate":
        rollout["rollingUpdate"] = {
            "maxSurge": _int_or_percent(spec.rollout.max_surge or "25%"),
            "maxUnavailable": _int_or_percent(spec.rollout.max_unavailable or "25%"),
        }
    container = {
        "name": "server",
        **fields,
        "ports": [{"name": "http", "containerPort": spec.server.port}],
        # Endpoints drop the pod before SIGTERM lands; the server then finishes in-flight work.
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        "resources": pods.container_resources(spec.resources, spec.resources.gpus),
        "securityContext": pods.container_security_context(),
        "volumeMounts": mounts,
        # The built-in server leaves a FailureReport there; other runtimes' log tail stands in.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(body, "server", COMPONENT),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(body)},
            "strategy": rollout,
            "template": {
                # A new model changes this annotation, which rolls the Deployment.
                "metadata": {"labels": labels, "annotations": {MODEL_URI_ANNOTATION: model_uri}},
                "spec": {
                    "securityContext": pods.pod_security_context(),
                    "terminationGracePeriodSeconds": 60,
                    **({"initContainers": init_containers} if init_containers else {}),
                    "containers": [container],
                    "volumes": volumes,
                    **pods.scheduling_fields(spec.scheduling),
                },
            },
        },
    }


def _int_or_percent(value: str) -> int | str:
    return value if value.endswith("%") else int(value)


def service(body: Mapping[str, Any], md: ModelDeployment) -> dict[str, Any]:
    metadata = child_metadata(body, "server", COMPONENT)
    metadata["name"] = md.metadata.name  # clients use the resource's own name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "selector": selector_labels(body),
            "ports": [
                {"name": "http", "port": md.spec.server.port, "targetPort": "http"},
                # Same listener; a named port for ServiceMonitors.
                {"name": "metrics", "port": workload.METRICS_PORT, "targetPort": "http"},
            ],
        },
    }


def disruption_budget(body: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(body, "server", COMPONENT),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(body)}},
    }


def _scale_target(body: Mapping[str, Any]) -> dict[str, str]:
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": body["metadata"]["name"],
    }


def _behavior(rules: ScalingRules | None) -> dict[str, Any] | None:
    if rules is None:
        return None
    out: dict[str, Any] = {"selectPolicy": rules.select_policy}
    if rules.stabilization_window_seconds is not None:
        out["stabilizationWindowSeconds"] = rules.stabilization_window_seconds
    if rules.policies:
        out["policies"] = [p.model_dump(by_alias=True) for p in rules.policies]
    return out


def autoscaler(body: Mapping[str, Any], md: ModelDeployment) -> dict[str, Any] | None:
    scaling = md.spec.autoscaling
    if scaling is None:
        return None
    if scaling.engine == "keda":
        return _scaled_object(body, md, scaling)
    if scaling.metric == "cpu":
        metric: dict[str, Any] = {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": int(scaling.target)},
            },
        }
    else:
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": hpa_metrics(md)[scaling.metric]},
                "target": {"type": "AverageValue", "averageValue": _quantity(scaling.target)},
            },
        }
    spec: dict[str, Any] = {
        "scaleTargetRef": _scale_target(body),
        "minReplicas": scaling.min_replicas,
        "maxReplicas": scaling.max_replicas,
        "metrics": [metric],
    }
    behavior = {
        k: v
        for k, v in (
            ("scaleUp", _behavior(scaling.scale_up)),
            ("scaleDown", _behavior(scaling.scale_down)),
        )
        if v
    }
    if behavior:
        spec["behavior"] = behavior
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": child_metadata(body, "autoscaler", COMPONENT),
        "spec": spec,
    }


def _scaled_object(
    body: Mapping[str, Any], md: ModelDeployment, scaling: Autoscaling
) -> dict[str, Any]:
    namespace = body["metadata"]["namespace"]
    selector = f'namespace="{namespace}",llmops_model_deployment="{md.metadata.name}"'
    if scaling.metric == "cpu":
        trigger: dict[str, Any] = {
            "type": "cpu",
            "metricType": "Utilization",
            "metadata": {"value": str(int(scaling.target))},
        }
    else:
        series = metric_queries(md)[scaling.metric]
        query = (
            f"sum({series.replace('[1m]', '{' + selector + '}[1m]')})"
            if series.startswith("rate(")
            else f"sum({series}{{{selector}}})"
        )
        trigger = {
            "type": "prometheus",
            "metadata": {
                "serverAddress": scaling.prometheus_address or config.current().prometheus_url,
                "query": query,
                "threshold": _quantity(scaling.target),
                # One request wakes a deployment scaled to zero.
                "activationThreshold": "0",
            },
        }
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": child_metadata(body, "autoscaler", COMPONENT),
        "spec": {
            "scaleTargetRef": _scale_target(body),
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "triggers": [trigger],
        },
    }


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{int(value * 1000)}m"


def gate_score(
    gate: EvaluationGate, evaluation: Mapping[str, Any] | None
) -> tuple[float | None, bool, str]:
    """(value, higher is better, what it is) of the gate's metric in a TrainingRun's
    status.finalEvaluation: a test-split metric, or a benchmark's score."""
    if gate.benchmark is None:
        value = (evaluation or {}).get(gate.metric)
        return value, gate.metric not in ("loss", "perplexity"), f"test {gate.metric}"
    scores = (evaluation or {}).get("benchmarks") or []
    score = next((b for b in scores if b.get("name") == gate.benchmark), None) or {}
    what = f"benchmark {gate.benchmark} ({score.get('metric', 'score')})"
    return score.get("value"), bool(score.get("higherIsBetter", True)), what


def gate_verdict(
    gate: EvaluationGate,
    candidate: Mapping[str, Any] | None,
    served: Mapping[str, Any] | None,
) -> str | None:
    """Why the candidate model must not replace the served one, or None when it may. The
    served model's evaluation is the baseline; a model served without one (e.g. before the
    gate was set) lets any evaluated candidate pass that reaches the threshold."""
    value, higher_is_better, what = gate_score(gate, candidate)
    if value is None:
        if gate.benchmark is not None and candidate:
            return (
                f"its final evaluation has no benchmark {gate.benchmark!r} (is it in the "
                "TrainingRun's spec.evaluation.benchmarks?)"
            )
        missing = f"benchmark {gate.benchmark}" if gate.benchmark else "final evaluation"
        if gate.benchmark is None:
            missing += f" ({gate.metric})"
        return f"no {missing} yet; it rolls out once training has finished"
    if gate.threshold is not None:
        short = value < gate.threshold if higher_is_better else value > gate.threshold
        if short:
            bound = "at least" if higher_is_better else "at most"
            return f"{what} {value:.4g} misses the threshold ({bound} {gate.threshold:g})"
    baseline, _, _ = gate_score(gate, served)
    if baseline is None:
        return None
    worse_by = (baseline - value) if higher_is_better else (value - baseline)
    if worse_by > gate.max_regression * abs(baseline):
        return (
            f"{what} {value:.4g} is worse than the served model's {baseline:.4g} by more "
            f"than maxRegression={gate.max_regression:g}"
        )
    return None
