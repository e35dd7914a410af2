"""Helpers the per-kind runners share: time stamps, storage URIs as host folders, copies."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

from llmops.builders import storage
from llmops.local.state import Layout


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def timestamp(value: datetime.datetime | None = None) -> str:
    return (value or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object) -> datetime.datetime | None:
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
    if not value:
        return None
    return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def host_path(layout: Layout, namespace: str, uri: str) -> Path:
    """`pvc://claim/path` -> the claim's folder under the state directory."""
    scheme, location, path = storage.parse_uri(uri)
    if scheme != "pvc":
        raise ValueError(f"{uri}: only pvc:// storage is available to the local runtime")
    return layout.volume(namespace, location) / path


def copy_if_exists(source: Path, target: Path) -> bool:
    if not source.is_file():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return True
