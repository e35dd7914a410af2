"""The Dataset controller on the real control plane: the chain of slice, dedup, prepare,
tokenize and finalize Jobs, status from the finalize step's report, versions on spec change,
failure reporting (naming the stage), retain policy."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from kubelet import HOLD_SCHEDULING, condition, create, end_pod, get, wait_phase, wait_status
from kubernetes import client

from controlplane import wait_for

NAME = "corpus"


def dataset(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": NAME},
        "spec": {
            "sources": [{"name": "books", "path": "data/books.txt"}],
            "tokenizer": {"train": {"vocabSize": 1024}},
            "parallelism": 3,
            **spec,
        },
    }


def stage_pods(
    core: client.CoreV1Api, namespace: str, stage: str, phase: str | None = None
) -> list[Any]:
    """The pods of a Dataset stage's Job (in `phase`, when given)."""
    found = core.list_namespaced_pod(namespace, label_selector=f"llmops.dev/stage={stage}")
    return [p for p in found.items if phase is None or p.status.phase == phase]


def crash(core: client.CoreV1Api, namespace: str, pod: str) -> None:
    """The pod's container fails, unless the Job controller removed the pod meanwhile."""
    with contextlib.suppress(client.exceptions.NotFoundException):
        end_pod(core, namespace, pod, exit_code=1)


def test_stage_chain_then_succeeded(api_client: client.ApiClient, operator: str, volumes):
    namespace = operator
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    create(api_client, namespace, dataset())

    done = wait_phase(api_client, namespace, "Dataset", NAME, "Succeeded")
    assert condition(done, "Complete")["status"] == "True"
    assert done["status"]["outputUri"] == f"pvc://{NAME}-data/g1"
    assert done["status"]["tokenizerUri"] == f"pvc://{NAME}-data/g1/tokenizer.json"
    slices = batch.read_namespaced_job(f"{NAME}-slices-g1", namespace)
    assert (slices.spec.completion_mode, slices.spec.completions) == ("Indexed", 3)
    assert slices.status.succeeded == 3
    dedup = batch.read_namespaced_job(f"{NAME}-dedup-g1", namespace)
    assert (dedup.spec.completion_mode, dedup.spec.completions) == ("Indexed", 3)
    assert dedup.spec.template.spec.containers[0].command[-2:] == ["--stage", "dedup"]
    assert dedup.status.succeeded == 3
    stages = {s["name"]: s for s in done["status"]["stages"]}
    assert list(stages) == ["slice", "dedup", "prepare", "tokenize", "finalize"]
    assert [s["state"] for s in stages.values()] == ["Complete"] * 5
    assert stages["dedup"]["succeeded"] == 3 and stages["tokenize"]["succeeded"] == 3
    assert stages["finalize"]["job"] == f"{NAME}-finalize-g1"
    tokenize = batch.read_namespaced_job(f"{NAME}-tokenize-g1", namespace)
    assert (tokenize.spec.completion_mode, tokenize.spec.completions) == ("Indexed", 3)
    assert tokenize.spec.template.spec.containers[0].command[-2:] == ["--stage", "tokenize"]
    prepare = batch.read_namespaced_job(f"{NAME}-prepare-g1", namespace)
    assert prepare.spec.completions == 1
    final = batch.read_namespaced_job(f"{NAME}-finalize-g1", namespace)
    container = final.spec.template.spec.containers[0]
    assert container.command[-2:] == ["--stage", "finalize"]
    env = {e.name: e.value for e in container.env}
    assert env["LLMOPS_OUTPUT_DIR"] == "/output/g1"
    assert env["LLMOPS_NUM_SLICES"] == "3"
    config = json.loads(
        core.read_namespaced_config_map(f"{NAME}-data-config", namespace).data["dataset.json"]
    )
    assert config["spec"]["parallelism"] == 3
    claim = core.read_namespaced_persistent_volume_claim(f"{NAME}-data", namespace)
    assert not claim.metadata.owner_references  # retainPolicy Retain (the default)

    # A spec change makes version 2, in its own folder; version 1's output is left alone.
    client.CustomObjectsApi(api_client).patch_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "datasets", NAME, {"spec": {"parallelism": 2}}
    )
    second = wait_status(
        api_client,
        namespace,
        "Dataset",
        NAME,
        "version 2 done",
        phase="Succeeded",
        observedGeneration=2,
    )
    assert second["status"]["outputUri"] == f"pvc://{NAME}-data/g2"
    wait_for(
        "version 1 jobs removed",
        lambda: (
            {j.metadata.name for j in batch.list_namespaced_job(namespace).items}
            == {
                f"{NAME}-{stage}-g2"
                for stage in ("slices", "dedup", "prepare", "tokenize", "finalize")
            }
        ),
        60,
    )


def test_finalize_report_becomes_status(api_client: client.ApiClient, operator: str, volumes):
    namespace = operator
    core = client.CoreV1Api(api_client)
    create(api_client, namespace, dataset(parallelism=1))
    wait_for(
        "finalize pod",
        lambda: (
            core.list_namespaced_pod(namespace, label_selector=f"job-name={NAME}-finalize-g1").items
        ),
        60,
    )
    # kwok completes the pod without a message; write the one the engine leaves.
    pod = core.list_namespaced_pod(namespace, label_selector=f"job-name={NAME}-finalize-g1").items[
        0
    ]
    report = {
        "documents": 900,
        "totalTokens": 123456,
        "fingerprint": "ab" * 32,
        "tokens": {"train": 111111, "validation": 6000, "test": 6345},
        "steps": [{"name": "dedup-exact", "documentsIn": 1000, "documentsOut": 950}],
        "exactDuplicateRatio": 0.05,
        "languages": {"en": 1.0},
        "vocabSize": 1024,
        "somethingNew": "dropped",
    }
    statuses = [
        {
            "name": "finalize",
            "image": "x",
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": {
                "terminated": {
                    "exitCode": 0,
                    "reason": "Completed",
                    "message": json.dumps(report),
                    "startedAt": "2026-01-01T00:00:00Z",
                    "finishedAt": "2026-01-01T00:00:00Z",
                }
            },
        }
    ]
    core.patch_namespaced_pod_status(
        pod.metadata.name,
        namespace,
        {"status": {"phase": "Succeeded", "containerStatuses": statuses}},
    )

    done = wait_phase(api_client, namespace, "Dataset", NAME, "Succeeded")
    status = done["status"]
    assert (status["documents"], status["totalTokens"], status["vocabSize"]) == (900, 123456, 1024)
    assert status["tokens"]["validation"] == 6000
    assert status["steps"] == [{"name": "dedup-exact", "documentsIn": 1000, "documentsOut": 950}]
    assert status["fingerprint"] == "ab" * 32
    assert "somethingNew" not in status


def test_failed_slice_fails_the_dataset_with_the_reason(
    api_client: client.ApiClient, operator: str, volumes
):
    namespace = operator
    core = client.CoreV1Api(api_client)
    create(api_client, namespace, dataset(parallelism=2, scheduling=HOLD_SCHEDULING))

    def fail_running_slices() -> bool:
        # Every try of every slice crashes, as a broken input would make it.
        for pod in stage_pods(core, namespace, "slice", "Running"):
            crash(core, namespace, pod.metadata.name)
        return (get(api_client, namespace, "Dataset", NAME).get("status") or {}).get(
            "phase"
        ) == "Failed"

    wait_for("Dataset failed", fail_running_slices, 90)
    failed = get(api_client, namespace, "Dataset", NAME)
    assert condition(failed, "Failed")["reason"] == "SliceFailed"
    assert failed["status"]["conditions"]


def test_each_stage_waits_for_the_one_before_and_a_failed_stage_is_named(
    api_client: client.ApiClient, operator: str, volumes
):
    namespace = operator
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    create(api_client, namespace, dataset(parallelism=2, scheduling=HOLD_SCHEDULING))

    def running(stage: str) -> list[str]:
        return [p.metadata.name for p in stage_pods(core, namespace, stage, "Running")]

    wait_for("slice pods running", lambda: len(running("slice")) == 2, 60)
    status = wait_status(api_client, namespace, "Dataset", NAME, "slicing", stage="slice")["status"]
    assert [s["state"] for s in status["stages"]] == ["Running"] + ["Pending"] * 4
    jobs = {j.metadata.name for j in batch.list_namespaced_job(namespace).items}
    assert jobs == {f"{NAME}-slices-g1"}  # nothing after the slices before they complete
    end_pod(core, namespace, running("slice")[0], exit_code=0)
    wait_for("one slice done", lambda: len(running("slice")) == 1, 30)
    assert f"{NAME}-dedup-g1" not in {
        j.metadata.name for j in batch.list_namespaced_job(namespace).items
    }
    end_pod(core, namespace, running("slice")[0], exit_code=0)

    wait_for("dedup pods running", lambda: len(running("dedup")) == 2, 60)
    status = wait_status(api_client, namespace, "Dataset", NAME, "deduplicating", stage="dedup")[
        "status"
    ]
    assert condition({"status": status}, "Running")["reason"] == "Deduplicating"

    def fail_dedup_pods() -> bool:  # every try of a dedup group crashes
        for name in running("dedup"):
            crash(core, namespace, name)
        return (get(api_client, namespace, "Dataset", NAME).get("status") or {}).get(
            "phase"
        ) == "Failed"

    wait_for("Dataset failed", fail_dedup_pods, 90)
    failed = get(api_client, namespace, "Dataset", NAME)
    assert condition(failed, "Failed")["reason"] == "DedupFailed"
    assert condition(failed, "Failed")["message"].startswith("stage dedup: ")
    assert failed["status"]["stage"] == "dedup"
    assert [s["state"] for s in failed["status"]["stages"]] == [
        "Complete",
        "Failed",
        "Pending",
        "Pending",
        "Pending",
    ]
    events = core.list_namespaced_event(namespace).items
    assert any(e.reason == "DedupFailed" and e.type == "Warning" for e in events)
    jobs = {j.metadata.name for j in batch.list_namespaced_job(namespace).items}
    assert f"{NAME}-prepare-g1" not in jobs


def test_a_failed_piece_is_retried_alone(api_client: client.ApiClient, operator: str, volumes):
    """A tokenize pod that crashes once is replaced for its index only; the other pieces
    are not redone, and the version still succeeds."""
    namespace = operator
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    create(api_client, namespace, dataset(parallelism=2, scheduling=HOLD_SCHEDULING))
    index_key = "batch.kubernetes.io/job-completion-index"

    def pods(stage: str) -> list[Any]:
        return stage_pods(core, namespace, stage)

    def running(stage: str) -> list[Any]:
        return stage_pods(core, namespace, stage, "Running")

    def finish(stage: str, count: int) -> None:
        wait_for(f"{stage} pods running", lambda: len(running(stage)) == count, 60)
        for pod in running(stage):
            end_pod(core, namespace, pod.metadata.name, exit_code=0)

    finish("slice", 2)
    finish("dedup", 2)
    finish("prepare", 1)
    wait_for("tokenize pods running", lambda: len(running("tokenize")) == 2, 60)
    first, second = sorted(running("tokenize"), key=lambda p: p.metadata.annotations[index_key])
    end_pod(core, namespace, first.metadata.name, exit_code=1)  # index 0 crashes once
    end_pod(core, namespace, second.metadata.name, exit_code=0)

    def retried() -> list[Any]:
        return [
            p
            for p in running("tokenize")
            if p.metadata.annotations[index_key] == "0" and p.metadata.name != first.metadata.name
        ]

    wait_for("index 0 retried", lambda: bool(retried()), 60)
    status = get(api_client, namespace, "Dataset", NAME)["status"]
    assert status["phase"] == "Running" and status["stage"] == "tokenize"
    end_pod(core, namespace, retried()[0].metadata.name, exit_code=0)
    finish("finalize", 1)
    done = wait_phase(api_client, namespace, "Dataset", NAME, "Succeeded")
    tokenize = batch.read_namespaced_job(f"{NAME}-tokenize-g1", namespace)
    assert (tokenize.status.succeeded, tokenize.status.failed) == (2, 1)
    by_index: dict[str, int] = {}
    for pod in pods("tokenize"):
        index = pod.metadata.annotations[index_key]
        by_index[index] = by_index.get(index, 0) + 1
    assert by_index == {"0": 2, "1": 1}  # only the crashed piece ran again
    stages = {s["name"]: s for s in done["status"]["stages"]}
    assert (stages["tokenize"]["succeeded"], stages["tokenize"]["failed"]) == (2, 1)


def test_delete_policy_removes_the_claim_with_the_dataset(
    api_client: client.ApiClient, operator: str, volumes
):
    namespace = operator
    core = client.CoreV1Api(api_client)
    create(api_client, namespace, dataset(retainPolicy="Delete", parallelism=1))
    wait_phase(api_client, namespace, "Dataset", NAME, "Succeeded")
    claim = core.read_namespaced_persistent_volume_claim(f"{NAME}-data", namespace)
    assert claim.metadata.owner_references[0].kind == "Dataset"
    client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "datasets", NAME
    )

    def claim_gone() -> bool:
        claims = core.list_namespaced_persistent_volume_claim(namespace).items
        return all(
            c.metadata.name != f"{NAME}-data" or c.metadata.deletion_timestamp for c in claims
        )

    wait_for("claim deleted", claim_gone, 60)
