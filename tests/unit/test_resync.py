"""The periodic reconcile's schedule (a fake clock) and its runner (real threads, kopf's
error classes)."""

from __future__ import annotations

import threading
import time
from typing import Any

import kopf

from llmops.controllers.resync import (
    ERROR_INTERVALS,
    PERMANENT_ERROR_INTERVALS,
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
    assert schedule.take_due() == [run("a", "u1")]
    assert schedule.take_due() == []  # handed out: not again until it is back
    assert schedule.seconds_to_next() is None
    schedule.reconciled("u1")
    assert schedule.take_due() == []
    assert schedule.seconds_to_next() == 5.0
    clock.now += 5.0
    assert schedule.take_due() == [run("a", "u1")]


def test_due_objects_come_oldest_first_and_errors_push_them_back() -> None:
    clock = Clock()
    schedule = Schedule(5.0, clock)
    schedule.seen(run("a", "u1"))
    clock.now += 1
    schedule.seen(run("b", "u2"))
    assert [t.name for t in schedule.take_due()] == ["a", "b"]
    schedule.reconciled("u1", after=60.0)
    schedule.reconciled("u2")
    clock.now += 5.0
    assert [t.name for t in schedule.take_due()] == ["b"]
    assert schedule.seconds_to_next() == 55.0


def test_a_change_handler_postpones_and_forgetting_removes() -> None:
    clock = Clock()
    schedule = Schedule(5.0, clock)
    schedule.seen(run("a", "u1"))
    schedule.postpone("u1")  # the change handler just reconciled it
    assert schedule.take_due() == []
    clock.now += 5.0
    schedule.forget("u1")
    assert schedule.take_due() == [] and len(schedule) == 0
    schedule.reconciled("u1")  # a reconcile that ends after the deletion brings nothing back
    assert len(schedule) == 0 and schedule.seconds_to_next() is None


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

    def handler(obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        with lock:
            calls[name] = calls.get(name, 0) + 1
        if name == "temporary":
            raise kopf.TemporaryError("wait", delay=30)
        if name == "broken":
            raise RuntimeError("boom")

    resync = Resync(0.2, workers=2)
    resync.handle("TrainingRun", handler)
    resync.start()
    try:
        for name in ("ok", "temporary", "broken"):
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
    # Another error: retried after ERROR_INTERVALS intervals, so fewer times than "ok".
    assert 1 <= calls["broken"] < calls["ok"]
    assert ERROR_INTERVALS < PERMANENT_ERROR_INTERVALS
