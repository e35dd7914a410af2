"""Every manifest in examples/ applied together to one namespace, as a user following the
README would (server-side apply, the Secrets they name created first), and every resource
checked to reach the state its example documents for a cluster where nothing can run yet.

kwok's nodes are cordoned for the test: no pod starts, so each resource must show what it
waits for, by name, instead of failing or looking idle. Then the Datasets are marked
processed (as their merge pod would) and the next layer moves: TrainingRuns create their
gangs and say why the pods cannot run, Sweeps create their trials, schedules start runs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelet import GROUP, VERSION, condition, custom, get, mark_processed
from kubernetes import client
from kubernetes.dynamic import DynamicClient

from controlplane import wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Secrets the examples name (their comments tell users to create them).
SECRETS = {
    "crawl-s3-credentials": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"},
    "checkpoints-s3-credentials": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"},
    "gpt-125m-api": {"token": "s3cret"},
}

# Claims the examples read from (the user's own corpus volume).
CLAIMS = ("corpora",)


def example_documents() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def test_no_two_examples_name_the_same_resource() -> None:
    """Applied together (`kubectl apply -f examples/`) the later would overwrite the earlier."""
    names = Counter((doc["kind"], doc["metadata"]["name"]) for doc in example_documents())
    assert [key for key, count in names.items() if count > 1] == []


@pytest.fixture
def cordoned(api_client: client.ApiClient) -> Iterator[None]:
    """No node takes new pods for the test (restored afterwards for the other tests)."""
    core = client.CoreV1Api(api_client)
    nodes = [n.metadata.name for n in core.list_node().items]
    for name in nodes:
        core.patch_node(name, {"spec": {"unschedulable": True}})
    yield
    for name in nodes:
        core.patch_node(name, {"spec": {"unschedulable": False}})


def apply_examples(api_client: client.ApiClient, namespace: str) -> list[dict[str, Any]]:
    core = client.CoreV1Api(api_client)
    for name, data in SECRETS.items():
        core.create_namespaced_secret(
            namespace, client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data=data)
        )
    for name in CLAIMS:
        core.create_namespaced_persistent_volume_claim(
            namespace,
            client.V1PersistentVolumeClaim(
                metadata=client.V1ObjectMeta(name=name),
                spec=client.V1PersistentVolumeClaimSpec(
                    access_modes=["ReadWriteMany"],
                    resources=client.V1VolumeResourceRequirements(requests={"storage": "1Gi"}),
                ),
            ),
        )
    dynamic = DynamicClient(api_client)
    documents = example_documents()
    for doc in documents:
        resource = dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        resource.server_side_apply(
            body=doc,
            name=doc["metadata"]["name"],
            namespace=namespace,
            field_manager="kubectl",
        )
    return documents


def state(api_client: client.ApiClient, namespace: str, kind: str, name: str) -> str:
    """`phase reason-of-each-condition` for messages."""
    status = get(api_client, namespace, kind, name).get("status") or {}
    conditions = status.get("conditions", [])
    reasons = ",".join(f"{c['type']}={c['status']}:{c['reason']}" for c in conditions)
    return f"{kind}/{name} {status.get('phase')} {reasons}"


def reason(api_client: client.ApiClient, namespace: str, kind: str, name: str, type_: str) -> str:
    found = condition(get(api_client, namespace, kind, name), type_) or {}
    return f"{found.get('status')}:{found.get('reason')}"


def test_all_examples_applied_together_reach_their_documented_states(
    api_client: client.ApiClient, operator: str, volumes: None, cordoned: None
) -> None:
    namespace = operator
    documents = apply_examples(api_client, namespace)
    objects = [(doc["kind"], doc["metadata"]["name"]) for doc in documents]
    datasets = [name for kind, name in objects if kind == "Dataset"]
    runs = [name for kind, name in objects if kind == "TrainingRun"]
    deployments = [name for kind, name in objects if kind == "ModelDeployment"]
    sweeps = [name for kind, name in objects if kind == "Sweep"]
    schedules = [name for kind, name in objects if kind == "TrainingSchedule"]
    assert datasets and runs and deployments and sweeps and schedules

    def everyone(check: Any) -> bool:
        return all(check(kind, name) for kind, name in objects)

    def settled(kind: str, name: str) -> bool:
        status = get(api_client, namespace, kind, name).get("status") or {}
        return bool(status.get("phase")) and status.get("observedGeneration") == 1

    try:
        wait_for("every example has a status", lambda: everyone(settled), 90)
    finally:
        print("\n".join(state(api_client, namespace, k, n) for k, n in objects))

    # Nothing can run yet, and nothing is refused or failed for it.
    for kind, name in objects:
        status = get(api_client, namespace, kind, name)["status"]
        assert status["phase"] != "Failed", state(api_client, namespace, kind, name)
        for bad in ("InvalidChild", "Failed"):
            assert (condition({"status": status}, bad) or {}).get("status") != "True", state(
                api_client, namespace, kind, name
            )

    def waits_as_documented(kind: str, name: str) -> bool:
        expected = {
            "Dataset": ("Running", {"False:SlicesNotSchedulable"}),
            "TrainingRun": ("Created", {"False:WaitingForDataset"}),
            "ModelDeployment": ("Available", {"False:WaitingForModel", "False:WaitingForReplicas"}),
        }
        if kind not in expected:
            return True
        if kind == "Dataset" and "modelDeployment" in json.dumps(
            get(api_client, namespace, kind, name)["spec"]
        ):
            # It asks a ModelDeployment, which has no replica Available here.
            created = reason(api_client, namespace, kind, name, "Created")
            return created == "False:WaitingForModelDeployment"
        type_, reasons = expected[kind]
        return reason(api_client, namespace, kind, name, type_) in reasons

    try:
        wait_for("every example waits, saying for what", lambda: everyone(waits_as_documented), 60)
    finally:
        print("\n".join(state(api_client, namespace, k, n) for k, n in objects))
    for name in deployments:
        assert get(api_client, namespace, "ModelDeployment", name)["status"]["phase"] != "Ready"

    # The Datasets are processed: runs create their gangs and say why the pods cannot run,
    # the sweep's trials and the schedule's run appear, deployments still wait for a model.
    for name in datasets:
        mark_processed(api_client, namespace, name, fingerprint=f"{name}-v1", vocabSize=8192)

    def gang_waits(kind: str, name: str) -> bool:
        if kind != "TrainingRun":
            return True
        return reason(api_client, namespace, kind, name, "Created") == "True:GangCreated" and (
            reason(api_client, namespace, kind, name, "Running") == "False:GangNotSchedulable"
        )

    try:
        wait_for("every run's gang waits for nodes, saying why", lambda: everyone(gang_waits), 90)
    finally:
        print("\n".join(state(api_client, namespace, k, n) for k, n in objects))
    for name in runs:
        run = get(api_client, namespace, "TrainingRun", name)
        planned = condition(run, "Planned") or {}
        # The operator reads no model files: a pretrained model's size is unknown to it.
        pretrained = "pretrained" in run["spec"]["model"]
        assert (planned.get("reason") == "SizeUnknown") == pretrained, planned
        assert planned.get("message"), planned
    trials = custom(api_client).list_namespaced_custom_object(
        GROUP, VERSION, namespace, "trainingruns", label_selector="llmops.dev/sweep"
    )["items"]
    assert trials, "the sweep created no trial"

    def scheduled_runs() -> list[dict[str, Any]]:
        return [
            run
            for run in custom(api_client).list_namespaced_custom_object(
                GROUP, VERSION, namespace, "trainingruns"
            )["items"]
            if any(
                o["kind"] == "TrainingSchedule" for o in run["metadata"].get("ownerReferences", [])
            )
        ]

    # retraining.yaml retrains on every new Dataset version: the processed one starts a run.
    wait_for("the schedule started a run", lambda: bool(scheduled_runs()), 60)
    for name in deployments:
        assert reason(api_client, namespace, "ModelDeployment", name, "Available") in (
            "False:WaitingForModel",
            "False:WaitingForReplicas",
        ), state(api_client, namespace, "ModelDeployment", name)
