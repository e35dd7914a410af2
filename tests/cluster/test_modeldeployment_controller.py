"""The ModelDeployment controller on the real control plane: serving objects, the scale
subresource, autoscalers, rollout to a new checkpoint, status."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubelet import (
    claim,
    condition,
    create,
    custom,
    get,
    install_stand_in_crd,
    mark_processed,
    small_dataset,
    wait_phase,
    wait_status,
)
from kubernetes import client
from kubernetes.client.rest import ApiException

from controlplane import wait_for

NAME = "chat"
GROUP, VERSION = "llmops.dev", "v1alpha1"


def model_deployment(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelDeployment",
        "metadata": {"name": NAME},
        "spec": {"model": {"uri": "pvc://models/gpt/final"}, "replicas": 2, **spec},
    }


def test_serving_objects_scale_subresource_and_status(
    api_client: client.ApiClient, operator: str, volumes
):
    namespace = operator
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    claim(api_client, namespace, "models")
    create(
        api_client,
        namespace,
        model_deployment(server={"authTokenSecret": {"name": "api-token", "key": "token"}}),
    )

    ready = wait_phase(api_client, namespace, "ModelDeployment", NAME, "Ready")
    status = ready["status"]
    assert (status["replicas"], status["readyReplicas"], status["updatedReplicas"]) == (2, 2, 2)
    assert status["url"] == f"http://{NAME}.{namespace}.svc:8000/v1"
    assert status["model"] == NAME and status["checkpoint"] == "pvc://models/gpt/final"
    assert condition(ready, "Available")["status"] == "True"
    assert condition(ready, "Degraded")["status"] == "False"

    deployment = apps.read_namespaced_deployment(f"{NAME}-server", namespace)
    container = deployment.spec.template.spec.containers[0]
    env = {e.name: e.value for e in container.env}
    assert env["LLMOPS_MODEL_DIR"] == "/model/gpt/final"
    assert env["LLMOPS_AUTH_TOKEN_FILE"] == "/var/run/llmops/auth/token"
    assert "api-token" not in str(container.env)  # the secret is a file, not an env value
    assert container.startup_probe.http_get.path == "/healthz"
    assert container.readiness_probe.http_get.path == "/readyz"
    assert container.lifecycle.pre_stop.sleep.seconds == 5
    assert deployment.spec.template.spec.security_context.run_as_non_root
    service = core.read_namespaced_service(NAME, namespace)
    assert {p.name for p in service.spec.ports} == {"http", "metrics"}
    pdb = client.PolicyV1Api(api_client).read_namespaced_pod_disruption_budget(
        f"{NAME}-server", namespace
    )
    assert pdb.spec.max_unavailable == 1

    # `kubectl scale modeldeployment chat --replicas=3` goes through the scale subresource.
    custom(api_client).patch_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, "modeldeployments", NAME, {"spec": {"replicas": 3}}
    )
    scaled = wait_status(
        api_client,
        namespace,
        "ModelDeployment",
        NAME,
        "3 replicas ready",
        readyReplicas=3,
        phase="Ready",
    )
    scale = custom(api_client).get_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, "modeldeployments", NAME
    )
    assert scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == scaled["status"]["selector"]
    pods = core.list_namespaced_pod(namespace, label_selector=scale["status"]["selector"])
    assert len(pods.items) == 3


def test_hpa_targets_the_scale_subresource_and_keda_replaces_it(
    api_client: client.ApiClient, operator: str, volumes, keda_crd: None
):
    namespace = operator
    claim(api_client, namespace, "models")
    autoscaling = {
        "minReplicas": 1,
        "maxReplicas": 5,
        "metric": "in-flight-requests",
        "target": 8,
        "scaleDown": {"stabilizationWindowSeconds": 120},
    }
    create(api_client, namespace, model_deployment(autoscaling=autoscaling))
    hpas = client.AutoscalingV2Api(api_client)
    wait_for("hpa", lambda: hpas.list_namespaced_horizontal_pod_autoscaler(namespace).items, 30)
    hpa = hpas.read_namespaced_horizontal_pod_autoscaler(f"{NAME}-autoscaler", namespace)
    assert (hpa.spec.scale_target_ref.kind, hpa.spec.scale_target_ref.name) == (
        "ModelDeployment",
        NAME,
    )
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (1, 5)
    (metric,) = hpa.spec.metrics
    assert metric.pods.metric.name == "llmops_serving_requests_running"
    assert metric.pods.target.average_value == "8"
    assert hpa.spec.behavior.scale_down.stabilization_window_seconds == 120

    # Scale to zero needs KEDA; the HPA goes away and a ScaledObject takes over.
    custom(api_client).patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "modeldeployments",
        NAME,
        {
            "spec": {
                "autoscaling": {
                    "engine": "keda",
                    "minReplicas": 0,
                    "prometheusAddress": "http://prometheus.monitoring:9090",
                }
            }
        },
    )

    def scaled_object() -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = custom(api_client).get_namespaced_custom_object(
                "keda.sh", "v1alpha1", namespace, "scaledobjects", f"{NAME}-autoscaler"
            )
        except ApiException:
            return None
        return found

    wait_for("ScaledObject", lambda: scaled_object() is not None, 30)
    wait_for(
        "hpa removed",
        lambda: not hpas.list_namespaced_horizontal_pod_autoscaler(namespace).items,
        30,
    )
    spec = scaled_object()["spec"]  # type: ignore[index]
    assert spec["scaleTargetRef"]["kind"] == "ModelDeployment"
    assert spec["minReplicaCount"] == 0
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["serverAddress"] == "http://prometheus.monitoring:9090"
    assert f'llmops_model_deployment="{NAME}"' in trigger["metadata"]["query"]


def test_policy_latest_rolls_to_the_new_checkpoint(
    api_client: client.ApiClient, operator: str, volumes
):
    namespace = operator
    apps = client.AppsV1Api(api_client)
    claim(api_client, namespace, "gpt-checkpoints")
    create(
        api_client,
        namespace,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingRun",
            "metadata": {"name": "gpt"},
            "spec": {"datasetRef": {"name": "absent"}, "hyperparameters": {"maxSteps": 10}},
        },
    )

    def checkpoint(step: int) -> None:
        info = {"name": f"step-{step}", "step": step, "uri": f"pvc://gpt-checkpoints/step-{step}"}
        custom(api_client).patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            "trainingruns",
            "gpt",
            {"status": {"checkpoints": {"latest": info}}},
        )

    create(
        api_client,
        namespace,
        model_deployment(model={"trainingRun": {"name": "gpt", "policy": "latest"}}, replicas=1),
    )
    pending = wait_phase(api_client, namespace, "ModelDeployment", NAME, "Pending")
    assert condition(pending, "Available")["reason"] == "WaitingForModel"

    checkpoint(100)
    wait_status(
        api_client,
        namespace,
        "ModelDeployment",
        NAME,
        "serving step 100",
        phase="Ready",
        checkpoint="gpt/step-100",
    )
    checkpoint(200)
    wait_status(
        api_client,
        namespace,
        "ModelDeployment",
        NAME,
        "serving step 200",
        phase="Ready",
        checkpoint="gpt/step-200",
    )
    deployment = apps.read_namespaced_deployment(f"{NAME}-server", namespace)
    assert deployment.spec.template.metadata.annotations["llmops.dev/model-uri"] == (
        "pvc://gpt-checkpoints/step-200"
    )
    env = {e.name: e.value for e in deployment.spec.template.spec.containers[0].env}
    assert env["LLMOPS_MODEL_DIR"] == "/model/step-200"
    replica_sets = apps.list_namespaced_replica_set(namespace).items
    assert len(replica_sets) == 2  # a rolling update happened


def test_an_adapter_follows_its_runs_checkpoints_without_rolling_the_deployment(
    api_client: client.ApiClient, operator: str, volumes
):
    """A LoRA run's newer checkpoint reaches the server through the adapters ConfigMap (the
    server reads it again); the pod template, and so the replicas, stay as they are."""
    namespace = operator
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    claim(api_client, namespace, "models")
    claim(api_client, namespace, "ft-checkpoints")
    create(
        api_client,
        namespace,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingRun",
            "metadata": {"name": "ft"},
            "spec": {
                "datasetRef": {"name": "absent"},
                "model": {"pretrained": {"uri": "pvc://models/llama"}},
                "adapter": {"rank": 16},
                "hyperparameters": {"maxSteps": 10},
            },
        },
    )

    def checkpoint(step: int) -> None:
        info = {"name": f"step-{step}", "step": step, "uri": f"pvc://ft-checkpoints/step-{step}"}
        custom(api_client).patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "trainingruns", "ft",
            {"status": {"checkpoints": {"latest": info}}},
        )  # fmt: skip

    adapters = [{"name": "support", "trainingRun": {"name": "ft"}, "policy": "latest"}]
    create(
        api_client,
        namespace,
        model_deployment(model={"uri": "pvc://models/llama"}, replicas=1, adapters=adapters),
    )
    waiting = wait_phase(api_client, namespace, "ModelDeployment", NAME, "Ready")
    assert condition(waiting, "AdaptersReady")["reason"] == "WaitingForAdapter"
    assert "no latest checkpoint yet" in condition(waiting, "AdaptersReady")["message"]

    def listed() -> list[dict[str, Any]]:
        config = core.read_namespaced_config_map(f"{NAME}-adapters", namespace)
        return list(json.loads(config.data["adapters.json"]))

    checkpoint(4)
    wait_for("step 4 listed", lambda: bool(listed()) and listed()[0]["source"] == "ft/step-4", 60)
    template = apps.read_namespaced_deployment(f"{NAME}-server", namespace).spec.template
    checkpoint(8)
    wait_for("step 8 listed", lambda: listed()[0]["source"] == "ft/step-8", 60)
    assert listed() == [
        {"name": "support", "path": "/adapters/0/step-8/adapter", "source": "ft/step-8"}
    ]
    served = wait_status(
        api_client, namespace, "ModelDeployment", NAME, "adapter at step 8",
        adapters=["support"],
    )  # fmt: skip
    assert served["status"]["servedAdapters"][0]["uri"] == "pvc://ft-checkpoints/step-8/adapter"
    assert condition(served, "AdaptersReady")["reason"] == "AdaptersServed"
    deployment = apps.read_namespaced_deployment(f"{NAME}-server", namespace)
    assert deployment.spec.template == template  # no rollout for a new adapter version
    env = {e.name: e.value for e in deployment.spec.template.spec.containers[0].env}
    assert env["LLMOPS_ADAPTERS_FILE"] == "/var/run/llmops/adapters/adapters.json"


@pytest.fixture
def keda_crd(api_client: client.ApiClient) -> None:
    """Stands in for an installed KEDA: its ScaledObject kind, schema left open."""
    install_stand_in_crd(api_client, "keda.sh", "v1alpha1", "ScaledObject")


def test_vllm_runtime_is_admitted_as_restricted_and_switches_back_to_builtin(
    api_client: client.ApiClient, operator: str, volumes
):
    """runtime vllm: vLLM's container (flags, API key by reference, GPUs, probes) in a
    namespace that enforces the `restricted` Pod Security Standard; switching back to the
    built-in server rolls the same Deployment."""
    namespace = operator
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    core.patch_namespace(
        namespace,
        {
            "metadata": {
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                }
            }
        },
    )
    core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "api-token"}, "stringData": {"token": "sk-test"}, "type": "Opaque"},
    )
    claim(api_client, namespace, "models")
    create(
        api_client,
        namespace,
        model_deployment(
            model={"uri": "pvc://models/llama/final", "servedName": "llama-chat"},
            replicas=1,
            runtime="vllm",
            vllm={"maxModelLen": 4096, "dtype": "bfloat16"},
            resources={"gpus": 2},
            server={"authTokenSecret": {"name": "api-token", "key": "token"}},
        ),
    )
    ready = wait_phase(api_client, namespace, "ModelDeployment", NAME, "Ready")
    assert ready["status"]["readyReplicas"] == 1
    assert ready["status"]["model"] == "llama-chat"

    deployment = apps.read_namespaced_deployment(f"{NAME}-server", namespace)
    uid = deployment.metadata.uid
    container = deployment.spec.template.spec.containers[0]
    assert container.image.startswith("vllm/vllm-openai:v")
    assert container.command == ["vllm", "serve"]
    args = container.args
    assert args[0] == "/model/llama/final"
    for flag, value in (
        ("--served-model-name", "llama-chat"),
        ("--tensor-parallel-size", "2"),
        ("--max-model-len", "4096"),
        ("--dtype", "bfloat16"),
        ("--port", "8000"),
        ("--host", "0.0.0.0"),
    ):
        assert args[args.index(flag) + 1] == value
    (key,) = [e for e in container.env if e.name == "VLLM_API_KEY"]
    assert key.value is None
    assert (key.value_from.secret_key_ref.name, key.value_from.secret_key_ref.key) == (
        "api-token",
        "token",
    )
    assert container.resources.limits["nvidia.com/gpu"] == "2"
    for probe in (container.startup_probe, container.readiness_probe, container.liveness_probe):
        assert probe.http_get.path == "/health"
    # The ReplicaSet's pod passed Pod Security admission (restricted) and is running.
    pods = core.list_namespaced_pod(namespace, label_selector=ready["status"]["selector"]).items
    assert len(pods) == 1 and pods[0].spec.containers[0].command == ["vllm", "serve"]

    custom(api_client).patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "modeldeployments",
        NAME,
        {"spec": {"runtime": "builtin", "vllm": None}},
    )

    def rolled_back() -> bool:
        current = apps.read_namespaced_deployment(f"{NAME}-server", namespace)
        command = current.spec.template.spec.containers[0].command
        return bool(command and command[:3] == ["python", "-m", "llmops_trainer.serve"])

    wait_for("the built-in server in the Deployment", rolled_back, 30)
    wait_status(
        api_client,
        namespace,
        "ModelDeployment",
        NAME,
        "rolled out to the built-in server",
        phase="Ready",
        updatedReplicas=1,
        readyReplicas=1,
    )
    deployment = apps.read_namespaced_deployment(f"{NAME}-server", namespace)
    assert deployment.metadata.uid == uid  # the same Deployment, updated in place
    container = deployment.spec.template.spec.containers[0]
    assert container.args is None
    assert not [e for e in container.env if e.name.startswith("VLLM_")]
    assert container.readiness_probe.http_get.path == "/readyz"
    assert {v.name for v in deployment.spec.template.spec.volumes} >= {"model", "auth", "config"}
    assert "vllm-home" not in {v.name for v in deployment.spec.template.spec.volumes}
    assert len(apps.list_namespaced_replica_set(namespace).items) == 2  # a rolling update

    def only_builtin_pods() -> bool:
        # The old ReplicaSet's pod goes once the new one is ready; wait for that, not race it.
        selector = ready["status"]["selector"]
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        running = [p for p in pods if p.metadata.deletion_timestamp is None]
        return bool(running) and all(p.spec.containers[0].command[0] == "python" for p in running)

    wait_for("only built-in server pods", only_builtin_pods, 60)


def test_a_server_that_cannot_start_says_why_in_degraded(
    api_client: client.ApiClient, operator: str, volumes
):
    """The server's FailureReport (its termination message) becomes the Degraded condition
    and a Warning event: `kubectl describe md` says why the pods crash-loop."""
    namespace = operator
    core = client.CoreV1Api(api_client)
    claim(api_client, namespace, "models")
    create(api_client, namespace, model_deployment(replicas=1))
    ready = wait_phase(api_client, namespace, "ModelDeployment", NAME, "Ready")
    (pod,) = core.list_namespaced_pod(namespace, label_selector=ready["status"]["selector"]).items

    report = {"stage": "serve", "reason": "ModelLoadFailed", "message": "no config.json in /model"}
    crashed = {
        "name": "server",
        "image": pod.spec.containers[0].image,
        "imageID": "",
        "ready": False,
        "restartCount": 3,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {
            "terminated": {
                "exitCode": 1,
                "reason": "Error",
                "message": json.dumps(report),
                "startedAt": "2026-01-01T00:00:00Z",
                "finishedAt": "2026-01-01T00:00:05Z",
            }
        },
    }
    core.patch_namespaced_pod_status(
        pod.metadata.name,
        namespace,
        {
            "status": {
                "conditions": [
                    {"type": "Ready", "status": "False"},
                    {"type": "ContainersReady", "status": "False"},
                ],
                "containerStatuses": [crashed],
            }
        },
    )

    def degraded() -> dict[str, Any]:
        found = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
            GROUP, VERSION, namespace, "modeldeployments", NAME
        )
        return condition(found, "Degraded") or {}

    wait_for("Degraded: ModelLoadFailed", lambda: degraded().get("reason") == "ModelLoadFailed", 60)
    assert degraded()["status"] == "True"
    assert "no config.json" in degraded()["message"]
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={NAME}")
    assert "ModelLoadFailed" in {e.reason for e in events.items}


def test_a_dataset_a_run_and_a_deployment_may_share_a_name(
    api_client: client.ApiClient, operator: str, volumes
):
    """examples/quickstart.yaml serves run stdlib-gpt as deployment stdlib-gpt. Each kind's
    ConfigMap has a name of its own: one would otherwise hold the name and the other be
    refused (InvalidChild) and never serve."""
    namespace = operator
    core = client.CoreV1Api(api_client)

    def owners() -> dict[str, list[str]]:
        return {
            c.metadata.name: [o.kind for o in c.metadata.owner_references or []]
            for c in core.list_namespaced_config_map(namespace).items
        }

    create(api_client, namespace, small_dataset(NAME))
    wait_for("the Dataset's ConfigMap", lambda: f"{NAME}-data-config" in owners(), 30)
    mark_processed(api_client, namespace, NAME)
    create(
        api_client,
        namespace,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingRun",
            "metadata": {"name": NAME},
            "spec": {
                "datasetRef": {"name": NAME},
                "model": {"numLayers": 2, "numHeads": 2, "hiddenSize": 64, "contextLength": 64},
                "hyperparameters": {"maxSteps": 100, "microBatchSize": 4},
                "resources": {"procsPerNode": 1, "cpu": "1", "memory": "1Gi"},
            },
        },
    )
    wait_for("the TrainingRun's ConfigMap", lambda: f"{NAME}-run-config" in owners(), 30)
    claim(api_client, namespace, "models")
    create(api_client, namespace, model_deployment(replicas=1))

    ready = wait_phase(api_client, namespace, "ModelDeployment", NAME, "Ready")
    assert (condition(ready, "InvalidChild") or {}).get("status") != "True", ready["status"]
    found = owners()
    assert found[f"{NAME}-config"] == ["ModelDeployment"]
    assert found[f"{NAME}-run-config"] == ["TrainingRun"]
    assert found[f"{NAME}-data-config"] == ["Dataset"]
    run = get(api_client, namespace, "TrainingRun", NAME)
    assert (condition(run, "InvalidChild") or {}).get("status") != "True", run["status"]
