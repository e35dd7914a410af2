"""The one module through which controllers talk to the Kubernetes API.

`ensure` is the idempotent "make this child exist as built" path every controller uses: read
what is there, refuse to touch an object this owner does not control, and otherwise create or
converge it with server-side apply. Since child names are deterministic, an operator killed
between two creates and restarted finds the first child and creates only the second.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, NamedTuple

import kubernetes
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import DynamicApiError, NotFoundError, ResourceNotFoundError

from llmops.controllers.cache import (
    FIELD_SELECTORS,
    Store,
    WatchCache,
    covers,
    field_matcher,
    indexed_label,
    label_matcher,
)

FIELD_MANAGER = "llmops"
# Handlers run in a thread pool of this size (kopf's settings.execution.max_workers).
HANDLER_THREADS = 16
# Threads of the periodic reconcile (common.RESYNC); most of its reconciles write nothing.
RESYNC_THREADS = 8
# How long a kind the cluster does not serve is remembered as missing.
MISSING_TTL = 5.0


class ChildConflict(Exception):
    """A child's name is taken by an object the owner does not control."""


class ChildTerminating(Exception):
    """A child with this name is being deleted; creating it again must wait."""


class ChildRejected(Exception):
    """The API server refused a child as invalid (4xx): retrying the same spec cannot help;
    the owner's spec must change."""

    def __init__(self, kind: str, name: str, message: str) -> None:
        super().__init__(f"{kind} {name!r} was rejected by the API server: {message}")


# Answers that say the request itself is wrong. 404, 409 and 429 are not: they pass.
_REJECTIONS = frozenset({400, 403, 413, 422})


def _rejection_message(error: DynamicApiError) -> str:
    try:
        body = json.loads(error.body or "")
    except (TypeError, ValueError):
        return str(error.reason or error.status)
    return str(body.get("message") or error.reason)


def plain(_client: Any, data: Any) -> Any:
    """The dynamic client's responses as the JSON they are (`serializer=plain`): its
    ResourceInstance wraps every nested field in an object, only for callers to convert it
    back (a tenth of the operator's CPU when creating runs at scale)."""
    return data


class Ensured(NamedTuple):
    object: dict[str, Any]
    created: bool


def _contains(live: Any, desired: Any) -> bool:
    """Whether the live object already has every field the manifest sets (the server adds
    defaults and status, so equality is too strict). Saves an apply call per child and
    reconcile when nothing drifted."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            key in live and _contains(live[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(_contains(a, b) for a, b in zip(live, desired, strict=True))
        )
    return bool(live == desired)


def _controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            uid: str = ref["uid"]
            return uid
    return None


class Kube:
    def __init__(self, api_client: kubernetes.client.ApiClient | None = None) -> None:
        self.api_client = api_client or kubernetes.client.ApiClient()
        self.dynamic = DynamicClient(self.api_client)
        # The discovery cache is rebuilt on a miss (a kind the cluster does not serve, such
        # as KEDA's ScaledObject); two handler threads rebuilding it at once break it.
        self._discovery = threading.Lock()
        self._missing: dict[tuple[str, str], float] = {}
        self._resolved: dict[tuple[str, str], Any] = {}
        # The watch cache reads are served from, once the operator started it.
        self.cache: WatchCache | None = None

    def start_cache(
        self, on_change: Callable[[Mapping[str, Any]], None] | None = None
    ) -> WatchCache:
        """Serve reads from watches from now on (the operator's startup); a client of its
        own, so that long-running watches never hold the handler threads' connections.
        `on_change` is told of each object a watch event changed."""
        if self.cache is None:
            configuration = copy.copy(self.api_client.configuration)
            configuration.connection_pool_maxsize = 256
            dynamic = DynamicClient(kubernetes.client.ApiClient(configuration))
            self.cache = WatchCache(dynamic, self._resource, on_change)
        return self.cache

    def stop_cache(self) -> None:
        cache, self.cache = self.cache, None
        if cache is not None:
            cache.stop()

    def _written(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.cache is not None:
            self.cache.written(obj)
        return obj

    def _resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        # Resolved once: the dynamic client's lookup scans every served resource, and under
        # the lock every handler thread's read queued behind it (half the operator's CPU at
        # 1,000 runs). A served resource's path does not change while it is served.
        found = self._resolved.get(key)
        if found is not None:
            return found
        with self._discovery:
            if time.monotonic() - self._missing.get(key, -MISSING_TTL) < MISSING_TTL:
                raise ResourceNotFoundError(f"{kind} ({api_version}) is not served")
            try:
                found = self.dynamic.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                self._missing[key] = time.monotonic()  # ask again after a while (CRD installs)
                raise
            self._resolved[key] = found
            return found

    def ensure(self, manifest: Mapping[str, Any], *, update: bool = True) -> Ensured:
        """Create the child, or converge the existing one (unless `update` is False, for
        objects whose spec is immutable, such as Jobs). Returns the live object."""
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        existing = self._get(
            resource, manifest["apiVersion"], manifest["kind"], meta["name"], meta.get("namespace")
        )
        if existing is not None:
            wanted_owner = _controller_uid(manifest)
            if wanted_owner is not None and _controller_uid(existing) != wanted_owner:
                raise ChildConflict(
                    f"{manifest['kind']} {meta['name']!r} already exists and is not controlled "
                    f"by this resource; delete or rename it"
                )
            if existing["metadata"].get("deletionTimestamp"):
                raise ChildTerminating(f"{manifest['kind']} {meta['name']!r} is being deleted")
            if not update or _contains(existing, manifest):
                return Ensured(dict(existing), created=False)
        # Server-side apply creates or converges under one field manager, and is a no-op
        # (no new resourceVersion) when nothing differs.
        try:
            applied = resource.server_side_apply(
                body=dict(manifest),
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
                serializer=plain,
            )
        except DynamicApiError as error:
            if error.status in _REJECTIONS:
                message = _rejection_message(error)
                raise ChildRejected(manifest["kind"], meta["name"], message) from error
            raise
        return Ensured(self._written(applied), created=existing is None)

    def patch(
        self, api_version: str, kind: str, name: str, namespace: str | None, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """A JSON merge patch of selected fields (e.g. a Job's spec.suspend)."""
        patched = self._resource(api_version, kind).patch(
            body=dict(body),
            name=name,
            namespace=namespace,
            content_type="application/merge-patch+json",
            field_manager=FIELD_MANAGER,
            serializer=plain,
        )
        return self._written(patched)

    def patch_status(
        self, api_version: str, kind: str, name: str, namespace: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """A JSON merge patch of the status subresource; None when the object is gone."""
        try:
            patched = self._resource(api_version, kind).status.patch(
                body={"status": dict(status)},
                name=name,
                namespace=namespace,
                content_type="application/merge-patch+json",
                field_manager=FIELD_MANAGER,
                serializer=plain,
            )
        except NotFoundError:
            return None
        return self._written(patched)

    def pod_log_tail(self, name: str, namespace: str, lines: int = 100) -> str | None:
        """The end of a pod's log, or None where the node serves no logs."""
        core = kubernetes.client.CoreV1Api(self.api_client)
        try:
            text: str = core.read_namespaced_pod_log(name, namespace, tail_lines=lines)
        except (kubernetes.client.ApiException, OSError):
            return None
        return text

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        return self._get(self._resource(api_version, kind), api_version, kind, name, namespace)

    def _get(
        self, resource: Any, api_version: str, kind: str, name: str, namespace: str | None
    ) -> dict[str, Any] | None:
        store = self._store(api_version, kind, namespace, None)
        if store is not None:
            return store.get(namespace, name)
        try:
            found: dict[str, Any] = resource.get(name=name, namespace=namespace, serializer=plain)
        except NotFoundError:
            return None
        return found

    def _store(
        self, api_version: str, kind: str, namespace: str | None, field_selector: str | None
    ) -> Store | None:
        """The cache's store for a read, if it holds everything the read asks for (a kind
        watched with a field selector serves only reads asking for what it watches)."""
        if self.cache is None:
            return None
        if not covers(field_selector, FIELD_SELECTORS.get((api_version, kind))):
            return None
        return self.cache.store(api_version, kind, namespace)

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        resource = self._resource(api_version, kind)
        store = self._store(api_version, kind, namespace, field_selector)
        labels, fields = label_matcher(label_selector), field_matcher(field_selector)
        if store is not None and labels is not None and fields is not None:
            match = lambda o: labels(o) and fields(o)  # noqa: E731
            return store.items(namespace, match, indexed_label(label_selector))
        found = resource.get(
            namespace=namespace,
            label_selector=label_selector,
            field_selector=field_selector,
            serializer=plain,
        )
        items: list[dict[str, Any]] = found["items"]
        return items

    def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None = None,
        *,
        propagation: str = "Background",
    ) -> bool:
        """Delete if present; True when something was deleted. A kind the cluster does not
        serve (an uninstalled CRD) has nothing to delete either; nor has a kind whose watch
        cache holds no such object (a reconcile that deletes what may linger costs nothing)."""
        store = self.cache.store(api_version, kind, namespace) if self.cache else None
        if store is not None and store.get(namespace, name) is None:
            return False
        try:
            gone = self._resource(api_version, kind).delete(
                name=name, namespace=namespace, propagation_policy=propagation, serializer=plain
            )
        except (NotFoundError, ResourceNotFoundError):
            return False
        if self.cache is not None:
            last = gone if isinstance(gone, dict) else {}
            if last.get("kind") != kind:  # a Status, not the object: forget it by name
                last = {"apiVersion": api_version, "kind": kind, "metadata": {}}
                last["metadata"] = {"name": name, "namespace": namespace}
            self.cache.deleted(last)
        return True


@cache
def default_kube() -> Kube:
    """The process-wide client: in-cluster credentials, else the kubeconfig ($KUBECONFIG, read
    now rather than when the kubernetes package was imported)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config()
    else:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    configuration = kubernetes.client.Configuration.get_default_copy()
    # One connection per handler thread: urllib3's default pool of 4 would make kopf's
    # workers queue for a socket under load.
    configuration.connection_pool_maxsize = HANDLER_THREADS + RESYNC_THREADS
    return Kube(kubernetes.client.ApiClient(configuration))
