"""The Helm chart: lint, values schema, watch scope, RBAC without wildcards, every rendered
object accepted by the real API server (server-side dry run), install and uninstall."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelet import install_stand_in_crd
from kubernetes import client
from kubernetes.dynamic import DynamicClient

from build_components import component_bin_dirs
from controlplane import wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "llmops"
EVERYTHING = (
    "metrics.serviceMonitor.enabled=true",
    "metrics.podMonitor.enabled=true",
    "metrics.prometheusRule.enabled=true",
    "dashboards.enabled=true",
    "networkPolicy.enabled=true",
    "networkPolicy.servingAllowedNamespaces={gateway}",
    "networkPolicy.monitoringNamespaces={monitoring}",
)


def helm(
    *args: str, kubeconfig: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    command = [str(component_bin_dirs()["helm"]), *args]
    if kubeconfig is not None:
        command += ["--kubeconfig", str(kubeconfig)]
    return subprocess.run(command, check=check, capture_output=True, text=True)


def render(*values: str, namespace: str = "llmops-system") -> list[dict[str, Any]]:
    args = [arg for value in values for arg in ("--set", value)]
    out = helm("template", "rel", str(CHART), "--namespace", namespace, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_lint_strict_with_defaults_and_everything_enabled():
    helm("lint", "--strict", str(CHART))
    args = [a for v in (*EVERYTHING, "watchNamespaces={ml}") for a in ("--set", v)]
    helm("lint", "--strict", str(CHART), *args)


def test_chart_crds_are_the_generated_ones():
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert sorted(p.name for p in (CHART / "crds").glob("*.yaml")) == generated
    for name in generated:
        assert (CHART / "crds" / name).read_text() == (ROOT / "crds" / name).read_text(), (
            f"helm/llmops/crds/{name} is stale: copy crds/{name}"
        )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("operator.replicas=2", "replicas"),
        ("watchNamespaces={Not_A_Namespace}", "watchNamespaces"),
        ("operator.metricsPort=0", "metricsPort"),
        ("metrics.serviceMonitor.interval=often", "interval"),
        ("unknownValue=1", "unknownValue"),
    ],
)
def test_values_schema_rejects_bad_values(value: str, message: str):
    result = helm("template", "rel", str(CHART), "--set", value, check=False)
    assert result.returncode != 0 and message in result.stderr


def test_network_policies_need_a_namespace_list():
    result = helm("template", "rel", str(CHART), "--set", "networkPolicy.enabled=true", check=False)
    assert result.returncode != 0 and "watchNamespaces" in result.stderr


def test_operator_deployment_and_watch_scope():
    docs = render()
    (deployment,) = of_kind(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == [
        "operator",
        "--all-namespaces",
        "--metrics-port=8000",
        "--health-port=8080",
        "--bind-address=0.0.0.0",
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "health": 8080,
        "metrics": 8000,
    }
    assert sorted(r["kind"] for r in docs if "Role" in r["kind"]) == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterRoleBinding",
    ]

    scoped = render("watchNamespaces={ml,research}")
    (container,) = of_kind(scoped, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["operator", "--namespace=ml", "--namespace=research"]
    assert {r["metadata"]["namespace"] for r in of_kind(scoped, "Role")} == {"ml", "research"}
    assert {r["metadata"]["namespace"] for r in of_kind(scoped, "RoleBinding")} == {
        "ml",
        "research",
    }
    # Only the read-only discovery role stays cluster-wide.
    (cluster_role,) = of_kind(scoped, "ClusterRole")
    assert {v for rule in cluster_role["rules"] for v in rule["verbs"]} == {"list", "watch"}


def rbac_rules() -> list[dict[str, Any]]:
    rules = []
    for docs in (render(), render("watchNamespaces={ml}")):
        for role in of_kind(docs, "ClusterRole") + of_kind(docs, "Role"):
            rules += role["rules"]
    return rules


def test_rbac_rules_have_no_wildcards():
    rules = rbac_rules()
    for rule in rules:
        print(rule)  # the granted rules, in the test log
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
            assert not any("*" in item for item in rule[key]), rule
        assert "nonResourceURLs" not in rule
    verbs = {v for rule in rules for v in rule["verbs"]}
    assert not verbs & {"escalate", "bind", "impersonate", "deletecollection", "update"}
    resources = {r for rule in rules for r in rule["resources"]}
    assert not resources & {"secrets", "nodes", "roles", "clusterroles", "rolebindings"}


@pytest.fixture(scope="module")
def monitoring_crds(api_client: client.ApiClient) -> None:
    """prometheus-operator's kinds, schema left open (the real CRDs are not available here):
    the dry run then checks apiVersion, kind and metadata of our monitoring objects."""
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        install_stand_in_crd(api_client, "monitoring.coreos.com", "v1", kind)


def test_every_rendered_object_passes_the_api_servers_validation(
    api_client: client.ApiClient, namespace: str, monitoring_crds: None
):
    dynamic = DynamicClient(api_client)
    docs = render(*EVERYTHING, f"watchNamespaces={{{namespace}}}", namespace=namespace)
    kinds = {d["kind"] for d in docs}
    assert kinds >= {
        "Deployment",
        "ServiceAccount",
        "Service",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
        "NetworkPolicy",
    }
    for doc in docs:
        resource = dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        resource.server_side_apply(
            body=doc,
            name=doc["metadata"]["name"],
            namespace=doc["metadata"].get("namespace"),
            field_manager="llmops-tests",
            dry_run="All",
        )
    dashboards = of_kind(docs, "ConfigMap")
    assert len(dashboards) == 4
    assert all(d["metadata"]["labels"]["grafana_dashboard"] == "1" for d in dashboards)
    (rule,) = of_kind(docs, "PrometheusRule")
    assert len(rule["spec"]["groups"]) == 4


def test_install_then_uninstall_leaves_no_operator_objects(
    api_client: client.ApiClient, kubeconfig: Path, namespace: str
):
    release = f"r{uuid.uuid4().hex[:6]}"
    fullname = f"{release}-llmops"
    helm(
        "install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--wait",
        "--timeout",
        "2m",
        kubeconfig=kubeconfig,
    )
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    deployment = apps.read_namespaced_deployment(fullname, namespace)
    assert deployment.status.ready_replicas == 1  # kwok runs the pod
    core.read_namespaced_service_account(fullname, namespace)
    core.read_namespaced_service(f"{fullname}-metrics", namespace)
    rbac.read_cluster_role(fullname)
    status = helm("status", release, "--namespace", namespace, kubeconfig=kubeconfig).stdout
    assert "STATUS: deployed" in status

    helm("uninstall", release, "--namespace", namespace, "--wait", kubeconfig=kubeconfig)
    selector = f"app.kubernetes.io/instance={release}"
    wait_for(
        "operator pods gone",
        lambda: not core.list_namespaced_pod(namespace, label_selector=selector).items,
        60,
    )
    left = [
        *apps.list_namespaced_deployment(namespace, label_selector=selector).items,
        *core.list_namespaced_service(namespace, label_selector=selector).items,
        *core.list_namespaced_service_account(namespace, label_selector=selector).items,
        *core.list_namespaced_config_map(namespace, label_selector=selector).items,
        *core.list_namespaced_secret(namespace, label_selector=f"name={release}").items,
        *rbac.list_cluster_role(label_selector=selector).items,
        *rbac.list_cluster_role_binding(label_selector=selector).items,
        *rbac.list_namespaced_role(namespace, label_selector=selector).items,
    ]
    assert not left, [f"{o.kind} {o.metadata.name}" for o in left]
    # Helm never deletes CRDs (that would delete every Dataset, TrainingRun, ...).
    client.ApiextensionsV1Api(api_client).read_custom_resource_definition("trainingruns.llmops.dev")
