"""The TrainingRun controller on the real control plane: the gang's objects and wiring, gang
restart after a pod failure, suspend and resume, completion, deadline, restart budget."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from kubelet import (
    HOLD_SCHEDULING,
    condition,
    create,
    end_pod,
    fail_init_container,
    finished_dataset,
    get,
    wait_phase,
    wait_status,
)
from kubernetes import client

from controlplane import wait_for

RUN = "gpt"


def training_run(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": RUN},
        "spec": {
            "datasetRef": {"name": "corpus"},
            "model": {"numLayers": 2, "numHeads": 2, "hiddenSize": 64, "contextLength": 64},
            "hyperparameters": {"maxSteps": 100, "microBatchSize": 4},
            "resources": {
                "numNodes": 2,
                "procsPerNode": 8,
                "gpusPerNode": 8,
                "cpu": "8",
                "memory": "64Gi",
            },
            "scheduling": {**HOLD_SCHEDULING, "queueName": "research"},
            **spec,
        },
    }


def gang_pods(core: client.CoreV1Api, namespace: str, job: str) -> list[client.V1Pod]:
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    return sorted(
        pods, key=lambda p: p.metadata.annotations["batch.kubernetes.io/job-completion-index"]
    )


def wait_gang_running(core: client.CoreV1Api, namespace: str, job: str) -> list[client.V1Pod]:
    wait_for(
        f"{job} pods running",
        lambda: [p.status.phase for p in gang_pods(core, namespace, job)] == ["Running", "Running"],
        60,
    )
    return gang_pods(core, namespace, job)


def env_of(job: client.V1Job) -> dict[str, Any]:
    container = job.spec.template.spec.containers[0]
    return {
        e.name: e.value if e.value is not None else e.value_from.field_ref.field_path
        for e in container.env
    }


def test_gang_objects_wiring_and_status(api_client: client.ApiClient, operator: str, volumes):
    namespace = operator
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    finished_dataset(api_client, namespace, "corpus")
    run = create(api_client, namespace, training_run())

    running = wait_phase(api_client, namespace, "TrainingRun", RUN, "Running")
    assert condition(running, "Created")["status"] == "True"
    assert condition(running, "Running")["reason"] == "GangRunning"
    assert running["status"]["observedGeneration"] == run["metadata"]["generation"]

    config = core.read_namespaced_config_map(f"{RUN}-run-config", namespace)
    mounted = json.loads(config.data["trainingrun.json"])
    assert mounted["spec"]["resources"]["numNodes"] == 2
    service = core.read_namespaced_service(f"{RUN}-headless", namespace)
    assert service.spec.cluster_ip == "None" and service.spec.publish_not_ready_addresses
    claim = core.read_namespaced_persistent_volume_claim(f"{RUN}-checkpoints", namespace)
    assert claim.status.phase == "Bound"

    job = batch.read_namespaced_job(f"{RUN}-workers-0", namespace)
    assert (
        job.spec.completion_mode,
        job.spec.completions,
        job.spec.parallelism,
        job.spec.backoff_limit,
    ) == ("Indexed", 2, 2, 0)
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "research"
    env = env_of(job)
    assert env["MASTER_ADDR"] == f"{RUN}-workers-0-0.{RUN}-headless.{namespace}.svc"
    assert (env["WORLD_SIZE"], env["NNODES"], env["NPROC_PER_NODE"]) == ("16", "2", "8")
    assert (
        env["NODE_RANK"]
        == env["RANK"]
        == env["PET_NODE_RANK"]
        == ("metadata.annotations['batch.kubernetes.io/job-completion-index']")
    )
    assert env["PET_MASTER_ADDR"] == env["MASTER_ADDR"]
    assert env["LLMOPS_DATA_DIR"] == "/data/g1"  # the Dataset version it trains on
    assert "DS_ACCELERATOR" not in env  # GPUs requested
    container = job.spec.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "8"
    assert container.command[:4] == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=8",
        "--node-rank=$(NODE_RANK)",
    ]

    pods = wait_gang_running(core, namespace, f"{RUN}-workers-0")
    assert [p.spec.hostname for p in pods] == [f"{RUN}-workers-0-0", f"{RUN}-workers-0-1"]
    assert {p.spec.subdomain for p in pods} == {f"{RUN}-headless"}
    assert all(p.spec.node_name.startswith("kwok-hold-") for p in pods)
    for obj in (config, service, claim, job):
        (owner,) = obj.metadata.owner_references
        assert (owner.kind, owner.name, owner.controller) == ("TrainingRun", RUN, True)

    # A worker crashes: the whole gang restarts as attempt 1, from the latest checkpoint.
    end_pod(core, namespace, pods[1].metadata.name, exit_code=137)
    restarting = wait_status(
        api_client, namespace, "TrainingRun", RUN, "gang restarted", phase="Running", restartCount=1
    )
    assert condition(restarting, "Restarting")["status"] == "False"
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={RUN}")
    assert "GangMemberFailed" in {e.reason for e in events.items}
    wait_for(
        "old gang deleted",
        lambda: (
            not batch.list_namespaced_job(
                namespace, label_selector="llmops.dev/role=workers-0"
            ).items
        ),
        60,
    )
    pods = wait_gang_running(core, namespace, f"{RUN}-workers-1")
    assert {
        e["name"]: e.get("value")
        for e in batch.read_namespaced_job(f"{RUN}-workers-1", namespace).to_dict()["spec"][
            "template"
        ]["spec"]["containers"][0]["env"]
    }["LLMOPS_ATTEMPT"] == "1"

    # Suspend stops the pods; resuming brings the gang back.
    client.CustomObjectsApi(api_client).patch_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "trainingruns", RUN, {"spec": {"suspend": True}}
    )
    suspended = wait_phase(api_client, namespace, "TrainingRun", RUN, "Suspended")
    assert condition(suspended, "Suspended")["status"] == "True"
    wait_for("pods stopped", lambda: not gang_pods(core, namespace, f"{RUN}-workers-1"), 60)
    client.CustomObjectsApi(api_client).patch_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "trainingruns", RUN, {"spec": {"suspend": False}}
    )
    wait_phase(api_client, namespace, "TrainingRun", RUN, "Running")
    pods = wait_gang_running(core, namespace, f"{RUN}-workers-1")

    # Every worker exits 0: the run is complete.
    summary = {
        "step": 100,
        "finalEvaluation": {"loss": 2.5, "perplexity": 12.18},
        "latestCheckpoint": "step-100",
        "bestCheckpoint": "step-80",
    }
    for pod in pods:
        message = json.dumps(summary) if pod is pods[0] else ""  # rank 0 reports
        end_pod(core, namespace, pod.metadata.name, exit_code=0, message=message)
    done = wait_phase(api_client, namespace, "TrainingRun", RUN, "Succeeded")
    assert done["status"]["finalEvaluation"] == {"loss": 2.5, "perplexity": 12.18}
    assert done["status"]["checkpoints"]["best"] == {
        "name": "step-80",
        "step": 80,
        "uri": f"pvc://{RUN}-checkpoints/step-80",
    }
    assert done["status"]["step"] == 100
    assert condition(done, "Complete")["status"] == "True"
    assert done["status"]["progress"] == 100
    assert done["status"]["modelUri"] == f"pvc://{RUN}-checkpoints/output/model"
    assert done["status"]["restartCount"] == 1

    # Every transition is announced once, however many reconciles ran side by side.
    time.sleep(3)
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={RUN}")
    reasons = Counter(e.reason for e in events.items if e.involved_object.kind == "TrainingRun")
    assert reasons["TrainingComplete"] == 1, reasons
    assert reasons["GangMemberFailed"] == 1, reasons


def test_restart_budget_exhausted_fails_the_run(
    api_client: client.ApiClient, operator: str, volumes
):
    namespace = operator
    core = client.CoreV1Api(api_client)
    finished_dataset(api_client, namespace, "corpus")
    create(api_client, namespace, training_run(maxRestarts=0))
    pods = wait_gang_running(core, namespace, f"{RUN}-workers-0")
    end_pod(core, namespace, pods[0].metadata.name, exit_code=1)
    failed = wait_phase(api_client, namespace, "TrainingRun", RUN, "Failed")
    assert condition(failed, "Failed")["reason"] == "MaxRestartsExceeded"
    assert "restartCount" not in failed["status"] or failed["status"]["restartCount"] == 0


def test_deadline_ends_the_run(api_client: client.ApiClient, operator: str, volumes):
    namespace = operator
    finished_dataset(api_client, namespace, "corpus")
    create(api_client, namespace, training_run(activeDeadlineSeconds=2))
    failed = wait_phase(api_client, namespace, "TrainingRun", RUN, "Failed")
    assert condition(failed, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(
        "gang deleted",
        lambda: not client.BatchV1Api(api_client).list_namespaced_job(namespace).items,
        60,
    )


def test_waits_for_its_dataset(api_client: client.ApiClient, operator: str, volumes):
    namespace = operator
    create(api_client, namespace, training_run())
    pending = wait_phase(api_client, namespace, "TrainingRun", RUN, "Pending")
    assert condition(pending, "Created")["reason"] == "DatasetNotFound"
    finished_dataset(api_client, namespace, "corpus")
    wait_phase(api_client, namespace, "TrainingRun", RUN, "Running")
    assert get(api_client, namespace, "TrainingRun", RUN)["status"]["startTime"]


def test_preemption_restarts_without_spending_the_restart_budget(
    api_client: client.ApiClient, operator: str, volumes
):
    namespace = operator
    core = client.CoreV1Api(api_client)
    finished_dataset(api_client, namespace, "corpus")
    create(api_client, namespace, training_run(maxRestarts=0))
    pods = wait_gang_running(core, namespace, f"{RUN}-workers-0")
    # A node drain: the pod is marked as a disruption target, then fails.
    core.patch_namespaced_pod_status(
        pods[0].metadata.name,
        namespace,
        {
            "status": {
                "conditions": [
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "TerminationByKubelet",
                        "message": "node drained",
                    }
                ]
            }
        },
    )
    end_pod(core, namespace, pods[0].metadata.name, exit_code=143)
    restarted = wait_status(
        api_client, namespace, "TrainingRun", RUN, "gang back", phase="Running", preemptionCount=1
    )
    assert restarted["status"].get("restartCount", 0) == 0
    assert condition(restarted, "Restarting")["reason"] == "GangRunning"
    wait_gang_running(core, namespace, f"{RUN}-workers-1")


def test_accelerator_hours_are_counted_and_a_budget_stops_the_run(
    api_client: client.ApiClient, operator: str, volumes
):
    namespace = operator
    core = client.CoreV1Api(api_client)
    finished_dataset(api_client, namespace, "corpus")
    # 2 pods x 8 GPUs: 16 GPU-hours per hour, so 0.02 GPU-hours is spent in 4.5 s.
    create(api_client, namespace, training_run(budget={"maxAcceleratorHours": 0.02}))
    wait_gang_running(core, namespace, f"{RUN}-workers-0")
    wait_for(
        "accelerator-hours counted",
        lambda: (
            (get(api_client, namespace, "TrainingRun", RUN)["status"].get("acceleratorHours") or 0)
            > 0
        ),
        30,
    )
    failed = wait_phase(api_client, namespace, "TrainingRun", RUN, "Failed")
    reason = condition(failed, "Failed")
    assert reason["reason"] == "BudgetExhausted"
    assert "of 0.02 accelerator-hours" in reason["message"]
    assert failed["status"]["acceleratorHours"] >= 0.02
    # Suspending the Job stops the pods with SIGTERM (the trainer checkpoints first); the Job
    # is kept, not deleted, so nothing is lost.
    job = client.BatchV1Api(api_client).read_namespaced_job(f"{RUN}-workers-0", namespace)
    assert job.spec.suspend is True
    wait_for(
        "pods stopped",
        lambda: (
            not core.list_namespaced_pod(
                namespace, label_selector=f"job-name={RUN}-workers-0"
            ).items
        ),
        60,
    )


def test_a_wall_time_budget_stops_the_run(api_client: client.ApiClient, operator: str, volumes):
    namespace = operator
    finished_dataset(api_client, namespace, "corpus")
    create(api_client, namespace, training_run(budget={"maxWallTimeSeconds": 2}))
    failed = wait_phase(api_client, namespace, "TrainingRun", RUN, "Failed")
    assert condition(failed, "Failed")["reason"] == "BudgetExhausted"
    assert "maxWallTimeSeconds=2" in condition(failed, "Failed")["message"]


def test_a_hub_model_is_fetched_by_an_initializer_whose_failure_fails_the_run(
    api_client: client.ApiClient, operator: str, volumes
):
    namespace = operator
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    finished_dataset(api_client, namespace, "corpus")
    model = {
        "objective": "sft",
        "contextLength": 64,
        "pretrained": {"uri": "hf://Qwen/Qwen2.5-0.5B@main", "credentialsSecret": {"name": "hub"}},
    }
    create(api_client, namespace, training_run(model=model, adapter={"rank": 16}))
    job_name = f"{RUN}-workers-0"

    # The simulated nodes do not run init containers: the pods exist, their initializer is
    # what the test plays, once a node took them (kwok's report of a pod it starts would
    # overwrite a failure played before).
    def gang_running() -> bool:
        found = gang_pods(core, namespace, job_name)
        return len(found) == 2 and all(p.status.phase == "Running" for p in found)

    wait_for("gang pods running", gang_running, 60)
    pods = gang_pods(core, namespace, job_name)

    # The token is referenced from the Secret; no value of it is in the Job the API stored.
    job = batch.read_namespaced_job(job_name, namespace)
    (init,) = job.spec.template.spec.init_containers
    env = {e.name: e for e in init.env}
    assert env["HF_TOKEN"].value is None
    assert env["HF_TOKEN"].value_from.secret_key_ref.name == "hub"
    assert env["LLMOPS_PRETRAINED_URI"].value == "hf://Qwen/Qwen2.5-0.5B@main"
    assert env["LLMOPS_PRETRAINED_DIR"].value == "/checkpoints/pretrained"
    trainer = job.spec.template.spec.containers[0]
    assert "HF_TOKEN" not in {e.name for e in trainer.env}
    stored = get(api_client, namespace, "TrainingRun", RUN)
    assert stored["spec"]["adapter"]["rank"] == 16 and stored["spec"]["adapter"]["type"] == "lora"

    report = {"stage": "model-init", "reason": "UnknownArchitecture", "message": "qwen9 unknown"}
    fail_init_container(core, namespace, pods[0].metadata.name, "model-init", json.dumps(report))
    failed = wait_phase(api_client, namespace, "TrainingRun", RUN, "Failed")
    reason = condition(failed, "Failed")
    assert reason["reason"] == "UnknownArchitecture" and "qwen9" in reason["message"]
    assert (failed["status"].get("restartCount") or 0) == 0  # a bad source is not retried


def test_a_child_the_api_server_rejects_becomes_a_condition_and_an_event(
    api_client: client.ApiClient, operator: str, volumes
):
    """Admitted, but the Job it yields is invalid (affinity is passed through as given): the
    run says so in InvalidChild and a Warning event; fixing the spec clears it."""
    namespace = operator
    core = client.CoreV1Api(api_client)
    finished_dataset(api_client, namespace, "corpus")
    bogus = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Near"}]}]
            }
        }
    }
    create(api_client, namespace, training_run(scheduling={**HOLD_SCHEDULING, "affinity": bogus}))

    def invalid() -> dict[str, Any] | None:
        return condition(get(api_client, namespace, "TrainingRun", RUN), "InvalidChild")

    wait_for("InvalidChild", lambda: (invalid() or {}).get("status") == "True", 60)
    found = invalid()
    assert found is not None and f"Job '{RUN}-workers-0'" in found["message"]
    assert "Near" in found["message"]  # the API server's own words

    def warnings() -> int:
        events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={RUN}")
        found = [e for e in events.items if e.reason == "InvalidChild"]
        assert all(e.type == "Warning" for e in found)
        return sum(e.count or 1 for e in found)

    wait_for("a Warning event", lambda: warnings() > 0, 30)
    told = warnings()
    time.sleep(5)  # five reconciles later (1 s interval in tests): not one event per retry
    assert warnings() == told

    client.CustomObjectsApi(api_client).patch_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "trainingruns", RUN,
        {"spec": {"scheduling": {"affinity": None}}},
    )  # fmt: skip
    wait_for("InvalidChild cleared", lambda: (invalid() or {}).get("status") == "False", 60)
    assert gang_pods(core, namespace, f"{RUN}-workers-0")  # the gang now exists


def test_a_gang_that_cannot_be_created_says_why(
    api_client: client.ApiClient, operator: str, volumes
):
    """A missing PriorityClass: the Job controller cannot create the pods and says so only in
    FailedCreate events; the run's Running condition carries that message."""
    namespace = operator
    finished_dataset(api_client, namespace, "corpus")
    scheduling = {**HOLD_SCHEDULING, "priorityClassName": "no-such-priority"}
    create(api_client, namespace, training_run(scheduling=scheduling))

    def running() -> dict[str, Any]:
        return condition(get(api_client, namespace, "TrainingRun", RUN), "Running") or {}

    wait_for("GangNotSchedulable", lambda: running().get("reason") == "GangNotSchedulable", 60)
    message = running()["message"]
    assert message.startswith("0/2 pods running: Job:") and "no-such-priority" in message
    assert get(api_client, namespace, "TrainingRun", RUN)["status"]["phase"] == "Pending"
