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
