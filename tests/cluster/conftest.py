"""Cluster-tier fixtures: one real control plane per test session, a fresh namespace per test.

Set LLMOPS_TEST_KUBECONFIG to run against an existing cluster instead of starting one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import urllib3
from kubelet import wait_crd_established
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from controlplane import KUEUE_NAMESPACE_LABEL, ControlPlane, wait_for

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
# Reconcile often in tests; read when the controllers are imported.
os.environ.setdefault("LLMOPS_RECONCILE_SECONDS", "1")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane | None]:
    """The control plane the tests start (None when LLMOPS_TEST_KUBECONFIG names a cluster)."""
    if os.environ.get("LLMOPS_TEST_KUBECONFIG"):
        yield None
        return
    workdir = tmp_path_factory.mktemp("control-plane")
    with ControlPlane.start(workdir) as plane:
        try:
            # The in-process operator and the llmops client find the cluster here.
            os.environ["KUBECONFIG"] = str(plane.kubeconfig)
            yield plane
        except BaseException:
            print(plane.logs_tail())
            raise


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane | None) -> Path:
    if control_plane is None:
        return Path(os.environ["LLMOPS_TEST_KUBECONFIG"])
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def api_client(kubeconfig: Path) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(kubeconfig))
    _apply_crds(api)
    yield api
    api.close()


def _apply_crds(api: client.ApiClient) -> None:
    """Install the generated CRDs with server-side apply (so an existing cluster gets the
    current schema, not whatever an older run left) and wait until they are served."""
    import yaml
    from kubernetes.dynamic import DynamicClient

    crds = DynamicClient(api).resources.get(
        api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition"
    )
    files = sorted(CRDS.glob("*.yaml")) if CRDS.is_dir() else []
    for file in files:
        for doc in yaml.safe_load_all(file.read_text()):
            name = doc["metadata"]["name"]
            crds.server_side_apply(
                body=doc, name=name, field_manager="llmops-tests", force_conflicts=True
            )

            wait_crd_established(api, name)


@pytest.fixture
def namespace(api_client: client.ApiClient) -> Iterator[str]:
    """A fresh namespace with its default ServiceAccount; deleted after the test."""
    core = client.CoreV1Api(api_client)
    name = f"test-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    def has_default_sa() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    wait_for(f"default ServiceAccount in {name}", has_default_sa, 30)
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def kueue(control_plane: ControlPlane | None, api_client: client.ApiClient) -> None:
    """Kueue's controller manager, started on the first test that asks for it and kept for
    the session. It manages the Jobs of namespaces labelled KUEUE_NAMESPACE_LABEL only."""
    if control_plane is None:
        pytest.skip("Kueue runs in the test control plane only (LLMOPS_TEST_KUBECONFIG is set)")
    control_plane.start_kueue()


@pytest.fixture
def kueue_namespace(kueue: None, api_client: client.ApiClient, namespace: str) -> str:
    """The test's namespace, managed by Kueue."""
    client.CoreV1Api(api_client).patch_namespace(
        namespace, {"metadata": {"labels": {KUEUE_NAMESPACE_LABEL: "true"}}}
    )
    return namespace


@pytest.fixture(scope="session")
def volumes(api_client: client.ApiClient) -> Iterator[None]:
    """A volume provisioner for the tests' claims, as a cluster's dynamic provisioner with
    reclaimPolicy Delete would be: the control plane has none (and kwok nodes mount
    nothing), so each pending claim gets a hostPath PersistentVolume bound to it, and a
    volume released by a deleted claim is deleted. A fixed pool of volumes ran out once
    enough tests had left claims behind in their deleted namespaces."""
    stop = threading.Event()
    thread = threading.Thread(
        target=_provision_volumes, args=(api_client, stop), name="test-provisioner", daemon=True
    )
    thread.start()
    yield
    stop.set()
    thread.join(10)


def _provision_volumes(api_client: client.ApiClient, stop: threading.Event) -> None:
    core = client.CoreV1Api(api_client)
    while not stop.wait(0.3):
        try:
            for claim in core.list_persistent_volume_claim_for_all_namespaces().items:
                if claim.status.phase == "Pending" and not claim.spec.volume_name:
                    _create_volume_for(core, claim)
            for volume in core.list_persistent_volume().items:
                if volume.status.phase in ("Released", "Failed"):
                    with contextlib.suppress(ApiException):
                        core.delete_persistent_volume(volume.metadata.name)
        except (ApiException, OSError, urllib3.exceptions.HTTPError):
            continue  # the control plane is starting or stopping


def _create_volume_for(core: client.CoreV1Api, claim: client.V1PersistentVolumeClaim) -> None:
    meta = claim.metadata
    name = f"test-pv-{meta.uid}"
    requested = ((claim.spec.resources and claim.spec.resources.requests) or {}).get("storage")
    volume = client.V1PersistentVolume(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PersistentVolumeSpec(
            capacity={"storage": requested or "1Gi"},
            access_modes=claim.spec.access_modes or ["ReadWriteOnce"],
            persistent_volume_reclaim_policy="Delete",
            storage_class_name=claim.spec.storage_class_name or "",
            claim_ref=client.V1ObjectReference(
                namespace=meta.namespace, name=meta.name, uid=meta.uid
            ),
            host_path=client.V1HostPathVolumeSource(path=f"/tmp/llmops-{name}"),
        ),
    )
    try:
        core.create_persistent_volume(volume)
    except ApiException as error:
        if error.status != 409:  # already provisioned by an earlier pass
            raise


@pytest.fixture
def start_operator(
    kubeconfig: Path, api_client: client.ApiClient, namespace: str
) -> Iterator[Callable[[], None]]:
    """Starts the llmops operator in this process, watching the test's namespace; stopped
    at the end of the test."""
    import kopf

    import llmops.controllers  # noqa: F401  (registers the handlers)

    os.environ["KUBECONFIG"] = str(kubeconfig)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start() -> None:
        ready = threading.Event()

        def run() -> None:
            asyncio.run(
                kopf.operator(
                    standalone=True, namespaces=[namespace], ready_flag=ready, stop_flag=stop
                )
            )

        thread = threading.Thread(target=run, name="llmops-operator", daemon=True)
        thread.start()
        threads.append(thread)
        assert ready.wait(30), "the operator did not start"

    yield start
    stop.set()
    for thread in threads:
        thread.join(30)


@pytest.fixture
def operator(start_operator: Callable[[], None], namespace: str) -> str:
    """The llmops operator, running in this process for the test's namespace."""
    start_operator()
    return namespace


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """On a failed cluster test, add where every pod is and the test namespace's recent
    events to the report: a timeout then says what the cluster was doing."""
    report = yield
    if report.failed and call.when == "call" and "api_client" in getattr(item, "funcargs", {}):
        try:
            report.sections.append(("cluster state", _cluster_state(item.funcargs["api_client"])))
        except Exception as error:  # the report must not hide the test's own failure
            report.sections.append(("cluster state", f"unavailable: {error!r}"))
    return report


def _cluster_state(api: client.ApiClient) -> str:
    core = client.CoreV1Api(api)
    lines = ["pods (namespace/name phase node deleting gpus):"]
    for pod in core.list_pod_for_all_namespaces().items:
        gpus = sum(
            int((c.resources.requests or {}).get("nvidia.com/gpu", 0))
            for c in pod.spec.containers
            if c.resources is not None
        )
        lines.append(
            f"  {pod.metadata.namespace}/{pod.metadata.name} {pod.status.phase} "
            f"{pod.spec.node_name} {bool(pod.metadata.deletion_timestamp)} {gpus}"
        )
    lines.append("namespaces:")
    for ns in core.list_namespace().items:
        lines.append(f"  {ns.metadata.name} {ns.status.phase}")
    lines.append("events (last 40):")
    events = core.list_event_for_all_namespaces().items
    events.sort(key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp)
    for event in events[-40:]:
        obj = event.involved_object
        lines.append(
            f"  {obj.namespace}/{obj.kind}/{obj.name} {event.reason}: {(event.message or '')[:200]}"
        )
    return "\n".join(lines)
