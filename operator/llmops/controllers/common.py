"""What every controller does the same way: parse the resource, keep status and conditions,
tell the story in events, count resources by phase, pick the reconcile interval."""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import kopf
from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError
from pydantic import BaseModel, ValidationError

from llmops import GROUP, VERSION
from llmops.api.base import StatusModel
from llmops.controllers.cache import resource_version
from llmops.controllers.kube import (
    RESYNC_THREADS,
    ChildConflict,
    ChildRejected,
    ChildTerminating,
    Kube,
    default_kube,
)
from llmops.controllers.resync import Outcome, Resync
from llmops.decide.status import Event, StatusDraft, status_patch

# Shared with the decisions: the clock and the reading of child objects.
from llmops.decide.status import is_complete as is_complete
from llmops.decide.status import job_failure as job_failure
from llmops.decide.status import now as now
from llmops.decide.status import parse_time as parse_time
from llmops.decide.status import timestamp as timestamp
from llmops.metrics import CHILDREN_CREATED, RESOURCES, observe_reconcile

log = logging.getLogger("llmops.controllers")
M = TypeVar("M", bound=BaseModel)

# How often each resource is compared with its children (level-triggered reconcile).
RECONCILE_SECONDS = float(os.environ.get("LLMOPS_RECONCILE_SECONDS", "5"))

_phases: dict[tuple[str, str], str] = {}  # (kind, uid) -> phase, for the RESOURCES gauge


def kube() -> Kube:
    return default_kube()


def parse(model: type[M], body: Mapping[str, Any], *, with_status: bool = False) -> M:
    """The resource as its API model. The CRD schema already rejected invalid input at
    admission, so a failure here is permanent (e.g. a field the schema could not express)."""
    keys = ("apiVersion", "kind", "metadata", "spec") + (("status",) if with_status else ())
    try:
        return model.model_validate({k: body[k] for k in keys if k in body})
    except ValidationError as error:
        raise kopf.PermanentError(f"invalid {body.get('kind')}: {error}") from error


def write_status(
    body: Mapping[str, Any], kind: str, status: StatusModel, events: list[Event], patch: kopf.Patch
) -> None:
    """Patch what changed from the body's status to `status`, post the decided events and
    keep the phase gauge."""
    new = status.to_dict()
    new["observedGeneration"] = body["metadata"].get("generation")
    for key, value in status_patch(body.get("status") or {}, new).items():
        patch.status[key] = value
    post_events(body, events)
    count_phase(kind, body["metadata"]["uid"], new.get("phase"))


def post_events(body: Mapping[str, Any], events: list[Event]) -> None:
    for event in events:
        kopf.event(
            cast(kopf.Body, body), type=event.type, reason=event.reason, message=event.message
        )


def count_phase(kind: str, uid: str, phase: str | None) -> None:
    previous = _phases.get((kind, uid))
    if phase and previous != phase:
        if previous:
            RESOURCES.labels(kind=kind, phase=previous).dec()
        RESOURCES.labels(kind=kind, phase=phase).inc()
        _phases[(kind, uid)] = phase


class StatusWriter(StatusDraft):
    """A status draft that the controller writes once, with events for condition
    transitions."""

    def write(self, patch: kopf.Patch) -> None:
        self.status["observedGeneration"] = self.body["metadata"].get("generation")
        old = self.body.get("status") or {}
        for key, value in self.status.items():
            if old.get(key) != value:
                patch.status[key] = value
        post_events(self.body, self.events)
        count_phase(self.kind, self.body["metadata"]["uid"], self.phase)


def forget(kind: str, uid: str) -> None:
    """A deleted resource leaves the phase gauge (and its lock goes)."""
    _locks.pop(uid, None)
    phase = _phases.pop((kind, uid), None)
    if phase:
        RESOURCES.labels(kind=kind, phase=phase).dec()


def ensure_child(kind: str, manifest: Mapping[str, Any], *, update: bool = True) -> dict[str, Any]:
    """kube().ensure with the errors mapped to kopf's retry semantics."""
    try:
        ensured = kube().ensure(manifest, update=update)
    except ChildTerminating as error:
        raise kopf.TemporaryError(str(error), delay=5) from error
    if ensured.created:
        CHILDREN_CREATED.labels(kind=kind, child_kind=manifest["kind"]).inc()
    return ensured.object


# The Job controller's pods get this long to appear (or fail to) before FailedCreate is read.
JOB_CONTROLLER_SECONDS = 3.0


def _age_seconds(obj: Mapping[str, Any]) -> float:
    created = parse_time(obj["metadata"].get("creationTimestamp"))
    return float("inf") if created is None else (now() - created).total_seconds()


def failed_creates(job: Mapping[str, Any], namespace: str) -> list[str]:
    """The Job controller's FailedCreate events: why the Job has fewer pods than it wants
    (a missing PriorityClass, a quota, a webhook); recorded nowhere in the Job's status.
    Read from the watch cache, which holds exactly these events (cache.FIELD_SELECTORS)."""
    name = job["metadata"]["name"]
    if _age_seconds(job) < JOB_CONTROLLER_SECONDS:
        return []  # the Job controller has not had the time to create its pods, or fail to
    selector = f"reason=FailedCreate,involvedObject.kind=Job,involvedObject.name={name}"
    events = kube().list("v1", "Event", namespace, field_selector=selector)
    uid = job["metadata"].get("uid")
    mine = [e for e in events if not uid or e["involvedObject"].get("uid") in (None, uid)]
    mine.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return [str(e.get("message", "")) for e in mine][-1:]


KUEUE_WORKLOAD = ("kueue.x-k8s.io/v1beta2", "Workload")


def kueue_workload(job: Mapping[str, Any], namespace: str) -> dict[str, Any] | None:
    """The Workload Kueue made for the Job (labelled with its uid); None where Kueue is not
    installed or does not manage the Job."""
    uid = job["metadata"].get("uid")
    if not uid:
        return None
    try:
        workloads = kube().list(
            *KUEUE_WORKLOAD, namespace, label_selector=f"kueue.x-k8s.io/job-uid={uid}"
        )
    except (ResourceNotFoundError, DynamicApiError):
        return None  # no Kueue (or no right to read it): the queue's name must do
    return workloads[0] if workloads else None


_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
_reconciling = threading.local()  # .uid: the object this thread reconciles


def read_resource(api_version: str, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    """Another llmops resource a reconcile depends on (a run's Dataset, a deployment's run),
    read like any object; its changes then make the reconciling object due at once."""
    uid = getattr(_reconciling, "uid", None)
    if uid is not None:
        RESYNC.schedule.reads(uid, kind, namespace, name)
    return kube().get(api_version, kind, name, namespace)


BUSY_WAIT_SECONDS = 30.0


def _reconcile_alone(
    kind: str,
    reconcile: Reconcile,
    body: Mapping[str, Any],
    patch: kopf.Patch,
    *,
    retry_if_busy: bool,
    finished_phases: tuple[str, ...] = (),
    idle_backoff: bool = False,
) -> Outcome:
    """One reconcile of an object at a time: the resync and kopf's change handlers run side
    by side. A busy resync is skipped (BUSY; it looks again soon); a change handler waits its
    turn, and acts on the object as it is then (read afresh below), not on the stale body
    kopf handed over. FINISHED: the object was in one of `finished_phases` already; IDLE (with
    `idle_backoff`): the reconcile changed nothing in the status."""
    uid = body["metadata"]["uid"]
    lock = _locks[uid]
    # A change waits for the running reconcile (it then reads the object afresh); after a
    # long wait it is left to the next resync.
    if not lock.acquire(timeout=BUSY_WAIT_SECONDS if retry_if_busy else 0):
        return Outcome.BUSY
    outcome = Outcome.DONE
    try:
        # The body kopf hands over may predate the last reconcile's own status patch (its
        # watch event can still be on the way); acting on it could undo a finished run.
        fresh = _newest(body, kind)
        if fresh is None:
            return outcome  # deleted meanwhile
        if (fresh.get("status") or {}).get("phase") in finished_phases:
            outcome = Outcome.FINISHED
        _reconciling.uid = uid
        try:
            with observe_reconcile(kind):
                try:
                    reconcile(fresh, patch)
                except (ChildRejected, ChildConflict) as error:
                    # A child the API server refused, or whose name a foreign object holds:
                    # retrying cannot help until the spec (or the foreign object) changes. Say
                    # so in the status and an event; the next change or resync tries again.
                    log.warning("%s %s: %s", kind, fresh["metadata"]["name"], error)
                    _invalid_child(kind, fresh, patch, str(error))
                else:
                    _invalid_child(kind, fresh, patch, None)
        finally:
            # Also when the reconcile failed part way: what it decided (and announced) stays.
            if idle_backoff and outcome is Outcome.DONE and not patch.status:
                outcome = Outcome.IDLE
            _write_now(fresh, patch)
    finally:
        _reconciling.uid = None
        lock.release()
    return outcome


def _newest(body: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    """The object as it is now: read from the watch cache (which has this operator's own
    status writes) or the API, unless kopf's body is newer still (a spec change, or a new
    object, whose event reached kopf before the cache). None when it is gone (or a resync's
    bare reference finds nothing)."""
    client, meta = kube(), body["metadata"]
    fresh = client.get(body["apiVersion"], kind, meta["name"], meta["namespace"])
    if client.cache is None:
        return fresh
    handed = resource_version(body)
    if handed is None or (fresh is not None and (resource_version(fresh) or 0) >= handed):
        return fresh
    newer = copy.deepcopy(dict(body))
    # Not taken only if the cache saw the object deleted after this version.
    return newer if client.cache.written(newer) else fresh


def _write_now(body: Mapping[str, Any], patch: kopf.Patch) -> None:
    """Write the decided status before the lock is released, not after the handler returns
    as kopf would: the next reconcile of the object then reads what this one decided, so a
    transition (and its event) is never decided twice."""
    status = dict(patch.status or {})
    if not status:
        return
    meta = body["metadata"]
    kube().patch_status(body["apiVersion"], body["kind"], meta["name"], meta["namespace"], status)
    patch.pop("status", None)


def _invalid_child(
    kind: str, body: Mapping[str, Any], patch: kopf.Patch, error: str | None
) -> None:
    """Set InvalidChild (a Warning event when it turns True), or clear it once every child
    was accepted again; on top of whatever status the reconcile already patched."""
    current = {**(body.get("status") or {}), **dict(patch.status or {})}
    had = any(
        c.get("type") == "InvalidChild" and c.get("status") == "True"
        for c in current.get("conditions") or []
    )
    if error is None and not had:
        return
    draft = StatusDraft({**body, "status": current}, kind)
    if error is None:
        draft.condition("InvalidChild", "False", "ChildrenAccepted", "")
    else:
        draft.condition("InvalidChild", "True", "InvalidChild", error)
    patch.status["conditions"] = draft.status["conditions"]
    post_events(body, draft.events)


Reconcile = Callable[[Mapping[str, Any], kopf.Patch], None]

# The watch cache runs with the operator, so clients without it (the CLI, tests) read the API.
WATCH_CACHE = os.environ.get("LLMOPS_WATCH_CACHE", "1") not in ("0", "false", "off")
# Every resource is reconciled again each RECONCILE_SECONDS, by threads of its own (kopf's
# run the change handlers).
RESYNC = Resync(RECONCILE_SECONDS, workers=RESYNC_THREADS)


def _child_changed(obj: Mapping[str, Any]) -> None:
    """A watch event changed a cached object: reconcile the resource controlling it now."""
    cache = kube().cache
    RESYNC.nudge_owner(obj, cache.peek if cache is not None else None)


@kopf.on.startup()
def start_watch_cache(**_: Any) -> None:
    if WATCH_CACHE:
        kube().start_cache(on_change=_child_changed)
    RESYNC.start()


@kopf.on.cleanup()
def stop_watch_cache(**_: Any) -> None:
    RESYNC.stop()
    kube().stop_cache()


def register(
    kind: str,
    plural: str,
    reconcile: Reconcile,
    deleted: Callable[[Mapping[str, Any]], None] | None = None,
    finished_phases: tuple[str, ...] = (),
    idle_backoff: bool = True,
) -> None:
    """The handlers every kind has: a level-triggered reconcile every interval (`RESYNC`; a
    restarted operator simply carries on), an immediate one on creation and spec changes, and
    forgetting the resource's phase (and whatever `deleted` forgets) when it is deleted.
    `finished_phases`: phases in which the reconcile does nothing (a run that ended), so the
    periodic one comes rarely (resync.FINISHED_INTERVAL): clusters keep many more finished
    runs than running ones. `idle_backoff`: a reconcile that changes nothing makes the next
    one come later (up to resync.IDLE_MAX_INTERVAL; the watch cache's events on the object's
    children nudge it at once meanwhile); off for kinds with deadlines of their own (a
    TrainingSchedule's cron)."""

    def resync(body: dict[str, Any]) -> Outcome:
        patch = kopf.Patch()
        return _reconcile_alone(
            kind,
            reconcile,
            body,
            patch,
            retry_if_busy=False,
            finished_phases=finished_phases,
            idle_backoff=idle_backoff,
        )

    RESYNC.handle(kind, resync)

    # Creation and spec changes (suspend, scale, a new version) are acted on at once, not at
    # the next resync. Both paths converge on the same state, since every write is an
    # idempotent apply. A raw event handler rather than on.create/on.update, which keep kopf's
    # progress and the last handled spec in annotations: two more writes, and two more watch
    # events, per object; kopf's deletion handlers would keep the spec too and need kopf's
    # finalizer. A spec is new when the status has not observed its generation (every status
    # write records it). No handler here needs a finalizer, so kopf adds none (and removes
    # the one earlier versions of the operator added).
    @kopf.on.event(GROUP, VERSION, plural)
    def reconcile_change(type: str, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        RESYNC.adopt_context()
        RESYNC.nudge_owner(body)
        RESYNC.nudge_readers(kind, body)
        uid = body["metadata"]["uid"]
        if type == "DELETED":
            RESYNC.schedule.forget(uid)
            forget(kind, uid)
            if deleted is not None:
                deleted(body)
            return
        RESYNC.seen(kind, body)
        if body["metadata"].get("deletionTimestamp"):
            return
        observed = (body.get("status") or {}).get("observedGeneration")
        if observed is not None and observed == body["metadata"].get("generation"):
            return
        token = RESYNC.schedule.token()
        outcome = _reconcile_alone(kind, reconcile, body, patch, retry_if_busy=True)
        RESYNC.schedule.reconciled(uid, token, handed_out=False, ran=outcome is not Outcome.BUSY)
