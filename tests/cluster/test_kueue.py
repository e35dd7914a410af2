"""TrainingRuns queued through a real Kueue (its controller manager, CRDs and webhooks from
the pinned module, tests/cluster/components/kueue): Kueue suspends the gang's Job on
creation, admits it when the ClusterQueue's GPU quota allows, and the operator waits for that
admission rather than lifting the suspension itself."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubelet import (
    HOLD_SCHEDULING,
    condition,
    create,
    end_pod,
    finished_dataset,
    get,
    wait_phase,
)
from kubernetes import client
from kubernetes.client.rest import ApiException

from controlplane import wait_for

KUEUE = ("kueue.x-k8s.io", "v1beta2")
FLAVOR = "default-flavor"
QUEUE = "research"
GANG_GPUS = 8  # one node's worth: the ClusterQueue's quota fits exactly one gang


def kueue_object(
    api_client: client.ApiClient, kind: str, name: str, spec: dict[str, Any], namespace: str = ""
) -> None:
    body = {
        "apiVersion": "/".join(KUEUE),
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }
    api = client.CustomObjectsApi(api_client)
    plural = kind.lower() + ("es" if kind.endswith("s") else "s")
    try:
        if namespace:
            api.create_namespaced_custom_object(*KUEUE, namespace, plural, body)
        else:
            api.create_cluster_custom_object(*KUEUE, plural, body)
    except ApiException as error:
        if error.status != 409:
            raise


@pytest.fixture
def queue(api_client: client.ApiClient, kueue_namespace: str) -> Iterator[str]:
    """A ClusterQueue of its own for the test (quota for one gang of GANG_GPUS GPUs, lower
    priorities preempted for higher ones) and the LocalQueue QUEUE in the test namespace."""
    namespace = kueue_namespace
    cluster_queue = f"{namespace}-gpus"
    kueue_object(api_client, "ResourceFlavor", FLAVOR, {})
    kueue_object(
        api_client,
        "ClusterQueue",
        cluster_queue,
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "resourceGroups": [
                {
                    "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                    "flavors": [
                        {
                            "name": FLAVOR,
                            "resources": [
                                {"name": "cpu", "nominalQuota": "64"},
                                {"name": "memory", "nominalQuota": "512Gi"},
                                {"name": "nvidia.com/gpu", "nominalQuota": str(GANG_GPUS)},
                            ],
                        }
                    ],
                }
            ],
            "preemption": {"withinClusterQueue": "LowerPriority"},
        },
    )
    kueue_object(
        api_client, "LocalQueue", QUEUE, {"clusterQueue": cluster_queue}, namespace=namespace
    )
    custom = client.CustomObjectsApi(api_client)

    def active() -> bool:
        cq = custom.get_cluster_custom_object(*KUEUE, "clusterqueues", cluster_queue)
        lq = custom.get_namespaced_custom_object(*KUEUE, namespace, "localqueues", QUEUE)
        return all(condition(obj, "Active") or {} for obj in (cq, lq)) and all(
            (condition(obj, "Active") or {}).get("status") == "True" for obj in (cq, lq)
        )

    wait_for(f"ClusterQueue {cluster_queue} and LocalQueue {QUEUE} active", active, 60)
    yield namespace
    custom.delete_cluster_custom_object(*KUEUE, "clusterqueues", cluster_queue)


def priority_class(api_client: client.ApiClient, name: str, value: int) -> str:
    try:
        client.SchedulingV1Api(api_client).create_priority_class(
            {"metadata": {"name": name}, "value": value, "description": "llmops tests"}
        )
    except ApiException as error:
        if error.status != 409:
            raise
    return name


def queued_run(name: str, **scheduling: Any) -> dict[str, Any]:
    """A one-node gang of GANG_GPUS GPUs on the hold pool, queued in QUEUE."""
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "datasetRef": {"name": "corpus"},
            "model": {"numLayers": 2, "numHeads": 2, "hiddenSize": 64, "contextLength": 64},
            "hyperparameters": {"maxSteps": 100, "microBatchSize": 4},
            "resources": {
                "numNodes": 1,
                "procsPerNode": GANG_GPUS,
                "gpusPerNode": GANG_GPUS,
                "cpu": "8",
                "memory": "64Gi",
            },
            "scheduling": {**HOLD_SCHEDULING, "queueName": QUEUE, **scheduling},
        },
    }


def phase_of(api_client: client.ApiClient, namespace: str, run: str) -> str | None:
    try:
        return (get(api_client, namespace, "TrainingRun", run).get("status") or {}).get("phase")
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def job_of(api_client: client.ApiClient, namespace: str, run: str, attempt: int = 0) -> Any:
    return client.BatchV1Api(api_client).read_namespaced_job(f"{run}-workers-{attempt}", namespace)


def pods_of(api_client: client.ApiClient, namespace: str, job: str) -> list[client.V1Pod]:
    pods = client.CoreV1Api(api_client).list_namespaced_pod(
        namespace, label_selector=f"job-name={job}"
    )
    return [p for p in pods.items if not p.metadata.deletion_timestamp]


def running_pods(api_client: client.ApiClient, namespace: str, job: str) -> list[client.V1Pod]:
    def running() -> bool:
        pods = pods_of(api_client, namespace, job)
        return bool(pods) and all(p.status.phase == "Running" for p in pods)

    wait_for(f"{job} pods running", running, 90)
    return pods_of(api_client, namespace, job)


def workload_of(api_client: client.ApiClient, namespace: str, job: str) -> dict[str, Any]:
    """The Workload Kueue made for the Job (it owns it)."""
    workloads = client.CustomObjectsApi(api_client).list_namespaced_custom_object(
        *KUEUE, namespace, "workloads"
    )["items"]
    (found,) = [
        w
        for w in workloads
        if any(o["kind"] == "Job" and o["name"] == job for o in w["metadata"]["ownerReferences"])
    ]
    return dict(found)


def finish(api_client: client.ApiClient, namespace: str, job: str) -> None:
    """Every worker exits 0, rank 0 leaving its final report."""
    report = json.dumps(
        {"step": 100, "finalEvaluation": {"loss": 2.0}, "latestCheckpoint": "step-100"}
    )
    core = client.CoreV1Api(api_client)
    for pod in pods_of(api_client, namespace, job):
        index = pod.metadata.annotations["batch.kubernetes.io/job-completion-index"]
        end_pod(core, namespace, pod.metadata.name, 0, report if index == "0" else "")


def test_kueue_admits_one_gang_at_a_time_and_the_operator_never_lifts_its_hold(
    api_client: client.ApiClient, queue: str, operator: str, volumes
):
    namespace = queue
    finished_dataset(api_client, namespace, "corpus")
    high = priority_class(api_client, "llmops-test-training", 1000)

    # The first gang fits the quota: Kueue admits it and unsuspends its Job.
    create(api_client, namespace, queued_run("first", priorityClassName=high))
    first = wait_phase(api_client, namespace, "TrainingRun", "first", "Running", timeout=90)
    assert condition(first, "Running")["reason"] == "GangRunning"
    job = job_of(api_client, namespace, "first")
    assert job.spec.suspend is False
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == QUEUE
    workload = workload_of(api_client, namespace, "first-workers-0")
    assert condition(workload, "Admitted")["status"] == "True"
    assert workload["status"]["admission"]["clusterQueue"] == f"{namespace}-gpus"
    pods = running_pods(api_client, namespace, "first-workers-0")
    assert [p.spec.priority_class_name for p in pods] == [high]
    assert pods[0].spec.priority == 1000
    assert pods[0].spec.node_name.startswith("kwok-hold-")

    # The second does not fit while the first runs: it waits, queued, and says for what.
    create(api_client, namespace, queued_run("second", priorityClassName=high))
    wait_phase(api_client, namespace, "TrainingRun", "second", "Queued", timeout=60)

    def waiting() -> dict[str, Any]:
        return condition(get(api_client, namespace, "TrainingRun", "second"), "Running") or {}

    # Kueue's own reason, once its Workload has one: no GPU quota left.
    wait_for("Kueue's reason", lambda: "nvidia.com/gpu" in waiting().get("message", ""), 30)
    assert waiting()["status"] == "False" and waiting()["reason"] == "WaitingForAdmission"
    assert waiting()["message"].startswith(f"queued in Kueue LocalQueue {QUEUE!r}: ")
    assert "insufficient unused quota" in waiting()["message"]
    # Several reconciles later (every second here), the Job is still Kueue's to release.
    for _ in range(5):
        assert job_of(api_client, namespace, "second").spec.suspend is True
        assert not pods_of(api_client, namespace, "second-workers-0")
        time.sleep(1)
    assert get(api_client, namespace, "TrainingRun", "second")["status"]["phase"] == "Queued"

    # The first finishes: its quota comes back and Kueue admits the second.
    finish(api_client, namespace, "first-workers-0")
    wait_phase(api_client, namespace, "TrainingRun", "first", "Succeeded", timeout=60)
    wait_phase(api_client, namespace, "TrainingRun", "second", "Running", timeout=90)
    assert job_of(api_client, namespace, "second").spec.suspend is False
    (pod,) = running_pods(api_client, namespace, "second-workers-0")
    assert pod.spec.priority_class_name == high
    finish(api_client, namespace, "second-workers-0")
    wait_phase(api_client, namespace, "TrainingRun", "second", "Succeeded", timeout=60)


def test_kueue_preempting_a_run_for_a_higher_priority_one_is_a_preemption(
    api_client: client.ApiClient, queue: str, operator: str, volumes
):
    """Kueue preempts the running low-priority gang (suspends its Job again) to admit a
    higher-priority one: the operator counts a preemption, spends no restart, and the next
    attempt queues until the quota is free again."""
    namespace = queue
    finished_dataset(api_client, namespace, "corpus")
    low = priority_class(api_client, "llmops-test-low", 100)
    high = priority_class(api_client, "llmops-test-high", 10000)
    batch = queued_run("batch", priorityClassName=low)
    batch["spec"]["maxRestarts"] = 0
    create(api_client, namespace, batch)
    wait_phase(api_client, namespace, "TrainingRun", "batch", "Running", timeout=90)

    create(api_client, namespace, queued_run("urgent", priorityClassName=high))
    wait_phase(api_client, namespace, "TrainingRun", "urgent", "Running", timeout=90)

    def requeued() -> bool:
        status = get(api_client, namespace, "TrainingRun", "batch").get("status") or {}
        return status.get("phase") == "Queued" and status.get("preemptionCount") == 1

    wait_for("the preempted run queued again", requeued, 60)
    preempted = get(api_client, namespace, "TrainingRun", "batch")
    assert preempted["status"].get("restartCount", 0) == 0
    restarting = condition(preempted, "Restarting")
    assert restarting["reason"] == "Preempted" and "Preempted" in restarting["message"]
    assert job_of(api_client, namespace, "batch", attempt=1).spec.suspend is True

    finish(api_client, namespace, "urgent-workers-0")
    wait_phase(api_client, namespace, "TrainingRun", "batch", "Running", timeout=90)
    running_pods(api_client, namespace, "batch-workers-1")
    assert get(api_client, namespace, "TrainingRun", "batch")["status"]["preemptionCount"] == 1


def test_suspending_a_queued_run_goes_through_kueue(
    api_client: client.ApiClient, queue: str, operator: str, volumes
):
    """Kueue unsuspends an admitted Workload's Job whoever suspended it: the operator stops
    the gang by deactivating the Workload, which also gives the quota back."""
    namespace = queue
    finished_dataset(api_client, namespace, "corpus")
    create(api_client, namespace, queued_run("first"))
    wait_phase(api_client, namespace, "TrainingRun", "first", "Running", timeout=90)
    create(api_client, namespace, queued_run("second"))
    wait_phase(api_client, namespace, "TrainingRun", "second", "Queued", timeout=60)

    client.CustomObjectsApi(api_client).patch_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "trainingruns", "first", {"spec": {"suspend": True}}
    )
    wait_phase(api_client, namespace, "TrainingRun", "first", "Suspended", timeout=60)
    wait_for("first's pods gone", lambda: not pods_of(api_client, namespace, "first-workers-0"), 60)
    assert workload_of(api_client, namespace, "first-workers-0")["spec"]["active"] is False
    # Its quota went to the queued run.
    wait_phase(api_client, namespace, "TrainingRun", "second", "Running", timeout=90)
    time.sleep(3)  # the suspension holds: Kueue does not start the gang again
    assert job_of(api_client, namespace, "first").spec.suspend is True
    assert get(api_client, namespace, "TrainingRun", "first")["status"]["phase"] == "Suspended"

    client.CustomObjectsApi(api_client).patch_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "trainingruns", "first", {"spec": {"suspend": False}}
    )
    wait_phase(api_client, namespace, "TrainingRun", "first", "Queued", timeout=60)
    finish(api_client, namespace, "second-workers-0")
    wait_phase(api_client, namespace, "TrainingRun", "first", "Running", timeout=90)
    status = get(api_client, namespace, "TrainingRun", "first")["status"]
    assert status.get("preemptionCount", 0) == 0 and status.get("restartCount", 0) == 0


def test_a_sweep_wider_than_the_quota_runs_its_trials_in_turn(
    api_client: client.ApiClient, queue: str, operator: str, volumes
):
    """parallelTrials above what the ClusterQueue admits: the extra trials wait Queued (and
    hold their parallelTrials slot) and each runs when one before it finishes."""
    namespace = queue
    finished_dataset(api_client, namespace, "corpus")
    template = queued_run("unused")["spec"]
    template["checkpointing"] = {"storage": {"s3": {"bucket": "checkpoints"}}}
    create(
        api_client,
        namespace,
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Sweep",
            "metadata": {"name": "lr"},
            "spec": {
                "template": template,
                "parameters": [
                    {
                        "name": "lr",
                        "path": "hyperparameters.learningRate",
                        "type": "categorical",
                        "values": ["0.001", "0.002", "0.003"],
                    }
                ],
                "algorithm": "grid",
                "parallelTrials": 3,
                "maxTrials": 3,
            },
        },
    )
    names = [f"lr-trial-{i}" for i in range(3)]

    def phases() -> list[str | None]:
        return [phase_of(api_client, namespace, n) for n in names]

    for _ in names:
        # One trial runs, the others are queued (or done); finishing it lets the next in.
        wait_for(
            "one trial running, the rest queued or done",
            lambda: phases().count("Running") == 1 and not {"Pending", None} & set(phases()),
            90,
        )
        running = names[phases().index("Running")]
        finish(api_client, namespace, f"{running}-workers-0")
        wait_phase(api_client, namespace, "TrainingRun", running, "Succeeded", timeout=60)
    done = wait_phase(api_client, namespace, "Sweep", "lr", "Succeeded", timeout=60)
    assert done["status"]["trials"]["succeeded"] == 3
