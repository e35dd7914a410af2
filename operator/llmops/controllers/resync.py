"""The level-triggered half of every controller: each resource the operator watches is
reconciled again every interval whether or not anything changed, so a restarted operator
carries on, deadlines (budgets, schedules, trials) pass and drifted children are put back.

kopf's timers did this with an asyncio task per object, and kopf requires its finalizer on
every object a timer runs for: one more patch (and one more watch event to wait for) per
created resource, and a resource deleted while the operator was down stayed until the
operator came back. Here one thread keeps a due time per object the operator has seen (kopf's
watch reports them, so the operator's namespaces are respected) and hands due objects to a
small pool of threads. An object just reconciled because it changed is not due again for an
interval; a newly seen one (every object, after a restart) is due at once, and so is one
whose llmops child (a Sweep's trial, a TrainingSchedule's run) changed.

`Schedule` is the pure part (an injected clock), unit-tested; `Resync` runs it.
"""

from __future__ import annotations

import contextvars
import enum
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
# A finished object (a Succeeded or Failed run or sweep: its reconcile does nothing) is looked
# at this rarely; a change to it still comes through kopf's event handler at once.
FINISHED_INTERVAL = 300.0
# An object whose reconcile changed nothing is looked at after twice the time of the last
# look, up to this (its children's changes nudge it at once meanwhile); a change resets it.
IDLE_MAX_INTERVAL = 20.0
# A nudged object is due this much later, so that the burst of events one change brings (a
# Job's status, then its pods, each scheduled) makes one reconcile, not one each.
NUDGE_DELAY = 1.0
# An object found busy is looked at again this soon (its nudges are kept meanwhile).
BUSY_RETRY_SECONDS = 0.5
# The longest the loop sleeps between looks at the schedule.
MAX_SLEEP = NUDGE_DELAY  # no longer: nudges rely on it (they do not wake the loop)


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
    """When each known object is due. An object handed out (`take_due`) is not handed out again
    until `reconciled` says it is back. Nudges are numbered: a reconcile that began (its
    `token`) before the object's last nudge may have read the state before that change, so
    the object is due again at once."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._due: dict[str, float] = {}
        self._targets: dict[str, Target] = {}
        self._out: set[str] = set()
        self._nudges = 0
        self._nudged: dict[str, int] = {}  # uid -> number of its last nudge
        self._idle: dict[str, float] = {}  # uid -> its last idle interval
        # (kind, namespace, name) of a resource read by reconciles -> the readers' uids
        self._readers: dict[tuple[str, str, str], set[str]] = {}

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
            self._nudged.pop(uid, None)
            self._idle.pop(uid, None)
            for key, readers in list(self._readers.items()):
                readers.discard(uid)
                if not readers:  # resources nobody reads any more are not kept
                    del self._readers[key]

    def token(self) -> int:
        """Taken when a reconcile begins, given back to `reconciled`."""
        with self._lock:
            return self._nudges

    def nudge(self, uid: str) -> bool:
        """Something the object controls changed: due in NUDGE_DELAY (or that long after it
        is back, if it is handed out). False for an object not known here."""
        with self._lock:
            if uid not in self._targets:
                return False
            self._nudges += 1
            self._nudged[uid] = self._nudges
            if uid not in self._out:
                self._due[uid] = min(self._due[uid], self.clock() + NUDGE_DELAY)
            return True

    def reads(self, uid: str, kind: str, namespace: str, name: str) -> None:
        """The object's reconcile reads that resource (a run its Dataset, a deployment its
        run): a change to it nudges the object (`nudge_readers`)."""
        with self._lock:
            if uid in self._targets:
                self._readers.setdefault((kind, namespace, name), set()).add(uid)

    def readers(self, kind: str, namespace: str, name: str) -> list[str]:
        with self._lock:
            return list(self._readers.get((kind, namespace, name), ()))

    def take_due(self) -> tuple[int, list[Target]]:
        """The objects due now, oldest first, marked as handed out, and their token."""
        now = self.clock()
        with self._lock:
            due = sorted(
                (at, uid) for uid, at in self._due.items() if at <= now and uid not in self._out
            )
            self._out.update(uid for _, uid in due)
            return self._nudges, [self._targets[uid] for _, uid in due]

    def reconciled(
        self,
        uid: str,
        token: int,
        after: float | None = None,
        *,
        handed_out: bool = True,
        ran: bool = True,
        idle: bool = False,
    ) -> None:
        """A reconcile that began at `token` ended (one of the loop's, or a change handler's
        with `handed_out=False`): due again `after` seconds from now (an interval unless said
        otherwise; `idle`: nothing changed, twice the last idle interval up to
        IDLE_MAX_INTERVAL), or at once if the object was nudged since the reconcile began. One
        that did not run (`ran=False`: the object was busy) leaves its nudges for the next."""
        with self._lock:
            if handed_out:
                self._out.discard(uid)
            if uid not in self._targets:
                return
            if not ran:
                self._due[uid] = self.clock() + (self.interval if after is None else after)
                return
            if self._nudged.get(uid, 0) > token:
                self._due[uid] = self.clock() + NUDGE_DELAY
                return
            self._nudged.pop(uid, None)
            if idle and after is None:
                after = min(2 * self._idle.get(uid, self.interval / 2), IDLE_MAX_INTERVAL)
                self._idle[uid] = after
            else:
                self._idle.pop(uid, None)
            self._due[uid] = self.clock() + (self.interval if after is None else after)

    def seconds_to_next(self) -> float | None:
        """Until the next object not handed out is due (None when there is none)."""
        with self._lock:
            waiting = [at for uid, at in self._due.items() if uid not in self._out]
        return max(0.0, min(waiting) - self.clock()) if waiting else None


# Reads an object from the watch cache without an API call: (apiVersion, kind, namespace,
# name) -> the object or None.
Peek = Callable[[str, str, str, str], Mapping[str, Any] | None]


def _controller_refs(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """References to what controls `body` (for an Event: to the object it is about)."""
    refs = [r for r in body["metadata"].get("ownerReferences") or [] if r.get("controller")]
    if body.get("kind") == "Event" and body.get("involvedObject"):
        refs.append(body["involvedObject"])
    return refs


class Outcome(enum.Enum):
    """What a handler did with the object it was handed."""

    DONE = "done"  # reconciled, and its status changed: due again in an interval
    IDLE = "idle"  # reconciled, nothing changed: due again after a growing interval
    FINISHED = "finished"  # reconciled, and it is finished: due again in FINISHED_INTERVAL
    BUSY = "busy"  # a change handler was reconciling it: looked at again soon


Handler = Callable[[dict[str, Any]], Outcome]


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

    # A nudge does not wake the loop: the nudged object is due NUDGE_DELAY later, and the
    # loop never sleeps longer than that (MAX_SLEEP), so waking it would only rescan the
    # schedule once per event of a burst.

    def nudge_owner(self, body: Mapping[str, Any], peek: Peek | None = None) -> None:
        """`body` changed (or went): the object here that controls it is reconciled soon
        rather than at its next look, as controller-runtime's Owns() does: a Sweep when its
        trial changes, a TrainingRun when its Job does. One more step up through `peek` (the
        watch cache, never an API read): a pod's Job's run; an event's involved object's
        owner (the Job controller's FailedCreate)."""
        for ref in _controller_refs(body):
            if self.schedule.nudge(ref.get("uid", "")):
                continue
            if peek is None or not ref.get("kind") or not ref.get("name"):
                continue
            namespace = ref.get("namespace") or body["metadata"].get("namespace") or ""
            owner = peek(ref.get("apiVersion", ""), ref["kind"], namespace, ref["name"])
            for parent in _controller_refs(owner) if owner else ():
                self.schedule.nudge(parent.get("uid", ""))

    def nudge_readers(self, kind: str, body: Mapping[str, Any]) -> None:
        """`body` (of `kind`) changed: the objects whose reconciles read it are reconciled
        soon (a run waiting for its Dataset starts as soon as the Dataset is ready)."""
        meta = body["metadata"]
        for uid in self.schedule.readers(kind, meta.get("namespace") or "", meta["name"]):
            self.schedule.nudge(uid)

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
                    token, due = self.schedule.take_due()
                    for found in due:
                        pool.submit(self._one, context, found, token)
                pause = self.schedule.seconds_to_next()
                self._wake.wait(MAX_SLEEP if pause is None else min(pause, MAX_SLEEP))
                self._wake.clear()

    def _one(self, context: contextvars.Context, due: Target, token: int) -> None:
        interval = self.schedule.interval
        after: float | None = None
        ran, idle = True, False
        try:
            if self._stop.is_set():
                return
            outcome = context.copy().run(self.handlers[due.kind], due.body())
            ran = outcome is not Outcome.BUSY
            if outcome is Outcome.BUSY:
                after = BUSY_RETRY_SECONDS  # a change handler has it: look again soon
            elif outcome is Outcome.FINISHED:
                after = FINISHED_INTERVAL
            idle = outcome is Outcome.IDLE
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
            self.schedule.reconciled(due.uid, token, after, ran=ran, idle=idle)
