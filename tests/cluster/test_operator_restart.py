"""An operator killed between creating two children and restarted creates no duplicates and
misses nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from kubelet import condition, create, finished_dataset, get, wait_phase
from kubernetes import client
from test_trainingrun_controller import RUN, training_run

from controlplane import ControlPlane, wait_for

HERE = Path(__file__).resolve().parent
SELECTOR = f"llmops.dev/training-run={RUN}"


def children(api_client: client.ApiClient, namespace: str) -> dict[str, list[str]]:
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    listings = {
        "ConfigMap": core.list_namespaced_config_map,
        "Service": core.list_namespaced_service,
        "PersistentVolumeClaim": core.list_namespaced_persistent_volume_claim,
        "Job": batch.list_namespaced_job,
    }
    return {
        kind: [o.metadata.uid for o in list_(namespace, label_selector=SELECTOR).items]
        for kind, list_ in listings.items()
    }


@pytest.mark.parametrize("crash_after", [1, 2, 4])
def test_killed_operator_resumes_without_duplicates(
    api_client: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    start_operator: Callable[[], None],
    volumes,
    crash_after: int,
):
    finished_dataset(api_client, namespace, "corpus")
    create(api_client, namespace, training_run())
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LLMOPS_RECONCILE_SECONDS": "1"}
    crashed = subprocess.run(
        [sys.executable, str(HERE / "crashing_operator.py"), namespace, str(crash_after)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    before = children(api_client, namespace)
    assert sum(len(uids) for uids in before.values()) == crash_after

    start_operator()
    wait_phase(api_client, namespace, "TrainingRun", RUN, "Running")
    after = children(api_client, namespace)
    assert {kind: len(uids) for kind, uids in after.items()} == {
        "ConfigMap": 1,
        "Service": 1,
        "PersistentVolumeClaim": 1,
        "Job": 1,
    }
    for kind, uids in before.items():
        assert set(uids) <= set(after[kind]), f"{kind} was recreated"


def test_the_operator_catches_up_after_the_api_server_restarts(
    api_client: client.ApiClient, control_plane: ControlPlane | None, operator: str, volumes
):
    """Every watch breaks when the API server restarts: the operator's (kopf's and its watch
    cache's) reconnect and re-list, so a run created and a run suspended just after are acted
    on, and nothing is created twice."""
    if control_plane is None:
        pytest.skip("needs the control plane the tests start")
    namespace = operator
    finished_dataset(api_client, namespace, "corpus")
    create(api_client, namespace, training_run())
    wait_phase(api_client, namespace, "TrainingRun", RUN, "Running")
    before = children(api_client, namespace)

    control_plane.restart_apiserver()
    custom = client.CustomObjectsApi(api_client)
    custom.patch_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "trainingruns", RUN, {"spec": {"suspend": True}}
    )
    later = training_run()
    later["metadata"]["name"] = "after-restart"
    create(api_client, namespace, later)
    wait_phase(api_client, namespace, "TrainingRun", RUN, "Suspended", timeout=90)
    wait_for(
        "the run created after the restart has its children",
        lambda: (condition(get(api_client, namespace, "TrainingRun", "after-restart"), "Created")
                 or {}).get("status") == "True",
        90,
    )  # fmt: skip
    job = client.BatchV1Api(api_client).read_namespaced_job(f"{RUN}-workers-0", namespace)
    assert job.spec.suspend is True
    assert children(api_client, namespace) == before  # the first run's children, unchanged
