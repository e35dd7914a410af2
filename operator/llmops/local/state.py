"""The state directory: where the local runtime keeps what a cluster would keep.

<state>/resources/<namespace>/<plural>/<name>/
    object.yaml        the resource with its status (what `kubectl get -o yaml` shows)
    children/          the child objects the operator's builders produced
    logs/<pod>.log     each process's output
    events.jsonl       condition transitions (what `kubectl describe` tells)
    *.md, *.png        dataset/model cards, training curve
<state>/volumes/<namespace>/<claim>/      PersistentVolumeClaims
<state>/pods/<namespace>/<pod>/           emptyDirs, ConfigMap files, termination message
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_STATE_DIR = ".llmops"
DEFAULT_NAMESPACE = "default"
PLURALS = {
    "Dataset": "datasets",
    "TrainingRun": "trainingruns",
    "ModelDeployment": "modeldeployments",
    "Sweep": "sweeps",
}
KINDS_BY_PLURAL = {plural: kind for kind, plural in PLURALS.items()}


@dataclass(frozen=True)
class Layout:
    root: Path

    def resource_dir(self, kind: str, namespace: str, name: str) -> Path:
        return self.root / "resources" / namespace / PLURALS[kind] / name

    def object_file(self, kind: str, namespace: str, name: str) -> Path:
        return self.resource_dir(kind, namespace, name) / "object.yaml"

    def log_file(self, kind: str, namespace: str, name: str, pod: str) -> Path:
        return self.resource_dir(kind, namespace, name) / "logs" / f"{pod}.log"

    def volume(self, namespace: str, claim: str) -> Path:
        return self.root / "volumes" / namespace / claim

    def pod_dir(self, namespace: str, pod: str) -> Path:
        return self.root / "pods" / namespace / pod


def uid_for(kind: str, namespace: str, name: str) -> str:
    """Stable across runs, so child objects and owner references read the same each time."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"llmops.dev/{kind}/{namespace}/{name}"))


def spec_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def write_atomic(path: Path, text: str) -> None:
    """Readers (`llmops status` while a run is going) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)


def load_object(layout: Layout, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    path = layout.object_file(kind, namespace, name)
    if not path.is_file():
        return None
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else None


def save_object(layout: Layout, body: Mapping[str, Any]) -> Path:
    meta = body["metadata"]
    path = layout.object_file(body["kind"], meta["namespace"], meta["name"])
    write_atomic(path, yaml.safe_dump(dict(body), sort_keys=False))
    return path


def adopt(layout: Layout, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest as the API server would hold it: namespace, uid and generation filled in;
    the status of an earlier run kept. A changed spec bumps the generation (a new version)."""
    meta = dict(manifest.get("metadata") or {})
    namespace = meta.get("namespace") or DEFAULT_NAMESPACE
    kind = manifest["kind"]
    previous = load_object(layout, kind, namespace, meta["name"]) or {}
    old_meta = previous.get("metadata") or {}
    generation = int(old_meta.get("generation") or 1)
    annotations = dict(old_meta.get("annotations") or {})
    digest = spec_hash(manifest.get("spec") or {})
    status = dict(previous.get("status") or {})
    if previous and annotations.get("llmops.dev/spec-hash") != digest:
        generation += 1
    annotations.update(meta.get("annotations") or {})
    annotations["llmops.dev/spec-hash"] = digest
    meta.update(
        namespace=namespace,
        uid=uid_for(kind, namespace, meta["name"]),
        generation=generation,
        annotations=annotations,
    )
    return {
        "apiVersion": manifest["apiVersion"],
        "kind": kind,
        "metadata": meta,
        "spec": manifest.get("spec") or {},
        "status": status,
    }


def append_event(layout: Layout, body: Mapping[str, Any], event: Mapping[str, Any]) -> None:
    meta = body["metadata"]
    path = layout.resource_dir(body["kind"], meta["namespace"], meta["name"]) / "events.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(dict(event), sort_keys=True) + "\n")


def all_objects(layout: Layout) -> Iterator[dict[str, Any]]:
    """Every resource in the state directory, Datasets first."""
    base = layout.root / "resources"
    for kind, plural in PLURALS.items():
        for path in sorted(base.glob(f"*/{plural}/*/object.yaml")):
            loaded = yaml.safe_load(path.read_text())
            if isinstance(loaded, dict) and loaded.get("kind") == kind:
                yield loaded
