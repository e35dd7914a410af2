"""Volumes for the Storage type: an existing claim, a claim the operator creates, or S3."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmops.api.common import Storage, VolumeStorage
from llmops.builders.common import child_metadata

DEFAULT_CLAIM_SIZE = "10Gi"


def effective_storage(storage: Storage | None) -> Storage:
    """Unset storage means a new claim of the default size."""
    return storage or Storage(volume=VolumeStorage(size=DEFAULT_CLAIM_SIZE))


def claim_name(owner_name: str, role: str, storage: Storage | None) -> str | None:
    """The claim the pods mount (None for S3)."""
    volume = effective_storage(storage).volume
    if volume is None:
        return None
    return volume.claim_name or f"{owner_name}-{role}"


def owned_claim(
    owner: Mapping[str, Any],
    role: str,
    component: str,
    storage: Storage | None,
    *,
    retain: bool = False,
) -> dict[str, Any] | None:
    """The PersistentVolumeClaim the operator creates, if the spec asks for a new one. A
    retained claim carries no owner reference, so deleting the owner leaves it (and the data)."""
    volume = effective_storage(storage).volume
    if volume is None or volume.claim_name is not None:
        return None
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"] if role == "data" else ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(volume.size)}},
    }
    if volume.storage_class_name:
        spec["storageClassName"] = volume.storage_class_name
    metadata = child_metadata(owner, role, component)
    if retain:
        del metadata["ownerReferences"]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": spec}


def parse_uri(value: str) -> tuple[str, str, str]:
    """`pvc://claim/path` -> ("pvc", "claim", "path"); `s3://bucket/prefix` likewise."""
    scheme, _, rest = value.partition("://")
    if scheme not in ("pvc", "s3") or not rest:
        raise ValueError(f"not a pvc:// or s3:// URI: {value!r}")
    location, _, path = rest.partition("/")
    return scheme, location, path


def uri(owner_name: str, role: str, storage: Storage | None) -> str:
    """`pvc://<claim>/<subPath>` or `s3://<bucket>/<prefix>`: where users find the files."""
    resolved = effective_storage(storage)
    if resolved.s3 is not None:
        return f"s3://{resolved.s3.bucket}/{resolved.s3.prefix or ''}".rstrip("/")
    sub_path = (resolved.volume.sub_path if resolved.volume else None) or ""
    return f"pvc://{claim_name(owner_name, role, storage)}/{sub_path}".rstrip("/")


def mount(
    name: str,
    owner_name: str,
    role: str,
    storage: Storage | None,
    path: str,
    *,
    read_only: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volume and mount for a claim-backed storage; nothing for S3 (the pod reads env)."""
    claim = claim_name(owner_name, role, storage)
    if claim is None:
        return [], []
    volume = {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}
    mount_: dict[str, Any] = {"name": name, "mountPath": path, "readOnly": read_only}
    resolved = effective_storage(storage).volume
    if resolved is not None and resolved.sub_path:
        mount_["subPath"] = resolved.sub_path
    return [volume], [mount_]


def read_only_volume(
    volume_name: str, uri: str, mount_path: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """Mount what a `pvc://claim/path` URI points at, read-only: (volumes, mounts, the path
    inside the container). An absolute path is already inside the image; an `s3://` URI has
    no volume, so the path is None and the pod gets the URI itself."""
    if uri.startswith("/"):
        return [], [], uri
    scheme, location, path = parse_uri(uri)
    if scheme == "s3":
        return [], [], None
    volume = {
        "name": volume_name,
        "persistentVolumeClaim": {"claimName": location, "readOnly": True},
    }
    mount = {"name": volume_name, "mountPath": mount_path, "readOnly": True}
    return [volume], [mount], f"{mount_path}/{path}".rstrip("/")
