"""The watch cache's store and event handling, with fake list and watch streams."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from llmops.controllers.cache import (
    Gone,
    Informer,
    Store,
    WatchCache,
    covers,
    field_matcher,
    indexed_label,
    label_matcher,
)


def obj(name: str, rv: int | str, namespace: str = "ns", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": str(rv),
            "labels": labels,
        },
    }


def event(kind: str, item: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": item}


def rv_of(store: Store, name: str) -> str | None:
    found = store.get("ns", name)
    return found["metadata"]["resourceVersion"] if found else None


def test_an_older_event_never_replaces_a_newer_object():
    store = Store()
    assert store.upsert(obj("a", 5))
    assert not store.upsert(obj("a", 4))
    assert not store.upsert(obj("a", 5))
    assert rv_of(store, "a") == "5"
    assert store.upsert(obj("a", 10))  # numeric, not string, order ("10" < "5" as text)
    assert rv_of(store, "a") == "10"


def test_resource_versions_that_are_not_integers_take_the_incoming_object():
    store = Store()
    store.upsert(obj("a", "x1"))
    assert store.upsert(obj("a", "x0"))
    assert rv_of(store, "a") == "x0"


def test_delete_events_remove_and_a_late_older_write_does_not_revive():
    store = Store()
    store.upsert(obj("a", 3))
    assert store.remove(obj("a", 7))
    assert store.get("ns", "a") is None
    assert not store.upsert(obj("a", 6))  # a write-through answer that lost the race
    assert store.get("ns", "a") is None
    assert store.upsert(obj("a", 9))  # recreated
    assert rv_of(store, "a") == "9"


def test_a_stale_delete_does_not_remove_a_recreated_object():
    store = Store()
    store.upsert(obj("a", 12))
    assert not store.remove(obj("a", 8))
    assert rv_of(store, "a") == "12"


def test_relist_replaces_the_store_but_keeps_newer_writes():
    store = Store()
    store.upsert(obj("gone", 2))
    store.upsert(obj("kept", 3))
    store.upsert(obj("written-after-list", 30))  # the operator's own write, after the list
    store.upsert(obj("updated", 25))  # newer than the list's copy
    store.replace([obj("kept", 3), obj("updated", 4), obj("new", 15)], "20")
    assert {o["metadata"]["name"] for o in store.items("ns")} == {
        "kept",
        "new",
        "updated",
        "written-after-list",
    }
    assert rv_of(store, "updated") == "25"


def test_relist_does_not_revive_what_was_deleted_after_it():
    store = Store()
    store.upsert(obj("a", 5))
    store.remove(obj("a", 25))
    store.replace([obj("a", 5)], "20")
    assert store.get("ns", "a") is None


def test_reads_are_copies():
    store = Store()
    store.upsert(obj("a", 1, app="x"))
    read = store.get("ns", "a")
    assert read is not None
    read["metadata"]["labels"]["app"] = "changed"
    assert store.items("ns")[0]["metadata"]["labels"] == {"app": "x"}


def test_items_by_namespace_and_selector():
    store = Store()
    store.upsert(obj("a", 1, role="worker"))
    store.upsert(obj("b", 2, role="config"))
    store.upsert(obj("c", 3, namespace="other", role="worker"))
    match = label_matcher("role=worker")
    assert match is not None
    assert [o["metadata"]["name"] for o in store.items("ns", match)] == ["a"]
    assert len(store.items(None, match)) == 2


def test_the_label_index_follows_changes_deletes_and_relists():
    store = Store()
    store.upsert(obj("a", 1, job="x"))
    store.upsert(obj("b", 2, job="x"))
    store.upsert(obj("a", 3, job="y"))  # relabelled
    names = lambda job: [o["metadata"]["name"] for o in store.items("ns", None, ("job", job))]  # noqa: E731
    assert names("x") == ["b"] and names("y") == ["a"]
    store.remove(obj("b", 4, job="x"))
    assert names("x") == []
    store.replace([obj("c", 5, job="x"), obj("a", 3, job="y")], "5")
    assert names("x") == ["c"] and names("y") == ["a"] and names("z") == []
    assert indexed_label("a!=b,job==x") == ("job", "x")
    assert indexed_label("env in (a,b)") is None and indexed_label(None) is None


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("job-name=demo", {"job-name": "demo"}, True),
        ("job-name==demo", {"job-name": "other"}, False),
        ("a=1,b!=2", {"a": "1", "b": "3"}, True),
        ("a=1,b!=2", {"a": "1", "b": "2"}, False),
        ("a", {"a": ""}, True),
        ("!a", {"a": ""}, False),
        ("", {}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], expected: bool):
    match = label_matcher(selector)
    assert match is not None
    assert match({"metadata": {"labels": labels}}) is expected


def test_set_based_selectors_and_inequalities_go_to_the_api():
    assert label_matcher("env in (a,b)") is None
    assert field_matcher("metadata.name!=a") is None
    match = field_matcher("metadata.name=a")
    assert match is not None and match(obj("a", 1)) and not match(obj("b", 1))


def test_field_selectors_match_nested_fields():
    failed = {"reason": "FailedCreate", "involvedObject": {"kind": "Job", "name": "j"}}
    match = field_matcher("reason=FailedCreate,involvedObject.kind==Job,involvedObject.name=j")
    assert match is not None and match(failed)
    assert not match({**failed, "involvedObject": {"kind": "Job", "name": "k"}})
    assert not match({"reason": "FailedCreate"})  # a missing field matches no value


def test_a_store_watched_with_a_field_selector_serves_only_reads_asking_for_it():
    watched = "reason=FailedCreate"
    assert covers("reason=FailedCreate,involvedObject.name=j", watched)
    assert not covers("involvedObject.name=j", watched)  # other reasons are not held
    assert not covers(None, watched)  # nor a get by name
    assert not covers("reason=FailedScheduling", watched)
    assert covers(None, None) and covers("metadata.name=a", None)
    assert not covers("metadata.name!=a", None)


class FakeServer:
    """Lists and watch streams scripted by the test."""

    def __init__(self, lists: list[dict[str, Any]], watches: list[list[dict[str, Any]]]):
        self.lists, self.watches = lists, watches
        self.list_params: list[dict[str, Any]] = []
        self.watch_params: list[dict[str, Any]] = []
        self.done = threading.Event()

    def list_fn(self, params: dict[str, Any]) -> dict[str, Any]:
        self.list_params.append(params)
        return self.lists.pop(0)

    def watch_fn(self, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self.watch_params.append(params)
        if not self.watches:
            self.done.set()
            raise ConnectionError("no more streams")
        yield from self.watches.pop(0)


def listing(version: str, *items: dict[str, Any]) -> dict[str, Any]:
    bare = [{k: v for k, v in i.items() if k not in ("apiVersion", "kind")} for i in items]
    return {"metadata": {"resourceVersion": version}, "items": bare}


def test_informer_lists_then_watches_from_the_list_version():
    server = FakeServer(
        [listing("10", obj("a", 3))],
        [
            [
                event("ADDED", obj("b", 11)),
                event("MODIFIED", obj("a", 12)),
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}},
            ],
            [event("DELETED", obj("b", 16))],
        ],
    )
    informer = Informer("cm", server.list_fn, server.watch_fn, api_version="v1", kind="ConfigMap")
    version = informer.list_once()
    assert informer.synced.is_set() and version == "10"
    assert informer.store.get("ns", "a")["kind"] == "ConfigMap"  # type: ignore[index]
    version = informer.watch_once(version)
    assert version == "15" and server.watch_params[0]["resource_version"] == "10"
    assert server.watch_params[0]["allow_watch_bookmarks"] is True
    assert rv_of(informer.store, "a") == "12"
    informer.watch_once(version)
    assert server.watch_params[1]["resource_version"] == "15"
    assert informer.store.get("ns", "b") is None


def test_gone_relists_and_the_new_list_replaces_the_store():
    server = FakeServer(
        [listing("10", obj("a", 3), obj("b", 4)), listing("50", obj("b", 40), obj("c", 45))],
        [[{"type": "ERROR", "object": {"code": 410, "message": "too old"}}]],
    )
    informer = Informer("cm", server.list_fn, server.watch_fn, label_selector="x=y")
    with pytest.raises(Gone):
        informer.watch_once(informer.list_once())
    informer.list_once()
    assert [o["metadata"]["name"] for o in informer.store.items("ns")] == ["b", "c"]
    assert server.list_params == [{"label_selector": "x=y"}] * 2


def test_the_thread_relists_after_gone_and_keeps_going_after_errors(
    monkeypatch: pytest.MonkeyPatch,
):
    server = FakeServer(
        [listing("10", obj("a", 3)), listing("50", obj("c", 45)), listing("60")],
        [[{"type": "ERROR", "object": {"code": 410}}], [event("ADDED", obj("d", 51))]],
    )
    informer = Informer("cm", server.list_fn, server.watch_fn)
    monkeypatch.setattr("llmops.controllers.cache.MAX_BACKOFF", 0.01)
    thread = threading.Thread(target=informer.run, daemon=True)
    thread.start()
    assert server.done.wait(5)
    informer.stop()
    informer.stopped.set()
    thread.join(5)
    assert not thread.is_alive()
    assert informer.relists >= 2
    assert informer.store.get("ns", "c") is not None


def test_write_through_is_read_at_once_and_a_later_event_of_it_changes_nothing():
    cache = WatchCache(dynamic=None, resolve=lambda *_: None)
    informer = Informer("cm", lambda _: listing("1"), lambda _: iter(()), api_version="v1")
    informer.kind = "ConfigMap"
    informer.list_once()
    cache._informers[("v1", "ConfigMap", "ns")] = informer
    assert cache.store("v1", "ConfigMap", "ns") is informer.store

    cache.written(obj("a", 7))
    assert rv_of(informer.store, "a") == "7"
    informer.handle(event("ADDED", obj("a", 6)))  # the watch catching up with an older one
    assert rv_of(informer.store, "a") == "7"
    cache.deleted(obj("a", 8))
    assert informer.store.get("ns", "a") is None
    informer.handle(event("MODIFIED", obj("a", 7)))
    assert informer.store.get("ns", "a") is None


def test_cluster_wide_reads_are_not_cached():
    cache = WatchCache(dynamic=None, resolve=lambda *_: None)
    assert cache.store("v1", "ConfigMap", None) is None


def test_an_informer_lists_and_watches_with_its_field_selector():
    server = FakeServer([listing("10")], [[]])
    informer = Informer("ev", server.list_fn, server.watch_fn, field_selector="reason=X")
    informer.watch_once(informer.list_once())
    assert server.list_params == [{"field_selector": "reason=X"}]
    assert server.watch_params[0]["field_selector"] == "reason=X"


def test_cached_objects_leave_out_managed_fields() -> None:
    from llmops.controllers.cache import Store

    store = Store()
    managed = [{"manager": "llmops", "operation": "Apply", "fieldsV1": {"f:spec": {}}}]
    obj = {"metadata": {"name": "a", "namespace": "n", "resourceVersion": "5",
                        "managedFields": managed}, "spec": {"x": 1}}  # fmt: skip
    store.upsert(obj)
    assert store.get("n", "a") == {
        "metadata": {"name": "a", "namespace": "n", "resourceVersion": "5"},
        "spec": {"x": 1},
    }
    assert obj["metadata"]["managedFields"] == managed  # the caller's object is untouched
    store.replace([{**obj, "metadata": {**obj["metadata"], "resourceVersion": "6"}}], "6")
    assert "managedFields" not in store.get("n", "a")["metadata"]


def test_cached_pods_leave_out_their_spec_jobs_their_template_other_kinds_keep_all() -> None:
    store = Store()
    pod = {**obj("p", 1), "kind": "Pod", "spec": {"containers": []}, "status": {"phase": "Running"}}
    store.upsert(pod)
    cached = store.get("ns", "p")
    assert cached is not None and "spec" not in cached and cached["status"]["phase"] == "Running"
    template = {"spec": {"containers": [{"name": "trainer"}]}}
    job = {**obj("j", 2), "kind": "Job", "spec": {"suspend": True, "template": template}}
    store.upsert(job)
    assert store.get("ns", "j")["spec"] == {"suspend": True}  # type: ignore[index]
    assert job["spec"]["template"] == template  # the caller's object is untouched
    store.upsert({**obj("j2", 3), "kind": "Job"})  # a Job without a spec stays one
    assert "spec" not in store.get("ns", "j2")  # type: ignore[operator]
    config = {**obj("c", 4), "kind": "ConfigMap", "data": {"config.json": "{}"}}
    store.upsert(config)
    assert store.get("ns", "c") == config
