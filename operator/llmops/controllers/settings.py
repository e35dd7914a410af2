"""kopf settings for the llmops operator (applied at start-up)."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from llmops import GROUP
from llmops.controllers.kube import HANDLER_THREADS

# The finalizer earlier versions of the operator had kopf put on every resource (kopf's timers
# need one). No handler needs it now; kopf, knowing its name, takes it off where it is left.
FINALIZER = f"{GROUP}/finalizer"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Ask the server to end watches regularly and give up on silent connections, so a
    # network hiccup never leaves the operator watching nothing.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    # kopf's own bookkeeping lives in annotations under our group, never in status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.reporting_component = "llmops-operator"
    # Handler logs become Events only from WARNING up: a handler run on every change must not
    # flood `kubectl describe`; the controllers post the notable transitions themselves.
    settings.posting.level = logging.WARNING
    settings.posting.event_name_prefix = "llmops-"
    # Retry transient errors with a capped exponential backoff.
    settings.queueing.error_delays = (1, 2, 4, 8, 15, 30, 60)
    settings.execution.max_workers = HANDLER_THREADS


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: its ServiceAccount token; elsewhere: the kubeconfig ($KUBECONFIG)."""
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(
        **kwargs
    ) or kopf.login_with_kubeconfig(**kwargs)
    return info
