"""Reading Kubernetes manifests from files and folders (multi-document YAML)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(ValueError):
    """A manifest could not be read; the message names the file."""


def _files(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix in MANIFEST_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise ManifestError(f"{path}: no such file or folder")
    return found


def load_manifests(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every non-empty YAML document in the given files and folders, in order."""
    documents: list[dict[str, Any]] = []
    for file in _files(paths):
        try:
            loaded = list(yaml.safe_load_all(file.read_text()))
        except yaml.YAMLError as error:
            raise ManifestError(f"{file}: not valid YAML: {error}") from error
        for index, doc in enumerate(loaded):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                raise ManifestError(
                    f"{file}: document {index} is not a Kubernetes object "
                    "(it needs apiVersion and kind)"
                )
            documents.append(doc)
    return documents


# `kubectl`'s short names, for `--set tr/<name>.spec...`.
# `--set <short>/<name>.<path>=...`: the CRDs' short names (and `ds`, accepted as before).
SHORT_KINDS = {"dset": "Dataset", "ds": "Dataset", "tr": "TrainingRun", "md": "ModelDeployment"}


def apply_overrides(documents: list[dict[str, Any]], overrides: Iterable[str]) -> None:
    """Apply `KIND/NAME.field.path=VALUE` settings in place (VALUE is YAML, so `40` is a
    number and `[a, b]` a list; a numeric path segment indexes a list). Used to scale a
    manifest down without editing it, e.g. `--set tr/demo.spec.hyperparameters.maxSteps=40`."""
    for override in overrides:
        target, equals, raw = override.partition("=")
        kind_name, dot, path = target.partition(".")
        kind, slash, name = kind_name.partition("/")
        if not (equals and dot and slash and name and path):
            raise ManifestError(f"--set {override!r}: expected KIND/NAME.field.path=VALUE")
        kind = SHORT_KINDS.get(kind.lower(), kind)
        matches = [
            doc
            for doc in documents
            if str(doc.get("kind", "")).lower() == kind.lower()
            and (doc.get("metadata") or {}).get("name") == name
        ]
        if not matches:
            raise ManifestError(f"--set {override!r}: no {kind} named {name!r} in the manifests")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ManifestError(f"--set {override!r}: value is not valid YAML: {error}") from error
        for doc in matches:
            _set_path(doc, path.split("."), value, override)


def _set_path(node: Any, segments: list[str], value: Any, override: str) -> None:
    for depth, segment in enumerate(segments):
        last = depth == len(segments) - 1
        if isinstance(node, list):
            if not segment.isdigit() or int(segment) >= len(node):
                raise ManifestError(f"--set {override!r}: no item {segment} in the list")
            key: Any = int(segment)
        elif isinstance(node, dict):
            key = segment
            if not last and node.get(key) is None:
                node[key] = {}
        else:
            raise ManifestError(f"--set {override!r}: {segment!r} is inside a scalar")
        if last:
            node[key] = value
        else:
            node = node[key]
