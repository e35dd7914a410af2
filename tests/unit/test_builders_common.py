from __future__ import annotations

import pytest

from llmops.builders.common import child_metadata, child_name

OWNER = {
    "apiVersion": "llmops.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "demo", "namespace": "ml", "uid": "1234"},
}


def test_child_metadata_carries_name_labels_and_controller_reference():
    meta = child_metadata(OWNER, "workers", "training", **{"llmops.dev/replica-index": "0"})
    assert meta["name"] == "demo-workers"
    assert meta["namespace"] == "ml"
    assert meta["labels"] == {
        "app.kubernetes.io/name": "trainingrun",
        "app.kubernetes.io/instance": "demo",
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/managed-by": "llmops",
        "llmops.dev/training-run": "demo",
        "llmops.dev/role": "workers",
        "llmops.dev/replica-index": "0",
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "TrainingRun",
            "name": "demo",
            "uid": "1234",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def test_child_names_are_deterministic_and_bounded():
    assert child_name("demo", "headless") == child_name("demo", "headless") == "demo-headless"
    with pytest.raises(ValueError, match=r"shorten metadata\.name"):
        child_name("x" * 60, "headless")


def test_live_objects_with_server_defaults_still_match_their_manifest():
    from llmops.controllers.kube import _contains

    desired = {
        "metadata": {"name": "a", "labels": {"x": "1"}},
        "spec": {"ports": [{"name": "http", "port": 80}]},
    }
    live = {
        "metadata": {"name": "a", "labels": {"x": "1"}, "uid": "u", "resourceVersion": "7"},
        "spec": {
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "clusterIP": "10.0.0.3",
        },
        "status": {},
    }
    assert _contains(live, desired)
    drifted = {**live, "spec": {**live["spec"], "ports": [{"name": "http", "port": 81}]}}
    assert not _contains(drifted, desired)
    assert not _contains({"metadata": {"name": "a"}}, desired)
    extra_port = {**live, "spec": {"ports": [*live["spec"]["ports"], {"port": 9}]}}
    assert not _contains(extra_port, desired)
