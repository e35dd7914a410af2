"""The level-triggered half of every controller: each resource the operator watches is
reconciled again every interval whether or not anything changed, so a restarted operator
carries on, deadlines (budgets, schedules, trials) pass and drifted children are put back.

kopf's timers did this with an asyncio task per object, and kopf requires its finalizer on
every object a timer runs for: one more patch (and one more watch event to wait for) per
created resource, and a resource deleted while the operator was down stayed until the
operator came back. Here one thread keeps a due time per object the operator has seen (kopf's
watch reports them, so the operator's namespaces are respected) and hands due objects to a
small pool of threads. An object just reconciled because it changed is not due again for an
interval; a newly seen one (every object, after a restart) is due at once.

`Schedule` is the pure part (an injected clock), unit-tested; `Resync` runs it.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import kopf

log = logging.getLogger("llmops.controllers.resync")

# An object whose reconcile failed permanently (an invalid spec the schema let through) is
# tried again this many intervals later, not every interval: its spec must change first.
PERMANENT_ERROR_INTERVALS = 12
# After any other error the next try comes after this many intervals.
ERROR_INTERVALS = 2
# The longest the loop sleeps between looks at the schedule.
MAX_SLEEP = 1.0


@dataclass(frozen=True)
class Target:
    """What a reconcile needs to find the object again."""

    kind: str
    api_version: str
    namespace: str
    name: str
    uid: str

    def body(self) -> dict[str, Any]:
        meta = {"name": self.name, "namespace": self.namespace, "uid": self.uid}
        return {"apiVersion": self.api_version, "kind": self.kind, "metadata": meta}


def target(kind: str, body: Mapping[str, Any]) -> Target:
    meta = body["metadata"]
    return Target(kind, body["apiVersion"], meta.get("namespace") or "", meta["name"], meta["uid"])


class Schedule:
    """When each known object is due; an object handed out is not handed out again until
    `reconciled` says it is back."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._due: dict[str, float] = {}
        self._targets: dict[str, Target] = {}
        self._out: set[str] = set()

    def __len__(self) -> int:
        return len(self._targets)

    def seen(self, found: Target) -> bool:
        """Know the object (due now if it is new); True if it was new."""
        with self._lock:
            new = found.uid not in self._targets
            self._targets[found.uid] = found
            if new:
                self._due[found.uid] = self.clock()
            return new

    def forget(self, uid: str) -> None:
        with self._lock:
            self._targets.pop(uid, None)
            self._due.pop(uid, None)

    def reconciled(self, uid: str, after: float | None = None) -> None:
        """A handed-out object is back: due again `after` seconds from now (an interval
        unless said otherwise)."""
        with self._lock:
            self._out.discard(uid)
            if uid in self._targets:
                self._due[uid] = self.clock() + (self.interval if after is None else after)

    def postpone(self, uid: str) -> None:
        """A change handler just reconciled the object: due again an interval from now."""
        with self._lock:
            if uid in self._targets:
                self._due[uid] = self.clock() + self.interval

    def take_due(self) -> list[Target]:
        """The objects due now, oldest first, marked as handed out."""
        now = self.clock()
        with self._lock:
            due = sorted(
                (at, uid) for uid, at in self._due.items() if at <= now and uid not in self._out
            )
            self._out.update(uid for _, uid in due)
            return [self._targets[uid] for _, uid in due]

    def seconds_to_next(self) -> float | None:
        """Until the next object not handed out is due (None when there is none)."""
        with self._lock:
            waiting = [at for uid, at in self._due.items() if uid not in self._out]
        return max(0.0, min(waiting) - self.clock()) if waiting else None


Handler = Callable[[dict[str, Any]], None]


class Resync:
    """Runs the schedule: a thread that hands due objects to `workers` threads, each calling
    the kind's handler with a minimal body (the handler reads the object afresh).

    Handlers run in a copy of the context of a kopf handler (`adopt_context`), so that
    `kopf.event` (which posts through kopf's queue, found in context variables) works from
    these threads as it does in kopf's own."""

    def __init__(self, interval: float, workers: int) -> None:
        self.schedule = Schedule(interval)
        self.workers = workers
        self.handlers: dict[str, Handler] = {}
        self._context: contextvars.Context | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def handle(self, kind: str, handler: Handler) -> None:
        self.handlers[kind] = handler

    def adopt_context(self) -> None:
        """Called from kopf handlers: the first one's context serves the loop's threads."""
        if self._context is None:
            self._context = contextvars.copy_context()
            self._wake.set()

    def seen(self, kind: str, body: Mapping[str, Any]) -> None:
        if self.schedule.seen(target(kind, body)):
            self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="llmops-resync", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop, and forget what this run of kopf handed over (its objects and its context,
        whose event loop is closing): an operator started again in this process starts
        afresh."""
        thread, self._thread = self._thread, None
        self._stop.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout=10)
        self._context = None
        self.schedule = Schedule(self.schedule.interval)

    def _run(self) -> None:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="llmops-resync") as pool:
            while not self._stop.is_set():
                context = self._context
                if context is not None:
                    for due in self.schedule.take_due():
                        pool.submit(self._one, context, due)
                pause = self.schedule.seconds_to_next()
                self._wake.wait(MAX_SLEEP if pause is None else min(pause, MAX_SLEEP))
                self._wake.clear()

    def _one(self, context: contextvars.Context, due: Target) -> None:
        interval = self.schedule.interval
        after: float | None = None
        try:
            if self._stop.is_set():
                return
            context.copy().run(self.handlers[due.kind], due.body())
        except kopf.TemporaryError as error:
            log.info("%s %s/%s: %s", due.kind, due.namespace, due.name, error)
            after = error.delay if error.delay is not None else interval * ERROR_INTERVALS
        except kopf.PermanentError as error:
            # Not only a log line: the object's events say it too (as kopf does for its
            # handlers), once per retry, which is rare.
            log.warning("%s %s/%s: %s", due.kind, due.namespace, due.name, error)
            body = cast(kopf.Body, due.body())
            context.copy().run(kopf.warn, body, reason="ReconcileFailed", message=str(error))
            after = interval * PERMANENT_ERROR_INTERVALS
        except Exception:
            log.exception("%s %s/%s: reconcile failed", due.kind, due.namespace, due.name)
            after = interval * ERROR_INTERVALS
        finally:
            self.schedule.reconciled(due.uid, after)
