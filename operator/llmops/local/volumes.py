"""Pod volumes as folders under the state directory, and the mount table that maps container
paths (/etc/llmops, /data, /output, /checkpoints, /model, /tmp, ...) to them.

| volume source         | host folder                                               |
|-----------------------|-----------------------------------------------------------|
| persistentVolumeClaim | <state>/volumes/<namespace>/<claim>            (kept)     |
| emptyDir              | <state>/pods/<namespace>/<pod>/volumes/<name>  (fresh)    |
| configMap             | <state>/pods/<namespace>/<pod>/configmaps/<name> (files)  |
| secret                | <state>/pods/<namespace>/<pod>/secrets/<name>  (0600)     |
| hostPath              | the path itself                                           |
"""

from __future__ import annotations

import posixpath
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.local.state import Layout


@dataclass(frozen=True)
class Mount:
    container_path: str
    host_path: Path
    source: str  # persistentVolumeClaim, emptyDir, configMap, secret, hostPath
    volume: str
    read_only: bool = False


@dataclass(frozen=True)
class MountTable:
    mounts: tuple[Mount, ...]

    def host_path(self, container_path: str) -> str | None:
        """The host path of a container path under a mount (longest mount first), else None."""
        if not container_path.startswith("/"):
            return None
        normalized = posixpath.normpath(container_path)
        for mount in sorted(self.mounts, key=lambda m: -len(m.container_path)):
            base = mount.container_path.rstrip("/") or "/"
            if normalized == base:
                return str(mount.host_path)
            if normalized.startswith(base + "/"):
                return str(mount.host_path / normalized[len(base) + 1 :])
        return None


def mount_table(
    pod_spec: Mapping[str, Any],
    container: Mapping[str, Any],
    layout: Layout,
    namespace: str,
    pod_name: str,
) -> MountTable:
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    mounts: list[Mount] = []
    pod_dir = layout.pod_dir(namespace, pod_name)
    for entry in container.get("volumeMounts") or []:
        name = entry["name"]
        if name not in volumes:
            raise ValueError(f"volumeMount {name!r} refers to no volume of the pod")
        volume = volumes[name]
        if "persistentVolumeClaim" in volume:
            source = "persistentVolumeClaim"
            host = layout.volume(namespace, volume[source]["claimName"])
        elif "emptyDir" in volume:
            source, host = "emptyDir", pod_dir / "volumes" / name
        elif "configMap" in volume:
            source, host = "configMap", pod_dir / "configmaps" / name
        elif "secret" in volume:
            source, host = "secret", pod_dir / "secrets" / name
        elif "hostPath" in volume:
            source, host = "hostPath", Path(volume["hostPath"]["path"])
        else:
            kind = next((k for k in volume if k != "name"), "?")
            raise ValueError(f"volume {name!r}: {kind} volumes are not supported locally")
        if entry.get("subPath"):
            host = host / entry["subPath"]
        mounts.append(
            Mount(
                container_path=entry["mountPath"],
                host_path=host,
                source=source,
                volume=name,
                read_only=bool(entry.get("readOnly")),
            )
        )
    return MountTable(tuple(mounts))


def materialize(
    table: MountTable,
    pod_spec: Mapping[str, Any],
    configmaps: Mapping[str, Mapping[str, Any]],
    secrets: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Create the folders: emptyDirs start empty, ConfigMap and Secret files are written from
    the ConfigMaps and Secrets (with `items` honoured; a Secret's files readable by this
    user only), claims keep what earlier pods wrote."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    for mount in table.mounts:
        if mount.source == "emptyDir":
            shutil.rmtree(mount.host_path, ignore_errors=True)
            mount.host_path.mkdir(parents=True)
        elif mount.source == "configMap":
            ref = volumes[mount.volume]["configMap"]
            config = configmaps.get(ref["name"])
            if config is None:
                raise ValueError(f"volume {mount.volume!r}: ConfigMap {ref['name']!r} not found")
            shutil.rmtree(mount.host_path, ignore_errors=True)
            mount.host_path.mkdir(parents=True)
            data: Mapping[str, str] = config.get("data") or {}
            items = ref.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                target = mount.host_path / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[item["key"]])
        elif mount.source == "secret":
            ref = volumes[mount.volume]["secret"]
            values = (secrets or {}).get(ref["secretName"])
            if values is None:
                raise ValueError(
                    f"volume {mount.volume!r}: Secret {ref['secretName']!r} is not among the "
                    "manifests (give it in the same files to run locally)"
                )
            shutil.rmtree(mount.host_path, ignore_errors=True)
            mount.host_path.mkdir(parents=True, mode=0o700)
            items = ref.get("items") or [{"key": k, "path": k} for k in values]
            for item in items:
                target = mount.host_path / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                target.touch(mode=0o600)
                target.write_text(values[item["key"]])
        elif mount.source == "persistentVolumeClaim":
            mount.host_path.mkdir(parents=True, exist_ok=True)
