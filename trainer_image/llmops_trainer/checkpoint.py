"""Checkpoint folders on shared storage: atomic publication, verification, retention, fallback.

    <root>/step-<N>/              DeepSpeed's files for step N (every rank writes its shards),
                                  trainer_state.json (our position and metrics), and
                                  checkpoint.json (sha256 of every other file, written last)
    <root>/.partial-step-<N>/     a checkpoint being written; never read
    <root>/latest, <root>/best    one line each: the name of a published checkpoint

A checkpoint becomes visible by renaming its finished, verified folder to `step-<N>` and then
replacing the `latest` pointer; both are atomic on POSIX file systems, so a crash at any point
leaves either the previous state or the new one. Reading goes the other way: a checkpoint is
used only if every file matches checkpoint.json, otherwise the next older one is tried.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmops_trainer.shards import sha256_file

INDEX = "checkpoint.json"
STATE = "trainer_state.json"
LATEST = "latest"
BEST = "best"
PARTIAL_PREFIX = ".partial-"
_STEP = re.compile(r"^step-([0-9]+)$")


def name_for(step: int) -> str:
    return f"step-{step}"


def partial_name(step: int) -> str:
    return PARTIAL_PREFIX + name_for(step)


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != INDEX:
            yield path


def seal(folder: Path) -> None:
    """Record the checksum of every file; the index is the checkpoint's completion mark."""
    files = {str(path.relative_to(folder)): sha256_file(path) for path in _files(folder)}
    _write_atomic(folder / INDEX, json.dumps({"files": files}, indent=2, sort_keys=True))


def problems(folder: Path) -> list[str]:
    """What is wrong with a checkpoint folder; empty when every file is as sealed."""
    index = folder / INDEX
    if not index.is_file():
        return [f"{folder.name}: no {INDEX} (unfinished)"]
    try:
        files: dict[str, str] = json.loads(index.read_text())["files"]
    except (ValueError, KeyError) as error:
        return [f"{folder.name}: unreadable {INDEX}: {error}"]
    found = []
    if STATE not in files:
        found.append(f"{folder.name}: no {STATE}")
    for relative, checksum in files.items():
        path = folder / relative
        if not path.is_file():
            found.append(f"{folder.name}/{relative}: missing")
        elif sha256_file(path) != checksum:
            found.append(f"{folder.name}/{relative}: checksum mismatch")
    return found


def publish(root: Path, step: int) -> Path:
    """Move a sealed partial folder into place and point `latest` at it."""
    target = root / name_for(step)
    if target.exists():  # a re-run of the same step after a restart: the new one wins
        shutil.rmtree(target)
    os.replace(root / partial_name(step), target)
    write_pointer(root, LATEST, target.name)
    return target


def write_pointer(root: Path, pointer: str, name: str) -> None:
    _write_atomic(root / pointer, name + "\n")


def read_pointer(root: Path, pointer: str) -> str | None:
    path = root / pointer
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def published(root: Path) -> list[tuple[int, Path]]:
    """Published checkpoints, newest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def find_resumable(root: Path, log: list[str] | None = None) -> Path | None:
    """The newest valid checkpoint: what `latest` names, else the newest sound folder.

    Problems with skipped checkpoints are appended to `log`, so the caller can report them.
    """
    candidates = [path for _, path in published(root)]
    pointed = read_pointer(root, LATEST)
    if pointed is not None and (root / pointed) in candidates:
        candidates.remove(root / pointed)
        candidates.insert(0, root / pointed)
    for folder in candidates:
        found = problems(folder)
        if not found:
            return folder
        if log is not None:
            log.extend(found)
    return None


def resolve(path: Path) -> Path:
    """A checkpoint folder from what a user may point at: the folder itself, a pointer file
    (`<root>/latest`, `<root>/best`) or a checkpoint root (its `latest`)."""
    if path.is_file():
        return path.parent / path.read_text().strip()
    if path.is_dir() and not (path / INDEX).exists() and (path / LATEST).is_file():
        return resolve(path / LATEST)
    return path


def clean_partials(root: Path) -> None:
    """Remove folders of checkpoints a crash interrupted."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(PARTIAL_PREFIX):
                shutil.rmtree(path, ignore_errors=True)


def retain(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest checkpoints and the `best` one; returns the
    deleted folders."""
    keep = {path for _, path in published(root)[:keep_last]}
    best = read_pointer(root, BEST)
    if best is not None:
        keep.add(root / best)
    deleted = []
    for _, path in published(root):
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


def read_state(folder: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((folder / STATE).read_text())
    return state


def write_state(folder: Path, state: dict[str, Any]) -> None:
    _write_atomic(folder / STATE, json.dumps(state, indent=2, sort_keys=True))


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.tmp")
    with partial.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
