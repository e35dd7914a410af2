"""The test control plane is the real thing: controllers reconcile, kwok runs pods, RBAC and
Pod Security admission enforce, the garbage collector cascades, helm renders charts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from build_components import component_bin_dirs
from controlplane import wait_for

ROOT = Path(__file__).resolve().parents[2]
PAUSE = "registry.k8s.io/pause:3.10"


def _container(name: str = "main", **extra: object) -> client.V1Container:
    return client.V1Container(name=name, image=PAUSE, **extra)


def test_job_gets_a_pod_that_runs_and_completes(api_client: client.ApiClient, namespace: str):
    batch = client.BatchV1Api(api_client)
    job = client.V1Job(
        metadata=client.V1ObjectMeta(name="hello"),
        spec=client.V1JobSpec(
            completions=2,
            parallelism=2,
            completion_mode="Indexed",
            backoff_limit=0,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(restart_policy="Never", containers=[_container()])
            ),
        ),
    )
    batch.create_namespaced_job(namespace, job)

    def complete() -> bool:
        status = batch.read_namespaced_job_status("hello", namespace).status
        return any(c.type == "Complete" and c.status == "True" for c in status.conditions or [])

    wait_for("Job Complete", complete, 60)
    pods = client.CoreV1Api(api_client).list_namespaced_pod(
        namespace, label_selector="job-name=hello"
    )
    assert sorted(
        p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in pods.items
    ) == ["0", "1"]
    assert all(p.status.phase == "Succeeded" for p in pods.items)
    assert all(p.spec.node_name.startswith("kwok-node-") for p in pods.items)


def test_deployment_becomes_available_and_follows_scale(
    api_client: client.ApiClient, namespace: str
):
    apps = client.AppsV1Api(api_client)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        namespace,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1DeploymentSpec(
                replicas=2,
                selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels),
                    spec=client.V1PodSpec(containers=[_container()]),
                ),
            ),
        ),
    )

    def available(count: int) -> bool:
        status = apps.read_namespaced_deployment_status("web", namespace).status
        return (status.available_replicas or 0) == count and (status.replicas or 0) == count

    wait_for("2 replicas available", lambda: available(2), 60)
    apps.patch_namespaced_deployment_scale("web", namespace, {"spec": {"replicas": 3}})
    wait_for("3 replicas available", lambda: available(3), 60)
    apps.patch_namespaced_deployment_scale("web", namespace, {"spec": {"replicas": 1}})
    wait_for("1 replica available", lambda: available(1), 60)


def _as_user(api_client: client.ApiClient, user: str) -> client.ApiClient:
    impersonating = client.ApiClient(api_client.configuration)
    impersonating.set_default_header("Impersonate-User", user)
    return impersonating


def test_rbac_role_grants_exactly_what_it_says(api_client: client.ApiClient, namespace: str):
    core = client.CoreV1Api(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader"))
    )
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="configmap-reader"),
            rules=[
                client.V1PolicyRule(
                    api_groups=[""], resources=["configmaps"], verbs=["get", "list"]
                )
            ],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="reader"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="configmap-reader"
            ),
            subjects=[
                client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)
            ],
        ),
    )
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings"))
    )
    with _as_user(api_client, f"system:serviceaccount:{namespace}:reader") as reader_api:
        reader = client.CoreV1Api(reader_api)
        assert reader.read_namespaced_config_map("settings", namespace).metadata.name == "settings"
        assert [c.metadata.name for c in reader.list_namespaced_config_map(namespace).items] == [
            "kube-root-ca.crt",
            "settings",
        ]
        forbidden = [
            lambda: reader.delete_namespaced_config_map("settings", namespace),
            lambda: reader.list_namespaced_secret(namespace),
            lambda: reader.list_namespaced_config_map("default"),
        ]
        for call in forbidden:
            with pytest.raises(ApiException) as denied:
                call()
            assert denied.value.status == 403


def test_restricted_pod_security_rejects_privileged_and_accepts_compliant(
    api_client: client.ApiClient, namespace: str
):
    core = client.CoreV1Api(api_client)
    core.patch_namespace(
        namespace,
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
    )
    privileged = client.V1Pod(
        metadata=client.V1ObjectMeta(name="privileged"),
        spec=client.V1PodSpec(
            containers=[_container(security_context=client.V1SecurityContext(privileged=True))]
        ),
    )
    with pytest.raises(ApiException) as rejected:
        core.create_namespaced_pod(namespace, privileged)
    assert rejected.value.status == 403
    assert "violates PodSecurity" in rejected.value.body
    assert "restricted" in rejected.value.body

    compliant = client.V1Pod(
        metadata=client.V1ObjectMeta(name="compliant"),
        spec=client.V1PodSpec(
            security_context=client.V1PodSecurityContext(
                run_as_non_root=True,
                run_as_user=65532,
                seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
            ),
            containers=[
                _container(
                    security_context=client.V1SecurityContext(
                        allow_privilege_escalation=False,
                        capabilities=client.V1Capabilities(drop=["ALL"]),
                    )
                )
            ],
        ),
    )
    created = core.create_namespaced_pod(namespace, compliant)
    assert created.metadata.uid


def test_deleting_an_owner_garbage_collects_what_it_owns(
    api_client: client.ApiClient, namespace: str
):
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    reference = client.V1OwnerReference(
        api_version="v1",
        kind="ConfigMap",
        name="owner",
        uid=owner.metadata.uid,
        block_owner_deletion=True,
    )
    for index in range(3):
        core.create_namespaced_config_map(
            namespace,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name=f"owned-{index}", owner_references=[reference])
            ),
        )
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="unrelated"))
    )

    core.delete_namespaced_config_map("owner", namespace)

    def names() -> set[str]:
        return {c.metadata.name for c in core.list_namespaced_config_map(namespace).items}

    wait_for(
        "owned ConfigMaps collected", lambda: not any(n.startswith("owned-") for n in names()), 60
    )
    assert names() == {"kube-root-ca.crt", "unrelated"}


def test_helm_lints_and_renders_the_chart(tmp_path: Path):
    helm = str(component_bin_dirs()["helm"])
    env = {
        "HOME": str(tmp_path),
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }
    chart = ROOT / "helm" / "llmops"
    lint = subprocess.run(
        [helm, "lint", "--strict", str(chart)], env=env, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in lint.stdout
    rendered = subprocess.run(
        [helm, "template", "demo", str(chart), "--namespace", "llmops-system"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    objects = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(rendered) if d}
    assert ("Deployment", "demo-llmops") in objects
    assert ("ServiceAccount", "demo-llmops") in objects
