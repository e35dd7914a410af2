"""The periodic reconcile's schedule (a fake clock) and its runner (real threads, kopf's
error classes)."""

from __future__ import annotations

import threading
import time
from typing import Any

import kopf

from llmops.controllers.resync import (
    ERROR_INTERVALS,
    NUDGE_DELAY,
    PERMANENT_ERROR_INTERVALS,
    Outcome,
    Resync,
    Schedule,
    Target,
    target,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(name: str, uid: str) -> Target:
    return Target("TrainingRun", "llmops.dev/v1alpha1", "ns", name, uid)


def test_a_new_object_is_due_at_once_then_every_interval() -> None:
    clock = Clock()
    schedule = Schedule(5.0, clock)
    assert schedule.seen(run("a", "u1")) is True
    assert schedule.seen(run("a", "u1")) is False  # known: its due time is kept
    token, due = schedule.take_due()
    assert due == [run("a", "u1")]
    assert schedule.take_due()[1] == []  # handed out: not again until it is back
    assert schedule.seconds_to_next() is None
    schedule.reconciled("u1", token)
    assert schedule.take_due()[1] == []
    assert schedule.seconds_to_next() == 5.0
    clock.now += 5.0
    assert schedule.take_due()[1] == [run("a", "u1")]


def test_due_objects_come_oldest_first_and_errors_push_them_back() -> None:
    clock = Clock()
    schedule = Schedule(5.0, clock)
    schedule.seen(run("a", "u1"))
    clock.now += 1
    schedule.seen(run("b", "u2"))
    token, due = schedule.take_due()
    assert [t.name for t in due] == ["a", "b"]
    schedule.reconciled("u1", token, after=60.0)
    schedule.reconciled("u2", token)
    clock.now += 5.0
    assert [t.name for t in schedule.take_due()[1]] == ["b"]
    assert schedule.seconds_to_next() == 55.0


def test_a_change_handler_postpones_and_forgetting_removes() -> None:
    clock = Clock()
    schedule = Schedule(5.0, clock)
    schedule.seen(run("a", "u1"))
    schedule.reconciled("u1", schedule.token(), handed_out=False)  # a change handler's
    assert schedule.take_due()[1] == []
    clock.now += 5.0
    schedule.forget("u1")
    assert schedule.take_due()[1] == [] and len(schedule) == 0
    schedule.reconciled("u1", 0)  # a reconcile that ends after the deletion brings nothing back
    assert len(schedule) == 0 and schedule.seconds_to_next() is None


def test_a_nudge_makes_an_object_due_soon_or_again_once_back() -> None:
    clock = Clock()
    schedule = Schedule(5.0, clock)
    schedule.seen(run("sweep", "s1"))
    token, _ = schedule.take_due()
    schedule.reconciled("s1", token)
    assert schedule.take_due()[1] == []
    assert schedule.nudge("s1") is True  # a trial changed
    assert schedule.nudge("s1") is True  # and another event of the same change
    assert schedule.nudge("unknown") is False
    assert schedule.seconds_to_next() == NUDGE_DELAY  # one reconcile for the burst
    clock.now += NUDGE_DELAY
    token, due = schedule.take_due()
    assert due == [run("sweep", "s1")]
    assert schedule.nudge("s1")  # while it is being reconciled (it may have read before)
    schedule.reconciled("s1", token)
    clock.now += NUDGE_DELAY
    token, due = schedule.take_due()
    assert due == [run("sweep", "s1")]  # so once more
    schedule.reconciled("s1", token)
    assert schedule.take_due()[1] == []  # and then not before the interval


def test_a_busy_object_keeps_its_nudge_for_the_change_handler_to_settle() -> None:
    clock = Clock()
    schedule = Schedule(5.0, clock)
    schedule.seen(run("sweep", "s1"))
    handler_token = schedule.token()  # a change handler begins
    schedule.nudge("s1")  # a trial it creates appears
    token, due = schedule.take_due()
    assert due == [run("sweep", "s1")]
    schedule.reconciled("s1", token, after=0.5, ran=False)  # the loop found it busy
    assert schedule.seconds_to_next() == 0.5
    schedule.reconciled("s1", handler_token, handed_out=False)  # the handler ends
    clock.now += NUDGE_DELAY
    assert schedule.take_due()[1] == [run("sweep", "s1")]  # the trial is counted next


def test_target_comes_from_the_body_and_back() -> None:
    body = {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "a", "namespace": "ns", "uid": "u1", "generation": 3},
        "spec": {},
    }
    found = target("TrainingRun", body)
    assert found == run("a", "u1")
    assert found.body() == {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "a", "namespace": "ns", "uid": "u1"},
    }


def body(name: str) -> dict[str, Any]:
    meta = {"name": name, "namespace": "ns", "uid": f"uid-{name}"}
    return {"apiVersion": "llmops.dev/v1alpha1", "kind": "TrainingRun", "metadata": meta}


def test_the_runner_reconciles_every_seen_object_and_backs_off_on_errors() -> None:
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def handler(obj: dict[str, Any]) -> Outcome:
        name = obj["metadata"]["name"]
        with lock:
            calls[name] = calls.get(name, 0) + 1
        if name == "temporary":
            raise kopf.TemporaryError("wait", delay=30)
        if name == "broken":
            raise RuntimeError("boom")
        return Outcome.FINISHED if name == "finished" else Outcome.DONE

    resync = Resync(0.2, workers=2)
    resync.handle("TrainingRun", handler)
    resync.start()
    try:
        for name in ("ok", "temporary", "broken", "finished"):
            resync.seen("TrainingRun", body(name))
        time.sleep(0.3)
        assert calls == {}  # no kopf context adopted yet: nothing runs
        resync.adopt_context()
        deadline = time.monotonic() + 10
        while calls.get("ok", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        resync.stop()
    assert calls["ok"] >= 3  # every interval
    assert calls["temporary"] == 1  # its own delay (30 s) is longer than the test
    assert calls["finished"] == 1  # a finished object comes back after minutes
    # Another error: retried after ERROR_INTERVALS intervals, so fewer times than "ok".
    assert 1 <= calls["broken"] < calls["ok"]
    assert ERROR_INTERVALS < PERMANENT_ERROR_INTERVALS


def test_an_idle_object_is_looked_at_less_and_less_until_something_changes() -> None:
    clock = Clock()
    schedule = Schedule(5.0, clock)
    schedule.seen(run("a", "u1"))
    waits = []
    for idle in (True, True, True, True, False, True):
        token, due = schedule.take_due()
        assert due == [run("a", "u1")]
        schedule.reconciled("u1", token, idle=idle)
        waits.append(schedule.seconds_to_next())
        clock.now += waits[-1] or 0.0
    assert waits == [5.0, 10.0, 20.0, 20.0, 5.0, 5.0]  # a change starts it over


def test_a_child_nudges_its_controller_and_a_pod_its_jobs_owner() -> None:
    resync, clock = Resync(5.0, workers=1), Clock()
    resync.schedule = Schedule(5.0, clock)
    resync.seen("TrainingRun", body("r"))
    cache = {
        ("batch/v1", "Job", "ns", "r-workers-0"): {
            "metadata": {"ownerReferences": [{"uid": "uid-r", "controller": True}]}
        }
    }
    schedule = resync.schedule
    token, _ = schedule.take_due()
    schedule.reconciled("uid-r", token)
    assert schedule.take_due()[1] == []

    def peek(api_version: str, kind: str, namespace: str, name: str) -> Any:
        return cache.get((api_version, kind, namespace, name))

    job_ref = {"apiVersion": "batch/v1", "kind": "Job", "name": "r-workers-0", "uid": "j1"}
    pod = {"kind": "Pod", "metadata": {"namespace": "ns", "ownerReferences": [
        {**job_ref, "controller": True}]}}  # fmt: skip
    resync.nudge_owner(pod, peek)
    clock.now += NUDGE_DELAY
    token, due = schedule.take_due()
    assert [t.name for t in due] == ["r"]
    schedule.reconciled("uid-r", token)
    event = {"kind": "Event", "metadata": {"namespace": "ns"}, "involvedObject": job_ref}
    resync.nudge_owner(event, peek)  # the Job controller's FailedCreate
    clock.now += NUDGE_DELAY
    token, due = schedule.take_due()
    assert [t.name for t in due] == ["r"]
    schedule.reconciled("uid-r", token)
    unowned = {"kind": "Pod", "metadata": {"namespace": "ns"}}
    resync.nudge_owner(unowned, peek)
    resync.nudge_owner(pod, None)  # without the cache, only direct owners: the Job's
    clock.now += NUDGE_DELAY
    assert schedule.take_due()[1] == []  # neither reached the run


def test_a_resource_read_by_reconciles_nudges_its_readers() -> None:
    resync, clock = Resync(5.0, workers=1), Clock()
    resync.schedule = Schedule(5.0, clock)
    resync.seen("TrainingRun", body("r"))
    schedule = resync.schedule
    token, _ = schedule.take_due()
    schedule.reconciled("uid-r", token)
    schedule.reads("uid-r", "Dataset", "ns", "corpus")  # the run waits for its Dataset
    schedule.reads("unknown", "Dataset", "ns", "corpus")  # not an object here: ignored
    assert schedule.readers("Dataset", "ns", "corpus") == ["uid-r"]
    dataset = {"metadata": {"name": "other", "namespace": "ns"}}
    resync.nudge_readers("Dataset", dataset)
    assert schedule.take_due()[1] == []
    resync.nudge_readers("Dataset", {"metadata": {"name": "corpus", "namespace": "ns"}})
    clock.now += NUDGE_DELAY
    assert [t.name for t in schedule.take_due()[1]] == ["r"]
    schedule.forget("uid-r")
    assert schedule.readers("Dataset", "ns", "corpus") == []
    assert schedule._readers == {}  # a long-lived operator keeps no entry per deleted reader
