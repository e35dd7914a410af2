"""Every kind can be deleted, with and without children: the resource goes at once (the
operator puts no finalizer on it) and its children are garbage-collected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kubelet import PLURALS, create, finished_dataset, get
from kubernetes import client

from controlplane import wait_for

ROOT = Path(__file__).resolve().parents[2]


def examples() -> list[dict[str, Any]]:
    """One of each kind, as users write them."""
    docs = []
    for name in ("dataset", "trainingrun", "modeldeployment", "sweep", "retraining"):
        docs += list(yaml.safe_load_all((ROOT / "examples" / f"{name}.yaml").read_text()))
    return docs


def children(api_client: client.ApiClient, namespace: str) -> list[str]:
    """Objects in the namespace that some resource owns."""
    found = []
    batch, core, apps = (
        client.BatchV1Api(api_client),
        client.CoreV1Api(api_client),
        client.AppsV1Api(api_client),
    )
    for listing in (
        batch.list_namespaced_job(namespace).items,
        core.list_namespaced_config_map(namespace).items,
        core.list_namespaced_service(namespace).items,
        apps.list_namespaced_deployment(namespace).items,
    ):
        found += [f"{o.kind or type(o).__name__}/{o.metadata.name}" for o in listing
                  if o.metadata.owner_references]  # fmt: skip
    # A Sweep's trials and a TrainingSchedule's runs are TrainingRuns it owns.
    runs = client.CustomObjectsApi(api_client).list_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "trainingruns"
    )["items"]
    found += [
        f"TrainingRun/{run['metadata']['name']}"
        for run in runs
        if run["metadata"].get("ownerReferences")
    ]
    return found


def test_every_kind_is_deleted_with_its_children(
    api_client: client.ApiClient, operator: str, volumes: None
) -> None:
    namespace = operator
    finished_dataset(api_client, namespace, "corpus")  # what the runs and trials train on
    created = [create(api_client, namespace, doc) for doc in examples()]
    kinds = {doc["kind"] for doc in created}
    assert kinds == set(PLURALS)

    def handled() -> bool:
        # The operator has reconciled each one (its status observed the spec).
        return all(
            "observedGeneration"
            in (
                get(api_client, namespace, doc["kind"], doc["metadata"]["name"]).get("status") or {}
            )
            for doc in created
        )

    wait_for("the operator took every resource", handled, 60)
    for doc in created:
        live = get(api_client, namespace, doc["kind"], doc["metadata"]["name"])
        assert not live["metadata"].get("finalizers"), live["metadata"]
    wait_for("children exist", lambda: bool(children(api_client, namespace)), 60)
    wait_for(
        "the sweep's first trial exists",
        lambda: any(c.startswith("TrainingRun/") for c in children(api_client, namespace)),
        60,
    )

    objects = client.CustomObjectsApi(api_client)
    for doc in created:
        objects.delete_namespaced_custom_object(
            "llmops.dev", "v1alpha1", namespace, PLURALS[doc["kind"]], doc["metadata"]["name"]
        )

    def gone() -> list[str]:
        left = []
        for doc in created:
            name = doc["metadata"]["name"]
            found = objects.list_namespaced_custom_object(
                "llmops.dev", "v1alpha1", namespace, PLURALS[doc["kind"]]
            )["items"]
            left += [f"{doc['kind']}/{name}" for o in found if o["metadata"]["name"] == name]
        return left

    wait_for("every resource gone", lambda: not gone(), 60)
    wait_for("children garbage-collected", lambda: not children(api_client, namespace), 90)


def test_a_served_checkpoint_claim_outlives_its_training_run(
    api_client: client.ApiClient, operator: str, volumes: None
) -> None:
    namespace = operator
    core = client.CoreV1Api(api_client)
    finished_dataset(api_client, namespace, "corpus")
    run = next(d for d in examples() if d["kind"] == "TrainingRun")
    run["spec"]["datasetRef"] = {"name": "corpus"}
    run["spec"]["checkpointing"]["storage"] = {"volume": {"size": "1Gi"}}
    name = run["metadata"]["name"]
    create(api_client, namespace, run)
    claim = f"{name}-checkpoints"

    def claim_exists() -> bool:
        return any(c.metadata.name == claim for c in core.list_namespaced_persistent_volume_claim(
            namespace).items)  # fmt: skip

    wait_for("the checkpoint claim", claim_exists, 60)
    deployment = {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "served"},
        "spec": {"model": {"uri": f"pvc://{claim}/output/model"}},
    }
    create(api_client, namespace, deployment)

    def owners() -> set[str]:
        found = core.read_namespaced_persistent_volume_claim(claim, namespace)
        return {o.kind for o in found.metadata.owner_references or []}

    wait_for(
        "the deployment keeps the claim", lambda: owners() == {"TrainingRun", "ModelDeployment"}, 60
    )
    objects = client.CustomObjectsApi(api_client)
    objects.delete_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "trainingruns", name
    )
    wait_for("the run gone", lambda: not objects.list_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "trainingruns")["items"], 60)  # fmt: skip
    # The garbage collector has dropped the run's reference; the claim stays for the server.
    wait_for("only the deployment owns it", lambda: owners() == {"ModelDeployment"}, 60)
    assert claim_exists()
    objects.delete_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "modeldeployments", "served"
    )
    wait_for("the claim collected with its last user", lambda: not claim_exists(), 90)


def test_the_finalizer_of_earlier_versions_is_taken_off(
    api_client: client.ApiClient, operator: str
) -> None:
    """Resources an earlier operator handled carry its finalizer: this one releases it, so
    deleting them does not wait for an operator."""
    from llmops.controllers.settings import FINALIZER

    namespace = operator
    finished_dataset(api_client, namespace, "corpus")
    run = next(d for d in examples() if d["kind"] == "TrainingRun")
    run["spec"]["datasetRef"] = {"name": "corpus"}
    run["metadata"]["finalizers"] = [FINALIZER, "example.com/kept"]
    name = run["metadata"]["name"]
    create(api_client, namespace, run)

    def finalizers() -> list[str]:
        return list(
            get(api_client, namespace, "TrainingRun", name)["metadata"].get("finalizers") or []
        )

    wait_for("the old finalizer released", lambda: finalizers() == ["example.com/kept"], 60)
    objects = client.CustomObjectsApi(api_client)
    objects.patch_namespaced_custom_object(
        "llmops.dev",
        "v1alpha1",
        namespace,
        "trainingruns",
        name,
        {"metadata": {"finalizers": None}},
    )
    objects.delete_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "trainingruns", name
    )
    wait_for("the run gone", lambda: not objects.list_namespaced_custom_object(
        "llmops.dev", "v1alpha1", namespace, "trainingruns")["items"], 30)  # fmt: skip
