"""Pieces every workload pod shares: a restricted security context, resources, scheduling."""

from __future__ import annotations

from typing import Any

from llmops import config
from llmops.api.common import Resources, Scheduling
from llmops.config import DEFAULT_TRAINER_IMAGE as DEFAULT_TRAINER_IMAGE

# Pods run as this non-root user; the images create it.
RUN_AS_USER = 65532
# Taints cloud providers put on spot/preemptible nodes.
SPOT_TOLERATIONS = [
    {"key": "cloud.google.com/gke-spot", "operator": "Exists", "effect": "NoSchedule"},
    {
        "key": "kubernetes.azure.com/scalesetpriority",
        "operator": "Equal",
        "value": "spot",
        "effect": "NoSchedule",
    },
    {
        "key": "eks.amazonaws.com/capacityType",
        "operator": "Equal",
        "value": "SPOT",
        "effect": "NoSchedule",
    },
]


def spot_tolerations() -> list[dict[str, Any]]:
    """The operator's spot tolerations (Helm value `spot.tolerations`), else the usual ones."""
    return list(config.current().spot_tolerations) or SPOT_TOLERATIONS


def trainer_image(resources: Resources) -> str:
    """The spec's image, else the one the operator was deployed with."""
    return resources.image or config.current().trainer_image


def pod_security_context() -> dict[str, Any]:
    """Passes the `restricted` Pod Security Standard."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,  # volumes writable by the pod's user
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def container_resources(resources: Resources, gpus: int = 0) -> dict[str, Any]:
    """Requests equal limits (Guaranteed QoS) for what the spec sets."""
    limits: dict[str, str] = {}
    if resources.cpu is not None:
        limits["cpu"] = str(resources.cpu)
    if resources.memory is not None:
        limits["memory"] = str(resources.memory)
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(limits), "limits": limits} if limits else {}


def scratch_volumes() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Writable /tmp and a RAM-backed /dev/shm (torch workers and NCCL need it) on a
    read-only root filesystem."""
    volumes = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    return volumes, mounts


def scheduling_fields(scheduling: Scheduling) -> dict[str, Any]:
    """Pod spec fields for placement, copied from the spec."""
    fields: dict[str, Any] = {}
    if scheduling.node_selector:
        fields["nodeSelector"] = dict(scheduling.node_selector)
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in scheduling.tolerations]
    if scheduling.spot:
        tolerations += spot_tolerations()
        spot_nodes = config.current().spot_node_selector
        fields["nodeSelector"] = {**spot_nodes, **fields.get("nodeSelector", {})}
        if not fields["nodeSelector"]:
            del fields["nodeSelector"]
    if tolerations:
        fields["tolerations"] = tolerations
    if scheduling.affinity:
        fields["affinity"] = scheduling.affinity
    if scheduling.priority_class_name:
        fields["priorityClassName"] = scheduling.priority_class_name
    return fields


def queue_labels(scheduling: Scheduling) -> dict[str, str]:
    """Kueue admits workloads through the queue named by this label."""
    return {"kueue.x-k8s.io/queue-name": scheduling.queue_name} if scheduling.queue_name else {}
