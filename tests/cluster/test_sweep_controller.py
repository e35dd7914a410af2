"""The Sweep controller on the real control plane, with the TrainingRun controller running
the trials: parallelism, the best trial, an operator restart mid-sweep, early stopping, the
budget, and specs refused at admission or by the controller.

Trials run on kwok's hold pool; the test plays the trainer by writing each trial's
status.step and status.metrics (as the TrainingRun controller does from the trainer's log)
and ends a trial by ending its pod, so the TrainingRun controller marks it Succeeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubelet import (
    GROUP,
    HOLD_SCHEDULING,
    VERSION,
    condition,
    create,
    custom,
    end_pod,
    finished_dataset,
    get,
    wait_phase,
)
from kubernetes import client
from kubernetes.client.rest import ApiException

from controlplane import wait_for
from llmops.api.sweep import SweepSpec
from llmops.search import random_point

SWEEP = "lr"
TERMINAL = ("Succeeded", "Failed")
OPERATOR_ARGS = ["--metrics-port", "0", "--health-port", "0"]


def sweep(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "Sweep",
        "metadata": {"name": SWEEP},
        "spec": {
            "template": {
                "datasetRef": {"name": "corpus"},
                "model": {"numLayers": 2, "numHeads": 2, "hiddenSize": 64, "contextLength": 64},
                "hyperparameters": {"maxSteps": 100, "microBatchSize": 4},
                "resources": {"numNodes": 1, "cpu": "1", "memory": "1Gi"},
                "scheduling": HOLD_SCHEDULING,
                # Object storage: no claim per trial (the test cluster has few volumes).
                "checkpointing": {"storage": {"s3": {"bucket": "checkpoints"}}},
            },
            "parameters": [
                {
                    "name": "lr",
                    "path": "hyperparameters.learningRate",
                    "type": "categorical",
                    "values": ["0.001", "0.002", "0.003", "0.004"],
                }
            ],
            "algorithm": "grid",
            **spec,
        },
    }


def trials(api_client: client.ApiClient, namespace: str) -> dict[str, dict[str, Any]]:
    items = custom(api_client).list_namespaced_custom_object(
        GROUP, VERSION, namespace, "trainingruns", label_selector=f"llmops.dev/sweep={SWEEP}"
    )["items"]
    return {item["metadata"]["name"]: item for item in items}


def active(found: dict[str, dict[str, Any]]) -> int:
    return sum(
        (t.get("status") or {}).get("phase") not in TERMINAL and not t["spec"].get("suspend")
        for t in found.values()
    )


@pytest.fixture
def max_active(api_client: client.ApiClient, namespace: str) -> Iterator[Callable[[], int]]:
    """The most trials seen pending or running at once, polled all through the test."""
    seen = [0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            with contextlib.suppress(ApiException):
                seen[0] = max(seen[0], active(trials(api_client, namespace)))
            time.sleep(0.1)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    yield lambda: seen[0]
    stop.set()
    thread.join(5)


def name(index: int) -> str:
    return f"{SWEEP}-trial-{index}"


def wait_trials(api_client: client.ApiClient, namespace: str, count: int) -> None:
    wait_for(f"{count} trials", lambda: len(trials(api_client, namespace)) == count, 30)


def report(
    api_client: client.ApiClient, namespace: str, trial: str, step: int, loss: float
) -> None:
    """The trainer evaluated: the step and validation loss reach the trial's status."""
    custom(api_client).patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        "trainingruns",
        trial,
        {"status": {"step": step, "metrics": {"validationLoss": loss, "trainLoss": loss + 0.1}}},
    )


def finish(api_client: client.ApiClient, namespace: str, trial: str, loss: float) -> None:
    """Train the trial to its end with this final validation loss."""
    wait_phase(api_client, namespace, "TrainingRun", trial, "Running", timeout=30)
    report(api_client, namespace, trial, 100, loss)
    core = client.CoreV1Api(api_client)
    (pod,) = core.list_namespaced_pod(namespace, label_selector=f"job-name={trial}-workers-0").items
    summary = {"step": 100, "finalEvaluation": {"loss": loss}, "latestCheckpoint": "step-100"}
    end_pod(core, namespace, pod.metadata.name, exit_code=0, message=json.dumps(summary))
    wait_phase(api_client, namespace, "TrainingRun", trial, "Succeeded", timeout=30)


def test_trials_run_in_parallel_and_the_best_is_reported(
    api_client: client.ApiClient, operator: str, volumes: None, max_active: Callable[[], int]
) -> None:
    namespace = operator
    finished_dataset(api_client, namespace, "corpus")
    created = create(api_client, namespace, sweep(parallelTrials=2, maxTrials=10))

    wait_trials(api_client, namespace, 2)
    losses = {0: 2.0, 1: 3.0, 2: 1.5, 3: 2.5}
    finish(api_client, namespace, name(0), losses[0])
    wait_trials(api_client, namespace, 3)
    finish(api_client, namespace, name(1), losses[1])
    wait_trials(api_client, namespace, 4)
    finish(api_client, namespace, name(2), losses[2])
    finish(api_client, namespace, name(3), losses[3])

    done = wait_phase(api_client, namespace, "Sweep", SWEEP, "Succeeded", timeout=30)
    assert max_active() == 2
    status = done["status"]
    assert condition(done, "Complete")["reason"] == "TrialsFinished"
    assert condition(done, "Ready")["status"] == "True"
    assert status["trials"]["succeeded"] == 4 and status["trials"]["finished"] == 4
    assert len(trials(api_client, namespace)) == 4  # the grid has 4 points: maxTrials capped
    assert status["bestTrial"]["name"] == name(2)
    assert status["bestTrial"]["value"] == 1.5
    assert status["bestTrial"]["parameters"] == {"lr": "0.003"}
    assert status["bestTrial"]["checkpointUri"].startswith("s3://checkpoints/")
    assert [e["name"] for e in status["leaderboard"]] == [name(2), name(0), name(3), name(1)]
    assert status["observedGeneration"] == created["metadata"]["generation"]

    for index, found in sorted(trials(api_client, namespace).items()):
        lr = found["spec"]["hyperparameters"]["learningRate"]
        params = json.loads(found["metadata"]["annotations"]["llmops.dev/trial-parameters"])
        assert params == {"lr": lr}
        assert found["metadata"]["labels"]["llmops.dev/trial-index"] == index.rsplit("-", 1)[1]
        (owner,) = found["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == ("Sweep", created["metadata"]["uid"])
    assert sorted(
        t["spec"]["hyperparameters"]["learningRate"] for t in trials(api_client, namespace).values()
    ) == [0.001, 0.002, 0.003, 0.004]
    events = client.CoreV1Api(api_client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={SWEEP}"
    )
    assert {"TrialCreated", "NewBestTrial", "TrialsFinished"} <= {e.reason for e in events.items}


def test_operator_restart_mid_sweep_creates_no_duplicate_trials(
    api_client: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    start_operator: Callable[[], None],
    volumes: None,
) -> None:
    finished_dataset(api_client, namespace, "corpus")
    lr = {"name": "lr", "path": "hyperparameters.learningRate", "type": "log-uniform"}
    manifest = sweep(
        algorithm="random",
        seed=11,
        parallelTrials=2,
        maxTrials=3,
        parameters=[{**lr, "min": 0.0001, "max": 0.01}],
    )
    create(api_client, namespace, manifest)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LLMOPS_RECONCILE_SECONDS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "llmops", "operator", "--namespace", namespace, *OPERATOR_ARGS],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_trials(api_client, namespace, 2)
        wait_phase(api_client, namespace, "TrainingRun", name(0), "Running", timeout=30)
        time.sleep(2)  # a few more reconciles: still two trials
    finally:
        first.send_signal(signal.SIGKILL)  # no cleanup, no status written
        first.wait(30)
    before = {
        n: (t["metadata"]["uid"], t["metadata"]["annotations"]["llmops.dev/trial-parameters"])
        for n, t in trials(api_client, namespace).items()
    }
    assert sorted(before) == [name(0), name(1)]

    start_operator()
    time.sleep(3)
    after = {
        n: (t["metadata"]["uid"], t["metadata"]["annotations"]["llmops.dev/trial-parameters"])
        for n, t in trials(api_client, namespace).items()
    }
    assert after == before  # same objects, same parameters: nothing re-sampled or duplicated

    finish(api_client, namespace, name(0), 2.0)
    wait_trials(api_client, namespace, 3)
    spec = SweepSpec.model_validate(manifest["spec"])
    third = trials(api_client, namespace)[name(2)]
    params = json.loads(third["metadata"]["annotations"]["llmops.dev/trial-parameters"])
    assert params == random_point(spec.parameters, 11, 2)  # reproducible from seed and index
    finish(api_client, namespace, name(1), 1.0)
    finish(api_client, namespace, name(2), 3.0)
    done = wait_phase(api_client, namespace, "Sweep", SWEEP, "Succeeded", timeout=30)
    assert done["status"]["bestTrial"]["name"] == name(1)
    assert len(trials(api_client, namespace)) == 3


def test_early_stopping_suspends_a_trial_behind_the_median(
    api_client: client.ApiClient, operator: str, volumes: None
) -> None:
    namespace = operator
    finished_dataset(api_client, namespace, "corpus")
    create(
        api_client,
        namespace,
        sweep(parallelTrials=4, maxTrials=4, earlyStopping={"minTrials": 3, "startStep": 10}),
    )
    wait_trials(api_client, namespace, 4)
    for index in range(4):
        wait_phase(api_client, namespace, "TrainingRun", name(index), "Running", timeout=30)
    for index in range(3):
        report(api_client, namespace, name(index), 20, 2.0)

    def recorded() -> bool:
        records = get(api_client, namespace, "Sweep", SWEEP)["status"].get("trialRecords") or []
        return sum(bool(r.get("intermediate")) for r in records) == 3

    wait_for("intermediate values recorded", recorded, 30)
    report(api_client, namespace, name(3), 20, 4.5)

    wait_for(
        "the bad trial suspended",
        lambda: trials(api_client, namespace)[name(3)]["spec"].get("suspend") is True,
        30,
    )
    pruned = trials(api_client, namespace)[name(3)]
    assert pruned["metadata"]["annotations"]["llmops.dev/trial-pruned"] == "true"
    wait_phase(api_client, namespace, "TrainingRun", name(3), "Suspended", timeout=30)
    wait_for(
        "pruned counted",
        lambda: get(api_client, namespace, "Sweep", SWEEP)["status"]["trials"]["pruned"] == 1,
        15,
    )
    current = get(api_client, namespace, "Sweep", SWEEP)
    assert current["status"]["trials"]["running"] == 3  # the others run on
    assert not any(
        t["spec"].get("suspend") for n, t in trials(api_client, namespace).items() if n != name(3)
    )
    record = next(r for r in current["status"]["trialRecords"] if r["name"] == name(3))
    assert record["state"] == "Pruned" and record["intermediate"] == [{"step": 20, "value": 4.5}]
    events = client.CoreV1Api(api_client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={SWEEP}"
    )
    assert "TrialPruned" in {e.reason for e in events.items}


@pytest.mark.parametrize(
    ("budget", "says"),
    [
        ({"maxWallTimeSeconds": 8}, "maxWallTimeSeconds=8"),
        # Two CPU trials of one pod each: 2 pod-hours per hour, so 0.004 is spent in about
        # 7 s, counted by the TrainingRun controller and summed by the Sweep.
        ({"maxAcceleratorHours": 0.004}, "accelerator"),
    ],
    ids=["wall-time", "accelerator-hours"],
)
def test_budget_ends_the_sweep_and_suspends_running_trials(
    api_client: client.ApiClient,
    operator: str,
    volumes: None,
    budget: dict[str, float],
    says: str,
) -> None:
    namespace = operator
    finished_dataset(api_client, namespace, "corpus")
    create(api_client, namespace, sweep(parallelTrials=2, maxTrials=4, budget=budget))
    wait_trials(api_client, namespace, 2)
    done = wait_phase(api_client, namespace, "Sweep", SWEEP, "Succeeded", timeout=60)
    complete = condition(done, "Complete")
    assert complete["status"] == "True" and complete["reason"] == "BudgetExhausted"
    assert says in complete["message"]
    found = trials(api_client, namespace)
    assert sorted(found) == [name(0), name(1)]  # no trial after the budget ran out
    assert all(t["spec"]["suspend"] is True for t in found.values())
    assert done["status"]["trials"]["suspended"] == 2
    assert {r["state"] for r in done["status"]["trialRecords"]} == {"Suspended"}
    used = sum((t.get("status") or {}).get("acceleratorHours") or 0.0 for t in found.values())
    assert used >= budget.get("maxAcceleratorHours", 0.0)
    time.sleep(2)
    assert len(trials(api_client, namespace)) == 2


def test_trials_that_never_started_say_suspended_when_the_sweep_ends(
    api_client: client.ApiClient, operator: str, volumes: None
) -> None:
    """The Dataset never becomes ready: the wall-time budget ends the sweep, and its
    waiting trials must show they were stopped, not stay Pending as if about to start."""
    namespace = operator
    create(api_client, namespace, sweep(parallelTrials=2, budget={"maxWallTimeSeconds": 3}))
    wait_trials(api_client, namespace, 2)
    wait_phase(api_client, namespace, "Sweep", SWEEP, "Succeeded", timeout=60)
    for trial in trials(api_client, namespace):
        stopped = wait_phase(api_client, namespace, "TrainingRun", trial, "Suspended")
        assert condition(stopped, "Suspended")["status"] == "True"
        assert condition(stopped, "Created")["reason"] == "DatasetNotFound"


def patch_sweep(api_client: client.ApiClient, namespace: str, spec: dict[str, Any]) -> None:
    custom(api_client).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "sweeps", SWEEP, {"spec": spec}
    )


def test_suspend_and_resume_a_sweep(api_client: client.ApiClient, operator: str, volumes: None):
    namespace = operator
    finished_dataset(api_client, namespace, "corpus")
    create(api_client, namespace, sweep(parallelTrials=2))
    wait_trials(api_client, namespace, 2)
    wait_phase(api_client, namespace, "TrainingRun", name(1), "Running", timeout=30)

    patch_sweep(api_client, namespace, {"suspend": True})
    suspended = wait_phase(api_client, namespace, "Sweep", SWEEP, "Suspended", timeout=30)
    assert condition(suspended, "Suspended")["status"] == "True"
    for index in range(2):
        wait_phase(api_client, namespace, "TrainingRun", name(index), "Suspended", timeout=30)

    patch_sweep(api_client, namespace, {"suspend": False})
    wait_phase(api_client, namespace, "Sweep", SWEEP, "Running", timeout=30)
    for index in range(2):
        wait_phase(api_client, namespace, "TrainingRun", name(index), "Running", timeout=30)
    found = trials(api_client, namespace)
    assert sorted(found) == [name(0), name(1)]  # resumed, not replaced
    assert not any(t["spec"]["suspend"] for t in found.values())


def test_max_failed_trials_fails_the_sweep(
    api_client: client.ApiClient, operator: str, volumes: None
) -> None:
    namespace = operator
    finished_dataset(api_client, namespace, "corpus")
    manifest = sweep(parallelTrials=2, maxFailedTrials=1)
    manifest["spec"]["template"]["maxRestarts"] = 0
    create(api_client, namespace, manifest)
    wait_trials(api_client, namespace, 2)
    wait_phase(api_client, namespace, "TrainingRun", name(0), "Running", timeout=30)
    core = client.CoreV1Api(api_client)
    (pod,) = core.list_namespaced_pod(
        namespace, label_selector=f"job-name={name(0)}-workers-0"
    ).items
    end_pod(core, namespace, pod.metadata.name, exit_code=1)

    failed = wait_phase(api_client, namespace, "Sweep", SWEEP, "Failed", timeout=30)
    assert condition(failed, "Failed")["reason"] == "MaxFailedTrialsReached"
    assert failed["status"]["trials"]["failed"] == 1
    assert trials(api_client, namespace)[name(1)]["spec"]["suspend"] is True
    assert len(trials(api_client, namespace)) == 2


def test_an_unknown_parameter_path_is_rejected_at_admission(
    api_client: client.ApiClient, namespace: str
) -> None:
    bad = sweep()
    bad["spec"]["parameters"][0]["path"] = "hyperparameters.learningrate"
    with pytest.raises(ApiException) as raised:
        custom(api_client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, "sweeps", bad, field_validation="Strict"
        )
    assert raised.value.status == 422
    message = json.loads(raised.value.body)["message"]
    assert "spec.parameters[0].path" in message and "hyperparameters.learningrate" in message


def test_a_trial_spec_that_is_no_valid_training_run_fails_the_sweep(
    api_client: client.ApiClient, operator: str
) -> None:
    namespace = operator
    # learningRate is at most 10: a draw above it is no valid TrainingRun spec.
    lr = {"name": "lr", "path": "hyperparameters.learningRate", "type": "float"}
    create(
        api_client,
        namespace,
        sweep(algorithm="random", parameters=[{**lr, "min": 11, "max": 20}]),
    )
    failed = wait_phase(api_client, namespace, "Sweep", SWEEP, "Failed", timeout=30)
    reason = condition(failed, "Failed")
    assert reason["reason"] == "InvalidTrialSpec"
    assert "hyperparameters.learningRate" in reason["message"] and "lr=" in reason["message"]
    assert trials(api_client, namespace) == {}


def test_values_that_do_not_fit_the_field_fail_the_sweep(
    api_client: client.ApiClient, operator: str
) -> None:
    namespace = operator
    # Admitted (the schema cannot convert values), refused by the operator naming the field.
    layers = {"name": "layers", "path": "model.numLayers", "type": "categorical"}
    create(api_client, namespace, sweep(parameters=[{**layers, "values": ["2", "many"]}]))
    failed = wait_phase(api_client, namespace, "Sweep", SWEEP, "Failed", timeout=30)
    reason = condition(failed, "Failed")
    assert reason["reason"] == "InvalidSpec"
    assert "values" in reason["message"] and "'many' is not an integer" in reason["message"]
    assert trials(api_client, namespace) == {}


def test_a_model_deployment_serves_the_best_trial(
    api_client: client.ApiClient, operator: str, volumes: None
) -> None:
    namespace = operator
    finished_dataset(api_client, namespace, "corpus")
    two_points = sweep(parallelTrials=2)
    del two_points["spec"]["template"]["checkpointing"]  # a claim per trial, served from it
    two_points["spec"]["parameters"][0]["values"] = ["0.001", "0.002"]
    create(api_client, namespace, two_points)
    create(
        api_client,
        namespace,
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "chat"},
            "spec": {"model": {"sweep": {"name": SWEEP}}, "replicas": 1},
        },
    )
    pending = wait_phase(api_client, namespace, "ModelDeployment", "chat", "Pending")
    assert "has no best trial yet" in condition(pending, "Available")["message"]
    wait_trials(api_client, namespace, 2)
    finish(api_client, namespace, name(0), 2.4)
    finish(api_client, namespace, name(1), 1.9)
    wait_phase(api_client, namespace, "Sweep", SWEEP, "Succeeded", timeout=30)

    def served() -> str | None:
        with contextlib.suppress(ApiException):
            deployment = client.AppsV1Api(api_client).read_namespaced_deployment(
                "chat-server", namespace
            )
            return str(deployment.spec.template.metadata.annotations["llmops.dev/model-uri"])
        return None

    wait_for(
        "best trial served",
        lambda: served() == f"pvc://{name(1)}-checkpoints/output/model",
        30,
    )
    wait_for(
        "status names the trial",
        lambda: (
            (get(api_client, namespace, "ModelDeployment", "chat").get("status") or {}).get(
                "servedRun"
            )
            == name(1)
        ),
        30,
    )


def test_cross_validation_runs_every_fold_and_reports_mean_and_stdev(
    api_client: client.ApiClient, operator: str, volumes: None, max_active: Callable[[], int]
) -> None:
    """2 trials x 3 folds: 6 TrainingRuns, at most parallelTrials of them at once; a trial's
    value is the mean of its folds' validation losses, with their standard deviation."""
    namespace = operator
    finished_dataset(api_client, namespace, "corpus")
    manifest = sweep(parallelTrials=2, crossValidation={"folds": 3})
    manifest["spec"]["parameters"][0]["values"] = ["0.001", "0.002"]
    create(api_client, namespace, manifest)

    losses = {(0, 0): 2.0, (0, 1): 2.2, (0, 2): 2.4, (1, 0): 1.0, (1, 1): 1.5, (1, 2): 2.0}
    for count, (index, fold) in enumerate(sorted(losses)):
        run = f"{name(index)}-fold-{fold}"
        wait_for(f"{run} created", lambda run=run: run in trials(api_client, namespace), 30)
        if count == 0:
            time.sleep(1)  # a few reconciles: no third run while two are active
            assert len(trials(api_client, namespace)) == 2
        finish(api_client, namespace, run, losses[(index, fold)])

    done = wait_phase(api_client, namespace, "Sweep", SWEEP, "Succeeded", timeout=30)
    assert max_active() == 2
    found = trials(api_client, namespace)
    assert sorted(found) == sorted(f"{name(i)}-fold-{f}" for i, f in losses)
    for run_name, run in found.items():
        index, fold = int(run_name.split("-")[2]), int(run_name.split("-")[4])
        labels = run["metadata"]["labels"]
        assert labels["llmops.dev/trial-index"] == str(index)
        assert labels["llmops.dev/fold-index"] == str(fold)
        assert run["spec"]["crossValidation"] == {"folds": 3, "fold": fold}
    status = done["status"]
    assert status["trials"]["succeeded"] == 2 and status["trials"]["finished"] == 2
    first, second = status["trialRecords"]
    assert first["name"] == name(0) and first["folds"] == [2.0, 2.2, 2.4]
    assert first["value"] == pytest.approx(2.2) and first["stdev"] == pytest.approx(0.2)
    assert second["value"] == pytest.approx(1.5) and second["stdev"] == pytest.approx(0.5)
    best = status["bestTrial"]
    assert (best["name"], best["parameters"]) == (name(1), {"lr": "0.002"})
    assert best["value"] == pytest.approx(1.5) and best["stdev"] == pytest.approx(0.5)
    assert [e["name"] for e in status["leaderboard"]] == [name(1), name(0)]
