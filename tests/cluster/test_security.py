"""Least privilege, Pod Security and secrets, on the real control plane.

The operator runs in this process with the chart's ServiceAccount identity (a token from the
TokenRequest API, RBAC rendered by `helm template` and applied), in a namespace that enforces
the `restricted` Pod Security Standard, while resources reference an auth-token Secret and S3
credentials. The controllers' key scenarios must pass there, every pod they create must be
admitted, the operator must never be refused by the API server, and no secret value may show
up in its log, in events, statuses or ConfigMaps.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelet import (
    claim,
    condition,
    create,
    end_pod,
    finished_dataset,
    get,
    wait_phase,
    wait_status,
)
from kubernetes import client
from kubernetes.dynamic import DynamicClient
from test_sweep_controller import SWEEP, sweep
from test_trainingrun_controller import training_run, wait_gang_running

from build_components import component_bin_dirs
from controlplane import wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "llmops"
RELEASE = "sec"
SA = f"{RELEASE}-llmops"
AUTH_TOKEN = "sk-auth-d41d8cd98f00b204e9800998ecf8427e"
S3_KEY_ID = "AKIAEXAMPLESECRETID42"
S3_SECRET_KEY = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
SECRET_VALUES = (AUTH_TOKEN, S3_KEY_ID, S3_SECRET_KEY)


class Captured(logging.Handler):
    """Every log record of the operator (kopf and llmops), formatted with its arguments."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.levelname} {record.name} {text}")


def render_chart(namespace: str, *values: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            str(component_bin_dirs()["helm"]),
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            namespace,
            *(arg for value in values for arg in ("--set", value)),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def apply(api_client: client.ApiClient, obj: dict[str, Any]) -> None:
    resource = DynamicClient(api_client).resources.get(
        api_version=obj["apiVersion"], kind=obj["kind"]
    )
    resource.server_side_apply(
        body=obj,
        name=obj["metadata"]["name"],
        namespace=obj["metadata"].get("namespace"),
        field_manager="llmops-tests",
        force_conflicts=True,
    )


def token_kubeconfig(
    api_client: client.ApiClient, admin_kubeconfig: Path, namespace: str, path: Path
) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount (TokenRequest API)."""
    request = client.CoreV1Api(api_client).create_namespaced_service_account_token(
        SA, namespace, {"spec": {"expirationSeconds": 3600}}
    )
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = admin["clusters"][0]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": SA, "user": {"token": request.status.token}}],
                "contexts": [
                    {
                        "name": SA,
                        "context": {"cluster": cluster["name"], "user": SA, "namespace": namespace},
                    }
                ],
                "current-context": SA,
            }
        )
    )
    return path


@pytest.fixture
def restricted(api_client: client.ApiClient, namespace: str) -> str:
    """The test namespace enforces the `restricted` Pod Security Standard."""
    client.CoreV1Api(api_client).patch_namespace(
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
    return namespace


@pytest.fixture
def secrets(api_client: client.ApiClient, restricted: str) -> None:
    core = client.CoreV1Api(api_client)
    for name, data in (
        ("api-token", {"token": AUTH_TOKEN}),
        ("s3-creds", {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}),
    ):
        core.create_namespaced_secret(
            restricted, {"metadata": {"name": name}, "stringData": data, "type": "Opaque"}
        )


@pytest.fixture
def chart_operator(
    api_client: client.ApiClient,
    kubeconfig: Path,
    restricted: str,
    secrets: None,
    tmp_path: Path,
) -> Iterator[Captured]:
    """The operator in this process, authenticated as the chart's ServiceAccount with only
    the chart's RBAC, watching the restricted namespace; yields its captured log."""
    import kopf

    import llmops.controllers  # noqa: F401  (registers the handlers)
    from llmops.controllers.kube import default_kube

    namespace = restricted
    rendered = render_chart(namespace, f"watchNamespaces={{{namespace}}}", "operator.replicas=0")
    rbac_kinds = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    for obj in rendered:
        if obj["kind"] in rbac_kinds:
            if obj["kind"].startswith("Cluster"):
                obj["metadata"]["name"] += f"-{namespace}"  # one per test, deleted below
                if "roleRef" in obj:
                    obj["roleRef"]["name"] += f"-{namespace}"
            apply(api_client, obj)
    sa_kubeconfig = token_kubeconfig(api_client, kubeconfig, namespace, tmp_path / "sa.kubeconfig")

    captured = Captured()
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(captured)
    root.setLevel(logging.DEBUG)
    admin_kubeconfig = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(sa_kubeconfig)  # kopf's login and the controllers' client
    default_kube.cache_clear()
    stop, ready = threading.Event(), threading.Event()

    def run() -> None:
        asyncio.run(
            kopf.operator(standalone=True, namespaces=[namespace], ready_flag=ready, stop_flag=stop)
        )

    thread = threading.Thread(target=run, name="llmops-operator-sa", daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "the operator did not start"
        yield captured
    finally:
        stop.set()
        thread.join(30)
        root.removeHandler(captured)
        root.setLevel(previous_level)
        if admin_kubeconfig is not None:
            os.environ["KUBECONFIG"] = admin_kubeconfig
        default_kube.cache_clear()
        rbac = client.RbacAuthorizationV1Api(api_client)
        rbac.delete_cluster_role_binding(f"{RELEASE}-llmops-discovery-{namespace}")
        rbac.delete_cluster_role(f"{RELEASE}-llmops-discovery-{namespace}")


# An HTTP 403 as urllib3 logs it (`HTTP/1.1" 403 None`) or as ApiException prints it
# (`(403)`); a bare "403" also turns up in timestamps and resourceVersions.
HTTP_403 = re.compile(r'" 403 |\(403\)')


def assert_never_refused(log: Captured) -> None:
    refused = [
        line for line in log.lines if HTTP_403.search(line) or "forbidden" in line.lower()
    ] + [line for line in log.lines if "Not enough permissions" in line]
    assert not refused, "the operator was refused:\n" + "\n".join(refused[:10])


def assert_pods_admitted(core: client.CoreV1Api, namespace: str, expected: int) -> None:
    events = core.list_namespaced_event(namespace).items
    rejected = [e.message for e in events if e.reason == "FailedCreate"]
    assert not rejected, rejected
    pods = core.list_namespaced_pod(namespace).items
    assert len(pods) >= expected


def assert_no_secret_values(api_client: client.ApiClient, namespace: str, log: Captured) -> None:
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    haystacks: dict[str, str] = {"operator log": "\n".join(log.lines)}
    for event in core.list_namespaced_event(namespace).items:
        haystacks[f"event {event.metadata.name}"] = f"{event.reason} {event.message}"
    for config_map in core.list_namespaced_config_map(namespace).items:
        haystacks[f"ConfigMap {config_map.metadata.name}"] = str(config_map.data)
    for plural in ("datasets", "trainingruns", "modeldeployments"):
        for item in custom.list_namespaced_custom_object(
            "llmops.dev", "v1alpha1", namespace, plural
        )["items"]:
            haystacks[f"{plural}/{item['metadata']['name']}"] = str(item)
    api = client.ApiClient()  # serialise children as the API returns them
    for pod in core.list_namespaced_pod(namespace).items:
        haystacks[f"pod {pod.metadata.name}"] = str(api.sanitize_for_serialization(pod))
    encoded = [base64.b64encode(v.encode()).decode() for v in SECRET_VALUES]
    assert len(haystacks) > 3
    for where, text in haystacks.items():
        for value in (*SECRET_VALUES, *encoded):
            assert value not in text, f"a secret value appears in {where}"


def test_training_run_and_gang_restart_with_the_chart_identity(
    api_client: client.ApiClient, restricted: str, chart_operator: Captured, volumes
):
    namespace = restricted
    core = client.CoreV1Api(api_client)
    finished_dataset(api_client, namespace, "corpus")
    create(api_client, namespace, training_run())

    running = wait_phase(api_client, namespace, "TrainingRun", "gpt", "Running")
    assert condition(running, "Created")["status"] == "True"
    pods = wait_gang_running(core, namespace, "gpt-workers-0")
    end_pod(core, namespace, pods[1].metadata.name, exit_code=137)
    wait_status(
        api_client,
        namespace,
        "TrainingRun",
        "gpt",
        "gang restarted",
        phase="Running",
        restartCount=1,
    )
    wait_gang_running(core, namespace, "gpt-workers-1")
    # Reading rank 0's log fails quietly where a node serves no logs (kwok), so its
    # permission is asked of the authorizer directly.
    review = client.AuthorizationV1Api(api_client).create_subject_access_review(
        {
            "spec": {
                "user": f"system:serviceaccount:{namespace}:{SA}",
                "groups": ["system:serviceaccounts", "system:authenticated"],
                "resourceAttributes": {
                    "namespace": namespace,
                    "verb": "get",
                    "resource": "pods",
                    "subresource": "log",
                },
            }
        }
    )
    assert review.status.allowed
    assert_pods_admitted(core, namespace, 2)
    assert_never_refused(chart_operator)
    assert_no_secret_values(api_client, namespace, chart_operator)


def test_sweep_creates_and_suspends_trials_with_the_chart_identity(
    api_client: client.ApiClient, restricted: str, chart_operator: Captured, volumes
):
    namespace = restricted
    finished_dataset(api_client, namespace, "corpus")
    create(api_client, namespace, sweep(parallelTrials=2, budget={"maxWallTimeSeconds": 6}))

    done = wait_phase(api_client, namespace, "Sweep", SWEEP, "Succeeded")
    assert condition(done, "Complete")["reason"] == "BudgetExhausted"
    assert done["status"]["trials"]["suspended"] == 2
    for index in range(2):  # created, then suspended, under the chart's rules
        trial = get(api_client, namespace, "TrainingRun", f"{SWEEP}-trial-{index}")
        assert trial["spec"]["suspend"] is True
    assert_never_refused(chart_operator)


def test_dataset_with_s3_credentials_with_the_chart_identity(
    api_client: client.ApiClient, restricted: str, chart_operator: Captured, volumes
):
    namespace = restricted
    create(
        api_client,
        namespace,
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "web"},
            "spec": {
                "sources": [
                    {
                        "name": "crawl",
                        "s3": {
                            "bucket": "corpus",
                            "prefix": "crawl/",
                            "credentialsSecret": {"name": "s3-creds"},
                        },
                    }
                ],
                "tokenizer": {"train": {"vocabSize": 1024}},
                "parallelism": 2,
            },
        },
    )
    done = wait_phase(api_client, namespace, "Dataset", "web", "Succeeded")
    assert condition(done, "Complete")["status"] == "True"
    assert_pods_admitted(client.CoreV1Api(api_client), namespace, 3)
    assert_never_refused(chart_operator)
    assert_no_secret_values(api_client, namespace, chart_operator)


def test_model_deployment_with_an_auth_token_with_the_chart_identity(
    api_client: client.ApiClient, restricted: str, chart_operator: Captured, volumes
):
    namespace = restricted
    claim(api_client, namespace, "models")
    create(
        api_client,
        namespace,
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "chat"},
            "spec": {
                "model": {"uri": "pvc://models/gpt/final"},
                "replicas": 2,
                "server": {"authTokenSecret": {"name": "api-token", "key": "token"}},
                "autoscaling": {
                    "minReplicas": 1,
                    "maxReplicas": 3,
                    "metric": "in-flight-requests",
                    "target": 4,
                },
            },
        },
    )
    ready = wait_phase(api_client, namespace, "ModelDeployment", "chat", "Ready")
    assert condition(ready, "Available")["status"] == "True"
    wait_for(
        "autoscaler",
        lambda: bool(
            client.AutoscalingV2Api(api_client)
            .list_namespaced_horizontal_pod_autoscaler(namespace)
            .items
        ),
        30,
    )
    assert get(api_client, namespace, "ModelDeployment", "chat")["status"]["readyReplicas"] == 2
    assert_pods_admitted(client.CoreV1Api(api_client), namespace, 2)
    assert_never_refused(chart_operator)
    assert_no_secret_values(api_client, namespace, chart_operator)
