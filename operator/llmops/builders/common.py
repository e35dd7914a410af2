"""Names, labels and owner references every child object carries."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llmops.api.workload import OWNER_LABELS, ROLE_LABEL

# The label each kind uses to point children at their owner.
OWNER_LABEL = OWNER_LABELS
MAX_NAME = 63  # DNS label: the strictest rule a child name may meet (Services, pod hostnames)


def child_name(owner_name: str, role: str) -> str:
    """Deterministic `<owner>-<role>`, so a restarted operator finds what it created."""
    name = f"{owner_name}-{role}"
    if len(name) > MAX_NAME:
        raise ValueError(
            f"child name {name!r} is longer than {MAX_NAME} characters; "
            f"shorten metadata.name ({owner_name!r})"
        )
    return name


def child_labels(
    owner: Mapping[str, Any], component: str, role: str | None = None
) -> dict[str, str]:
    kind = owner["kind"]
    name = owner["metadata"]["name"]
    labels = {
        "app.kubernetes.io/name": kind.lower(),
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "llmops",
        OWNER_LABEL[kind]: name,
    }
    if role is not None:
        labels[ROLE_LABEL] = role
    return labels


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """A controller owner reference: deleting the owner cascades to the child."""
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def user_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """A non-controlling owner reference: the garbage collector deletes an object only when
    all its owners are gone, so a user keeps what it uses alive."""
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": False,
        "blockOwnerDeletion": False,
    }


def child_metadata(
    owner: Mapping[str, Any], role: str, component: str, **labels: str
) -> dict[str, Any]:
    return {
        "name": child_name(owner["metadata"]["name"], role),
        "namespace": owner["metadata"]["namespace"],
        "labels": {**child_labels(owner, component, role), **labels},
        "ownerReferences": [owner_reference(owner)],
    }


def config_map(
    body: Mapping[str, Any], file_name: str, component: str, role: str = "config"
) -> dict[str, Any]:
    """`<name>-<role>` holding the resource itself as JSON: the workload parses it with the
    same API models, so a field cannot mean two things in two places. Each kind has its own
    role, so a Dataset, a TrainingRun and a ModelDeployment may share a name."""
    config = {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {
            k: body["metadata"][k]
            for k in ("name", "namespace", "uid", "generation")
            if k in body["metadata"]
        },
        "spec": body["spec"],
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(body, role, component),
        "data": {file_name: json.dumps(config, indent=2, sort_keys=True)},
    }
