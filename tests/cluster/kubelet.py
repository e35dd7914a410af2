"""Test helpers that play the parts kwok leaves to the test: a finished Dataset, and pods
that end (succeed or crash) when the test says so, written as a kubelet would."""

from __future__ import annotations

from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from controlplane import HOLD_POOL_LABEL, HOLD_TOLERATION, wait_for

GROUP, VERSION = "llmops.dev", "v1alpha1"
PLURALS = {
    "Dataset": "datasets",
    "TrainingRun": "trainingruns",
    "ModelDeployment": "modeldeployments",
    "Sweep": "sweeps",
    "TrainingSchedule": "trainingschedules",
}
# Scheduling that puts workers on the hold pool, where pods run until a test ends them.
HOLD_SCHEDULING = {"nodeSelector": {HOLD_POOL_LABEL: "hold"}, "tolerations": [HOLD_TOLERATION]}


def custom(api_client: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


def create(api_client: client.ApiClient, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    plural = obj["kind"].lower() + "s"
    created: dict[str, Any] = custom(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, obj
    )
    return created


def get(api_client: client.ApiClient, namespace: str, kind: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = custom(api_client).get_namespaced_custom_object(
        GROUP, VERSION, namespace, kind.lower() + "s", name
    )
    return found


def claim(api_client: client.ApiClient, namespace: str, name: str) -> None:
    """A 1Gi ReadWriteMany PersistentVolumeClaim (the `volumes` fixture provides the PVs)."""
    client.CoreV1Api(api_client).create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )


def finished_dataset(api_client: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    """A Dataset whose processing is done: its output claim and the status its controller
    would write."""
    claim(api_client, namespace, f"{name}-data")
    create(api_client, namespace, small_dataset(name))
    return mark_processed(api_client, namespace, name)


def small_dataset(name: str) -> dict[str, Any]:
    """A Dataset of one local text file."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Dataset",
        "metadata": {"name": name},
        "spec": {
            "sources": [{"name": "local", "path": "data/corpus.txt"}],
            "tokenizer": {"train": {"vocabSize": 512}},
        },
    }


def mark_processed(
    api_client: client.ApiClient, namespace: str, name: str, **fields: Any
) -> dict[str, Any]:
    """The status the Dataset controller writes once the merge pod reported its output."""
    status = {
        "status": {
            "phase": "Succeeded",
            "conditions": [
                {
                    "type": "Complete",
                    "status": "True",
                    "reason": "Processed",
                    "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
            "outputUri": f"pvc://{name}-data/g1",
            "observedGeneration": 1,
            **fields,
        }
    }
    patched: dict[str, Any] = custom(api_client).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "datasets", name, status
    )
    return patched


def end_pod(
    core: client.CoreV1Api, namespace: str, name: str, exit_code: int, message: str = ""
) -> None:
    """The pod's container exits with `exit_code` (0 succeeds, anything else fails it),
    leaving `message` as its termination message."""
    pod = core.read_namespaced_pod(name, namespace)
    now = "2026-01-01T00:00:00Z"
    statuses = [
        {
            "name": c.name,
            "image": c.image,
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "started": False,
            "state": {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": "Completed" if exit_code == 0 else "Error",
                    "startedAt": now,
                    "finishedAt": now,
                    "message": message,
                }
            },
        }
        for c in pod.spec.containers
    ]
    core.patch_namespaced_pod_status(
        name,
        namespace,
        {
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": statuses,
                "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
            }
        },
    )


def fail_init_container(
    core: client.CoreV1Api, namespace: str, name: str, container: str, message: str
) -> None:
    """The pod's init container `container` exits 1 leaving `message`; the main containers
    never start (what the kubelet reports for a failed init container with restartPolicy
    Never)."""
    pod = core.read_namespaced_pod(name, namespace)
    now = "2026-01-01T00:00:00Z"
    terminated = {
        "exitCode": 1,
        "reason": "Error",
        "startedAt": now,
        "finishedAt": now,
        "message": message,
    }
    waiting = {"waiting": {"reason": "PodInitializing"}}
    core.patch_namespaced_pod_status(
        name,
        namespace,
        {
            "status": {
                "phase": "Failed",
                "initContainerStatuses": [
                    {"name": container, "image": c.image, "imageID": "", "ready": False,
                     "restartCount": 0, "state": {"terminated": terminated}}
                    for c in pod.spec.init_containers or [] if c.name == container
                ],
                "containerStatuses": [
                    {"name": c.name, "image": c.image, "imageID": "", "ready": False,
                     "restartCount": 0, "state": waiting}
                    for c in pod.spec.containers
                ],
            }
        },
    )  # fmt: skip


def wait_phase(
    api_client: client.ApiClient,
    namespace: str,
    kind: str,
    name: str,
    phase: str,
    timeout: float = 60,
) -> dict[str, Any]:
    def reached() -> bool:
        return (get(api_client, namespace, kind, name).get("status") or {}).get("phase") == phase

    wait_for(f"{kind} {name} phase {phase}", reached, timeout)
    return get(api_client, namespace, kind, name)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next(
        (c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None
    )


def wait_status(
    api_client: client.ApiClient, namespace: str, kind: str, name: str, what: str, **expected: Any
) -> dict[str, Any]:
    """Wait until every `expected` status field has its value."""

    def matches() -> bool:
        status = get(api_client, namespace, kind, name).get("status") or {}
        return all(status.get(k) == v for k, v in expected.items())

    wait_for(f"{kind} {name}: {what}", matches, 60)
    return get(api_client, namespace, kind, name)


def wait_crd_established(api_client: client.ApiClient, name: str) -> None:
    extensions = client.ApiextensionsV1Api(api_client)

    def established() -> bool:
        conditions = extensions.read_custom_resource_definition(name).status.conditions
        return any(c.type == "Established" and c.status == "True" for c in conditions or [])

    wait_for(f"CRD {name} established", established, 30)


def install_stand_in_crd(api_client: client.ApiClient, group: str, version: str, kind: str) -> None:
    """A third-party kind (KEDA, prometheus-operator) with its schema left open, standing in
    for the real CRD, which cannot be fetched here: objects of the kind are then checked for
    apiVersion, kind and metadata only."""
    plural = kind.lower() + "s"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }
    try:
        client.ApiextensionsV1Api(api_client).create_custom_resource_definition(crd)
    except ApiException as error:
        if error.status != 409:
            raise
    wait_crd_established(api_client, f"{plural}.{group}")
