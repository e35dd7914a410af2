"""ModelDeployment `runtime: vllm`: the API rules, the serving container the builder makes
(checked against the flags, metrics and variables of the pinned vLLM release, read from its
wheel into vllm_interface.txt) and the autoscalers' metric names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import ValidationError
from vllm_interface import FIXTURE, load, series

from llmops.api.modeldeployment import ModelDeployment, ModelDeploymentSpec, VllmSettings
from llmops.api.workload import VllmMetric
from llmops.builders import modeldeployment as build
from llmops.builders import vllm

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
VLLM = load()


def body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "llama", "namespace": "ml", "uid": "u1", "generation": 1},
        "spec": {
            "model": {"uri": "pvc://models/llama/final"},
            "runtime": "vllm",
            "resources": {"gpus": 2},
            **spec,
        },
    }


def deployment(doc: dict[str, Any]) -> dict[str, Any]:
    return build.deployment(doc, ModelDeployment.model_validate(doc), 1, doc_uri(doc))


def doc_uri(doc: dict[str, Any]) -> str:
    return str(doc["spec"]["model"].get("uri") or "pvc://models/llama/final")


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (found,) = deployment(doc)["spec"]["template"]["spec"]["containers"]
    return dict(found)


FULL = body(
    model={"uri": "pvc://models/llama/final", "servedName": "llama-3-8b-chat"},
    server={"port": 8080, "authTokenSecret": {"name": "api-token", "key": "token"}},
    vllm={"maxModelLen": 8192, "dtype": "bfloat16", "gpuMemoryUtilization": 0.85},
    resources={"gpus": 4, "cpu": "8", "memory": "64Gi"},
)

# -- API -------------------------------------------------------------------------------------


def test_builtin_is_the_default_and_vllm_settings_default_as_documented() -> None:
    spec = ModelDeploymentSpec.model_validate({"model": {"uri": "/m"}})
    assert spec.runtime == "builtin" and spec.vllm is None
    settings = VllmSettings()
    assert (settings.dtype, settings.gpu_memory_utilization, settings.max_model_len) == (
        "auto",
        0.9,
        None,
    )


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"runtime": "builtin", "vllm": {"dtype": "bfloat16"}}, "vllm"),
        ({"resources": {"gpus": 0}}, "resources.gpus"),
        ({"vllm": {"extraArgs": ["--enforce-eager"]}}, "extraArgs"),
        ({"vllm": {"gpuMemoryUtilization": 0}}, "gpuMemoryUtilization"),
        ({"vllm": {"gpuMemoryUtilization": 1.01}}, "gpuMemoryUtilization"),
        ({"vllm": {"dtype": "half"}}, "dtype"),
        ({"vllm": {"maxModelLen": 0}}, "maxModelLen"),
        ({"model": {"trainingRun": {"name": "r", "policy": "best"}}}, "trainingRun.policy"),
        (
            {"model": {"trainingRun": {"name": "r", "policy": "pinned", "checkpoint": "step-9"}}},
            "trainingRun.policy",
        ),
    ],
)
def test_invalid_vllm_specs_are_rejected_naming_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        ModelDeployment.model_validate(body(**spec))
    assert field in str(raised.value)


def test_valid_vllm_specs() -> None:
    ModelDeployment.model_validate(FULL)
    ModelDeployment.model_validate(body(vllm={"gpuMemoryUtilization": 1}))
    ModelDeployment.model_validate(body(model={"trainingRun": {"name": "r"}}))  # policy latest
    ModelDeployment.model_validate(body(model={"trainingSchedule": {"name": "s"}}))


def test_the_crd_carries_the_rules_with_the_field_they_name() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "llmops.dev_modeldeployments.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    paths = {rule["fieldPath"] for rule in spec["x-kubernetes-validations"]}
    assert {".vllm", ".resources.gpus", ".model.trainingRun.policy"} <= paths
    settings = spec["properties"]["vllm"]
    assert "extraArgs" not in settings["properties"]
    assert settings["properties"]["gpuMemoryUtilization"]["exclusiveMinimum"] is True
    assert settings["properties"]["gpuMemoryUtilization"]["maximum"] == 1


# -- the container ---------------------------------------------------------------------------


def test_vllm_serves_the_model_folder_with_flags_from_the_spec() -> None:
    found = container(FULL)
    assert found["image"] == vllm.DEFAULT_IMAGE
    assert found["command"] == ["vllm", "serve"]
    assert found["args"] == [
        "/model/llama/final",
        "--served-model-name",
        "llama-3-8b-chat",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--tensor-parallel-size",
        "4",
        "--dtype",
        "bfloat16",
        "--gpu-memory-utilization",
        "0.85",
        "--max-model-len",
        "8192",
    ]
    assert found["ports"] == [{"name": "http", "containerPort": 8080}]


def test_defaults_serve_under_the_resource_name_with_the_models_own_length() -> None:
    args = container(body())["args"]
    assert args[args.index("--served-model-name") + 1] == "llama"
    assert args[args.index("--dtype") + 1] == "auto"
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.9"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--port") + 1] == "8000"
    assert "--max-model-len" not in args


def test_every_flag_is_one_the_pinned_vllm_accepts() -> None:
    assert VLLM.version == vllm.VLLM_VERSION, f"regenerate {FIXTURE.name} for the new pin"
    args = container(FULL)["args"]
    assert not args[0].startswith("-") and VLLM.positionals == {"model_tag"}
    flags = [a for a in args if a.startswith("-")]
    assert len(flags) == 7
    unknown = set(flags) - VLLM.flags
    assert not unknown, f"vLLM {VLLM.version} has no {sorted(unknown)}"
    assert "--api-key" in VLLM.flags and "--api-key" not in flags  # the key comes by env
    dtypes = set(get_args(VllmSettings.model_fields["dtype"].annotation))
    assert dtypes <= VLLM.dtypes


def test_the_api_key_comes_from_the_secret_by_reference() -> None:
    found = container(FULL)
    (key,) = [e for e in found["env"] if e["name"] == vllm.API_KEY_ENV]
    assert key == {
        "name": "VLLM_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "api-token", "key": "token"}},
    }
    assert vllm.API_KEY_ENV in VLLM.env
    assert "api-token" not in str(found["args"])
    assert all("valueFrom" not in e for e in found["env"] if e["name"] != vllm.API_KEY_ENV)
    # Without a Secret, no key: the API is open, as with the built-in server.
    assert all(e["name"] != vllm.API_KEY_ENV for e in container(body())["env"])


def test_vllm_variables_are_ones_the_pinned_vllm_reads() -> None:
    names = {e["name"] for e in container(FULL)["env"]}
    ours = {n for n in names if n.startswith("VLLM_")}
    assert ours >= {"VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT", "VLLM_NO_USAGE_STATS", "VLLM_API_KEY"}
    assert not ours - VLLM.env, sorted(ours - VLLM.env)


def test_gpus_come_from_resources() -> None:
    resources = container(FULL)["resources"]
    assert resources["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "4"}
    assert resources["requests"] == resources["limits"]


def test_probes_use_health_and_allow_for_loading_the_model() -> None:
    found = container(FULL)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert found[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = found["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800


def test_the_pod_stays_restricted_with_writable_caches_on_empty_dirs() -> None:
    manifest = deployment(FULL)
    pod = manifest["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (found,) = pod["containers"]
    assert found["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert "hostPath" not in str(pod["volumes"]) and "privileged" not in str(pod)
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [
        m["mountPath"]
        for m in found["volumeMounts"]
        if "emptyDir" in volumes[m["name"]] and not m.get("readOnly")
    ]
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    assert "/dev/shm" in writable
    for entry in found["env"]:
        if entry["name"] in ("HOME", "HF_HOME") or entry["name"].endswith(("_DIR", "_ROOT")):
            path = entry["value"]
            assert any(path == w or path.startswith(w + "/") for w in writable), entry


def test_both_runtimes_mount_the_model_alike_and_share_the_deployment() -> None:
    builtin_doc = body(runtime="builtin")
    vllm_manifest, builtin_manifest = deployment(FULL), deployment(builtin_doc)

    def model_parts(manifest: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        pod = manifest["spec"]["template"]["spec"]
        (found,) = pod["containers"]
        return (
            [v for v in pod["volumes"] if v["name"] == "model"],
            [m for m in found["volumeMounts"] if m["name"] == "model"],
        )

    assert model_parts(vllm_manifest) == model_parts(builtin_manifest)
    assert model_parts(vllm_manifest)[0]  # the claim is mounted
    for key in ("metadata",):
        assert vllm_manifest[key] == builtin_manifest[key]
    for key in ("selector", "strategy"):
        assert vllm_manifest["spec"][key] == builtin_manifest["spec"][key]
    assert (
        vllm_manifest["spec"]["template"]["metadata"]
        == builtin_manifest["spec"]["template"]["metadata"]
    )
    (builtin_container,) = builtin_manifest["spec"]["template"]["spec"]["containers"]
    assert builtin_container["command"][:3] == ["python", "-m", "llmops_trainer.serve"]


def test_metrics_are_scraped_from_the_api_port() -> None:
    """The Service's metrics port and the chart's PodMonitor point at the `http` port, where
    vLLM serves /metrics beside the API."""
    doc = FULL
    service = build.service(doc, ModelDeployment.model_validate(doc))
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["metrics"]["targetPort"] == "http" and ports["http"]["port"] == 8080
    monitor = (ROOT / "helm" / "llmops" / "templates" / "podmonitor.yaml").read_text()
    assert "- port: http\n      path: /metrics" in monitor


def test_the_image_is_pinned_and_configurable() -> None:
    from llmops import config

    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm.DEFAULT_IMAGE)
    config.configure(config.OperatorConfig())
    assert container(FULL)["image"] == vllm.DEFAULT_IMAGE
    chart = {vllm.IMAGE_ENV: "registry.local/vllm-openai:v0.33.0"}
    config.configure(config.OperatorConfig.from_env(chart))
    try:
        assert container(FULL)["image"] == "registry.local/vllm-openai:v0.33.0"
    finally:
        config.configure(config.OperatorConfig())
    own = body(resources={"gpus": 1, "image": "registry.local/vllm-custom:1"})
    assert container(own)["image"] == "registry.local/vllm-custom:1"


def test_one_pin_everywhere() -> None:
    """The chart's image, the `vllm` extra and the flag list name the same release."""
    values = yaml.safe_load((ROOT / "helm" / "llmops" / "values.yaml").read_text())
    assert values["vllmImage"] == vllm.DEFAULT_IMAGE
    template = (ROOT / "helm" / "llmops" / "templates" / "deployment.yaml").read_text()
    assert f"- name: {vllm.IMAGE_ENV}" in template
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert extras["optional-dependencies"]["vllm"] == [f"vllm=={vllm.VLLM_VERSION}"]
    assert VLLM.version == vllm.VLLM_VERSION


# -- autoscaling ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "hpa_name", "keda_query"),
    [
        (
            "in-flight-requests",
            "vllm_num_requests_running",
            'sum(vllm:num_requests_running{namespace="ml",llmops_model_deployment="llama"})',
        ),
        (
            "queue-depth",
            "vllm_num_requests_waiting",
            'sum(vllm:num_requests_waiting{namespace="ml",llmops_model_deployment="llama"})',
        ),
        (
            "tokens-per-second",
            "vllm_generation_tokens_per_second",
            "sum(rate(vllm:generation_tokens_total"
            '{namespace="ml",llmops_model_deployment="llama"}[1m]))',
        ),
    ],
)
def test_autoscalers_use_vllms_metrics(metric: str, hpa_name: str, keda_query: str) -> None:
    scaling = {"maxReplicas": 4, "metric": metric, "target": 10}
    doc = body(autoscaling=scaling)
    hpa = build.autoscaler(doc, ModelDeployment.model_validate(doc))
    assert hpa is not None and hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == hpa_name
    doc = body(autoscaling={**scaling, "engine": "keda", "minReplicas": 0})
    keda = build.autoscaler(doc, ModelDeployment.model_validate(doc))
    assert keda is not None and keda["spec"]["triggers"][0]["metadata"]["query"] == keda_query
    # The built-in runtime keeps its own names.
    doc["spec"].update(runtime="builtin", resources={})
    builtin = build.autoscaler(doc, ModelDeployment.model_validate(doc))
    assert builtin is not None and "vllm" not in builtin["spec"]["triggers"][0]["metadata"]["query"]


def test_vllm_metric_names_are_the_pinned_releases() -> None:
    expected = {
        VllmMetric.REQUESTS_RUNNING: "gauge",
        VllmMetric.REQUESTS_WAITING: "gauge",
        VllmMetric.KV_CACHE_USAGE: "gauge",
        VllmMetric.TIME_TO_FIRST_TOKEN: "histogram",
        VllmMetric.INTER_TOKEN_LATENCY: "histogram",
        VllmMetric.E2E_LATENCY: "histogram",
        VllmMetric.PROMPT_TOKENS: "counter",
        VllmMetric.GENERATION_TOKENS: "counter",
        VllmMetric.REQUEST_SUCCESS: "counter",
    }
    assert {name: VLLM.metrics.get(name) for name in expected} == expected
    exposed = series(VLLM)
    for query in build.VLLM_METRIC_QUERIES.values():
        name = re.sub(r"^rate\((.*)\[1m\]\)$", r"\1", query)
        assert name in exposed, query
