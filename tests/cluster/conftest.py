"""Cluster-tier fixtures: one real control plane per test session, a fresh namespace per test.

Set LLMOPS_TEST_KUBECONFIG to run against an existing cluster instead of starting one.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubelet import wait_crd_established
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from controlplane import ControlPlane, wait_for

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
# Reconcile often in tests; read when the controllers are imported.
os.environ.setdefault("LLMOPS_RECONCILE_SECONDS", "1")


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    existing = os.environ.get("LLMOPS_TEST_KUBECONFIG")
    if existing:
        yield Path(existing)
        return
    workdir = tmp_path_factory.mktemp("control-plane")
    with ControlPlane.start(workdir) as plane:
        try:
            # The in-process operator and the llmops client find the cluster here.
            os.environ["KUBECONFIG"] = str(plane.kubeconfig)
            yield plane.kubeconfig
        except BaseException:
            print(plane.logs_tail())
            raise


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
def volumes(api_client: client.ApiClient) -> None:
    """Statically provisioned PersistentVolumes, so claims bind as in a cluster without a
    provisioner (kwok nodes never mount them)."""
    core = client.CoreV1Api(api_client)
    for index in range(40):
        core.create_persistent_volume(
            client.V1PersistentVolume(
                metadata=client.V1ObjectMeta(name=f"test-pv-{index}"),
                spec=client.V1PersistentVolumeSpec(
                    capacity={"storage": "100Gi"},
                    access_modes=["ReadWriteOnce", "ReadWriteMany"],
                    persistent_volume_reclaim_policy="Delete",
                    host_path=client.V1HostPathVolumeSource(path=f"/tmp/llmops-pv-{index}"),
                ),
            )
        )


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
