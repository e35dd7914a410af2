"""Cluster-tier fixtures: one real control plane per test session, a fresh namespace per test.

Set LLMOPS_TEST_KUBECONFIG to run against an existing cluster instead of starting one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config, utils
from kubernetes.client.rest import ApiException

from controlplane import ControlPlane, wait_for

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    existing = os.environ.get("LLMOPS_TEST_KUBECONFIG")
    if existing:
        yield Path(existing)
        return
    workdir = tmp_path_factory.mktemp("control-plane")
    with ControlPlane.start(workdir) as plane:
        try:
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
    """Install the generated CRDs (if any) and wait until they are served."""
    files = sorted(CRDS.glob("*.yaml")) if CRDS.is_dir() else []
    extensions = client.ApiextensionsV1Api(api)
    for file in files:
        try:
            utils.create_from_yaml(api, str(file))
        except utils.FailToCreateError as error:
            if not all(e.status == 409 for e in error.api_exceptions):
                raise
    for file in files:
        import yaml

        for doc in yaml.safe_load_all(file.read_text()):
            name = doc["metadata"]["name"]

            def established(crd_name: str = name) -> bool:
                crd = extensions.read_custom_resource_definition(crd_name)
                return any(
                    c.type == "Established" and c.status == "True"
                    for c in (crd.status.conditions or [])
                )

            wait_for(f"CRD {name} established", established, 30)


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
