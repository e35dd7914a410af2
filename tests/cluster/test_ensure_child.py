"""The shared create-or-converge path against the real API server."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from llmops.builders.common import child_metadata
from llmops.controllers.kube import ChildConflict, Kube


def _owner(api_client: client.ApiClient, namespace: str) -> dict[str, Any]:
    created = client.CoreV1Api(api_client).create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="demo"))
    )
    return {
        "apiVersion": "v1",
        "kind": "TrainingRun",  # labels as a TrainingRun would
        "metadata": {"name": "demo", "namespace": namespace, "uid": created.metadata.uid},
    }


def _children(owner: dict[str, Any]) -> list[dict[str, Any]]:
    owner_ref = {**owner, "kind": "ConfigMap"}  # the stand-in owner is a ConfigMap
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(owner, "config", "training"),
        "data": {"config.json": "{}"},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(owner, "headless", "training"),
        "spec": {
            "clusterIP": "None",
            "selector": {"llmops.dev/training-run": "demo"},
            "ports": [{"name": "rendezvous", "port": 29500}],
        },
    }
    for child in (config, service):
        child["metadata"]["ownerReferences"][0]["kind"] = owner_ref["kind"]
    return [config, service]


def test_restarted_operator_creates_only_what_is_missing(
    api_client: client.ApiClient, namespace: str
):
    config, service = _children(_owner(api_client, namespace))
    first, created = Kube(api_client).ensure(config)
    assert created
    # The operator dies here, before the Service; a new process reconciles from scratch.
    restarted = Kube(api_client)
    again, created_again = restarted.ensure(config)
    assert not created_again
    assert restarted.ensure(service).created

    assert again["metadata"]["uid"] == first["metadata"]["uid"]
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    core = client.CoreV1Api(api_client)
    selector = "llmops.dev/training-run=demo"
    assert [
        c.metadata.name
        for c in core.list_namespaced_config_map(namespace, label_selector=selector).items
    ] == ["demo-config"]
    assert [
        s.metadata.name
        for s in core.list_namespaced_service(namespace, label_selector=selector).items
    ] == ["demo-headless"]


def test_drifted_child_is_converged_unless_immutable(api_client: client.ApiClient, namespace: str):
    config, _ = _children(_owner(api_client, namespace))
    kube = Kube(api_client)
    kube.ensure(config)
    core = client.CoreV1Api(api_client)
    core.patch_namespaced_config_map("demo-config", namespace, {"data": {"config.json": "drift"}})

    untouched = kube.ensure(config, update=False).object
    assert untouched["data"] == {"config.json": "drift"}
    converged = kube.ensure(config).object
    assert converged["data"] == {"config.json": "{}"}


def test_a_foreign_object_with_the_child_name_is_never_adopted(
    api_client: client.ApiClient, namespace: str
):
    config, _ = _children(_owner(api_client, namespace))
    core = client.CoreV1Api(api_client)
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="demo-config"), data={"mine": "yes"}),
    )

    with pytest.raises(ChildConflict, match="not controlled by this resource"):
        Kube(api_client).ensure(config)
    kept = core.read_namespaced_config_map("demo-config", namespace)
    assert kept.data == {"mine": "yes"} and not kept.metadata.owner_references
