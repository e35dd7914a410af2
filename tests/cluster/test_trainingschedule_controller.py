"""Retraining on the real control plane: a TrainingSchedule starts a run for every new Dataset
version, each continuing from the previous run's checkpoint, keeps its history within the
limit, and a ModelDeployment following it rolls out only models that pass its gate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubelet import HOLD_SCHEDULING, condition, create, custom, finished_dataset, get, wait_phase
from kubernetes import client
from kubernetes.client.rest import ApiException

from controlplane import wait_for

GROUP, VERSION = "llmops.dev", "v1alpha1"
SCHEDULE = "nightly"
OPERATOR = [sys.executable, "-m", "llmops", "operator"]


def schedule(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingSchedule",
        "metadata": {"name": SCHEDULE},
        "spec": {
            "schedule": "0 3 * * *",
            "onDatasetChange": True,
            "historyLimit": 1,
            "template": {
                "datasetRef": {"name": "corpus"},
                "model": {"numLayers": 2, "numHeads": 2, "hiddenSize": 64, "contextLength": 64},
                "hyperparameters": {"maxSteps": 100},
                "scheduling": HOLD_SCHEDULING,
                "suspend": True,  # the gang never runs; the test writes each run's outcome
            },
            **spec,
        },
    }


def new_version(api_client: client.ApiClient, namespace: str, fingerprint: str) -> None:
    custom(api_client).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "datasets", "corpus", {"status": {"fingerprint": fingerprint}}
    )


def run_exists(api_client: client.ApiClient, namespace: str, name: str) -> bool:
    try:
        get(api_client, namespace, "TrainingRun", name)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def finish(api_client: client.ApiClient, namespace: str, name: str, loss: float) -> None:
    """The run ends as its controller would report it: a final model and its test loss."""
    wait_phase(api_client, namespace, "TrainingRun", name, "Suspended")  # its controller is idle
    latest = {"name": "step-100", "step": 100, "uri": f"pvc://{name}-checkpoints/step-100"}
    custom(api_client).patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        "trainingruns",
        name,
        {
            "status": {
                "phase": "Succeeded",
                "modelUri": f"pvc://{name}-checkpoints/output/model",
                "finalEvaluation": {"loss": loss},
                "checkpoints": {"latest": latest},
            }
        },
    )


def served_uri(api_client: client.ApiClient, namespace: str) -> str | None:
    try:
        deployment = client.AppsV1Api(api_client).read_namespaced_deployment(
            "chat-server", namespace
        )
    except ApiException:
        return None
    uri: str = deployment.spec.template.metadata.annotations["llmops.dev/model-uri"]
    return uri


def deployment_status(api_client: client.ApiClient, namespace: str, field: str) -> Any:
    return (get(api_client, namespace, "ModelDeployment", "chat").get("status") or {}).get(field)


def test_dataset_versions_start_runs_that_continue_and_the_gate_holds_back_a_worse_model(
    api_client: client.ApiClient, operator: str, volumes
):
    namespace = operator
    finished_dataset(api_client, namespace, "corpus")
    new_version(api_client, namespace, "fp-1")
    create(api_client, namespace, schedule())

    wait_for("first run", lambda: run_exists(api_client, namespace, f"{SCHEDULE}-1"), 30)
    first = get(api_client, namespace, "TrainingRun", f"{SCHEDULE}-1")
    annotations = first["metadata"]["annotations"]
    assert annotations["llmops.dev/trigger"] == "dataset-change"
    assert annotations["llmops.dev/dataset-fingerprint"] == "fp-1"
    assert "init" not in first["spec"]  # nothing to continue from yet
    assert first["metadata"]["ownerReferences"][0]["kind"] == "TrainingSchedule"
    status = wait_phase(api_client, namespace, "TrainingSchedule", SCHEDULE, "Running")["status"]
    assert status["active"] == f"{SCHEDULE}-1" and status["nextScheduleTime"].endswith("03:00:00Z")

    finish(api_client, namespace, f"{SCHEDULE}-1", loss=2.0)
    waiting = wait_phase(api_client, namespace, "TrainingSchedule", SCHEDULE, "Waiting")
    assert waiting["status"]["lastSucceededRun"] == f"{SCHEDULE}-1"
    assert not run_exists(api_client, namespace, f"{SCHEDULE}-2")  # same version: no new run

    create(
        api_client,
        namespace,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelDeployment",
            "metadata": {"name": "chat"},
            "spec": {
                "model": {
                    "trainingSchedule": {"name": SCHEDULE},
                    "gate": {"metric": "loss", "maxRegression": 0.05},
                },
                "replicas": 1,
            },
        },
    )
    first_model = f"pvc://{SCHEDULE}-1-checkpoints/output/model"
    wait_for("first model served", lambda: served_uri(api_client, namespace) == first_model, 30)
    wait_for(
        "served evaluation recorded",
        lambda: deployment_status(api_client, namespace, "servedEvaluation") == {"loss": 2.0},
        30,
    )

    # A new Dataset version: a second run, continuing from the first one's latest checkpoint.
    new_version(api_client, namespace, "fp-2")
    wait_for("second run", lambda: run_exists(api_client, namespace, f"{SCHEDULE}-2"), 30)
    second = get(api_client, namespace, "TrainingRun", f"{SCHEDULE}-2")
    assert second["spec"]["init"] == {
        "trainingRun": {"name": f"{SCHEDULE}-1", "checkpoint": "latest"}
    }
    finish(api_client, namespace, f"{SCHEDULE}-2", loss=2.5)  # 25% worse than served

    def held_back() -> str:
        return str(deployment_status(api_client, namespace, "heldBack") or "")

    wait_for("gate holds the worse model back", lambda: f"{SCHEDULE}-2" in held_back(), 30)
    assert "worse than the served model's 2" in held_back()
    assert served_uri(api_client, namespace) == first_model
    # The served run outlives the history limit of 1 (its checkpoints are being served).
    assert run_exists(api_client, namespace, f"{SCHEDULE}-1")

    # A better model passes the gate and rolls out; the runs beyond the limit go.
    new_version(api_client, namespace, "fp-3")
    wait_for("third run", lambda: run_exists(api_client, namespace, f"{SCHEDULE}-3"), 30)
    finish(api_client, namespace, f"{SCHEDULE}-3", loss=1.9)
    third_model = f"pvc://{SCHEDULE}-3-checkpoints/output/model"
    wait_for("better model served", lambda: served_uri(api_client, namespace) == third_model, 30)
    wait_for(
        "status follows the rollout",
        lambda: deployment_status(api_client, namespace, "servedRun") == f"{SCHEDULE}-3",
        30,
    )
    assert not held_back()
    wait_for(
        "history trimmed to the limit",
        lambda: (
            not run_exists(api_client, namespace, f"{SCHEDULE}-1")
            and not run_exists(api_client, namespace, f"{SCHEDULE}-2")
        ),
        30,
    )
    events = client.CoreV1Api(api_client).list_namespaced_event(namespace).items
    assert any(e.reason == "HeldBackByGate" for e in events)
    ready = condition(get(api_client, namespace, "TrainingSchedule", SCHEDULE), "Ready")
    assert ready is not None and ready["status"] == "True"


def test_an_invalid_cron_expression_is_reported(
    api_client: client.ApiClient, operator: str, volumes
):
    namespace = operator
    create(api_client, namespace, schedule(schedule="61 * * * *"))
    failed = wait_phase(api_client, namespace, "TrainingSchedule", SCHEDULE, "Failed")
    assert "spec.schedule" in condition(failed, "Ready")["message"]


def test_a_restarted_operator_starts_no_run_twice(
    api_client: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    start_operator: Callable[[], None],
    volumes: None,
):
    finished_dataset(api_client, namespace, "corpus")
    new_version(api_client, namespace, "fp-1")
    create(api_client, namespace, schedule())
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LLMOPS_RECONCILE_SECONDS": "1"}
    first = subprocess.Popen(
        [*OPERATOR, "--namespace", namespace, "--metrics-port", "0", "--health-port", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for("first run", lambda: run_exists(api_client, namespace, f"{SCHEDULE}-1"), 30)
    finally:
        first.send_signal(signal.SIGKILL)  # perhaps before the schedule's status was written
        first.wait(30)
    uid = get(api_client, namespace, "TrainingRun", f"{SCHEDULE}-1")["metadata"]["uid"]

    start_operator()
    status = wait_phase(api_client, namespace, "TrainingSchedule", SCHEDULE, "Running")["status"]
    time.sleep(3)  # several more reconciles
    runs = custom(api_client).list_namespaced_custom_object(
        GROUP, VERSION, namespace, "trainingruns"
    )["items"]
    assert [(r["metadata"]["name"], r["metadata"]["uid"]) for r in runs] == [(f"{SCHEDULE}-1", uid)]
    assert status["active"] == f"{SCHEDULE}-1" and status["lastDatasetFingerprint"] == "fp-1"
