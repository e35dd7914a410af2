"""Cluster networking on one machine: Service and pod DNS names resolve to loopback, and
container ports (which would be per pod on a cluster) become free ports on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import Iterable

LOOPBACK = "127.0.0.1"
CLUSTER_DOMAIN = "cluster.local"


def service_names(service: str, namespace: str) -> set[str]:
    """Every name a pod may use for a Service: short, namespaced, .svc and fully qualified."""
    return {
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.{CLUSTER_DOMAIN}",
    }


def pod_names(job: str, service: str, namespace: str, completions: int) -> set[str]:
    """The stable names of an Indexed Job's pods behind a headless Service
    (`<job>-<index>.<service>.<namespace>.svc`), in all their forms."""
    names: set[str] = set()
    for index in range(completions):
        names |= {f"{job}-{index}.{name}" for name in service_names(service, namespace)}
    return names


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def allocate(container_ports: Iterable[int], prefer_same: Iterable[int] = ()) -> dict[int, int]:
    """A free local port for each container port; ports in `prefer_same` keep their number
    when it is free (a served API on its usual port)."""
    keep = set(prefer_same)
    mapping: dict[int, int] = {}
    for port in container_ports:
        if port in mapping:
            continue
        mapping[port] = port if port in keep and port_is_free(port) else free_port()
    return mapping
