"""Adapters that change while the server runs: the file listing them (a ConfigMap the
controller rewrites when an adapter's TrainingRun has a new checkpoint or final adapter) is
read again every few seconds, and a new name, a new folder or a rewritten folder is loaded
and served from the next request on, without restarting the server or touching the base.

A version that cannot be loaded (a half-written folder, one that does not fit the base)
leaves the served version in place; it is counted, logged and tried again only when the
folder changes once more.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from llmops.api.workload import AdapterEntry, read_adapter_entries
from llmops_trainer.serve import adapters
from llmops_trainer.serve.engine import Engine
from llmops_trainer.serve.metrics import ServingMetrics

log = logging.getLogger("llmops.serve")

# What identifies a version of an adapter folder: its path and its files' sizes and times.
Version = tuple[str, tuple[tuple[str, int, int], ...]]


def read_entries(path: Path) -> list[AdapterEntry]:
    return read_adapter_entries(path.read_text())


def version_of(folder: Path) -> Version:
    files = []
    for name in (adapters.CONFIG, adapters.WEIGHTS):
        try:
            found = (folder / name).stat()
        except OSError:
            continue
        files.append((name, found.st_size, found.st_mtime_ns))
    return str(folder), tuple(files)


class AdapterWatcher:
    """Keeps the engine's adapters in step with an adapters file."""

    def __init__(
        self,
        path: Path,
        engine: Engine,
        metrics: ServingMetrics,
        interval: float,
        served: dict[str, Path] | None = None,
    ) -> None:
        self.path = path
        self.engine = engine
        self.metrics = metrics
        self.interval = interval
        # name -> the version last tried (served, or refused: not tried again unchanged)
        self._seen: dict[str, Version] = {
            name: version_of(folder) for name, folder in (served or {}).items()
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmops-adapters", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # a bad file must not end the watching
                log.exception("reading the adapters file %s failed", self.path)

    def check(self) -> None:
        """Serve what the file lists now: load new names and changed versions, stop
        serving names it no longer lists."""
        try:
            entries = read_entries(self.path)
        except FileNotFoundError:
            return  # not (yet) mounted: keep what is served
        except ValueError as error:
            log.warning("adapters file %s: %s; keeping the adapters served", self.path, error)
            return
        wanted = {entry.name: Path(entry.path) for entry in entries}
        for name in [n for n in self._seen if n not in wanted]:
            self.engine.remove_adapter(name)
            del self._seen[name]
            log.info("adapter %s: no longer served", name)
        for name, folder in wanted.items():
            version = version_of(folder)
            if self._seen.get(name) == version:
                continue
            self._seen[name] = version
            try:
                self.engine.replace_adapter(name, adapters.load(name, folder))
            except Exception as error:  # refused, half-written, unreadable: keep the old
                self.metrics.adapter_loads.labels(outcome="failed").inc()
                log.warning("adapter %s: %s; the served version stays", name, error)
                continue
            self.metrics.adapter_loads.labels(outcome="loaded").inc()
            log.info("adapter %s: serving %s", name, folder)
