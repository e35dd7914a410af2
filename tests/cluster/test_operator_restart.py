"""An operator killed between creating two children and restarted creates no duplicates and
misses nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from kubelet import create, finished_dataset, wait_phase
from kubernetes import client
from test_trainingrun_controller import RUN, training_run

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
