"""A pod's last word: a short JSON report left as the container's termination message, which
the operator reads from the pod status after the pod ends (Kubernetes keeps 4096 bytes)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmops.api.workload import Env, FailureReport

LIMIT = 4096


def write_termination_message(report: dict[str, Any]) -> None:
    """Write `report` where LLMOPS_TERMINATION_LOG says (the pod spec's
    terminationMessagePath). Without it, e.g. in a plain shell, there is nothing to write."""
    path = os.environ.get(Env.TERMINATION_LOG)
    if not path:
        return
    text = json.dumps(report, separators=(",", ":"))
    if len(text.encode()) > LIMIT:
        raise ValueError(f"termination report is {len(text.encode())} bytes, over {LIMIT}")
    Path(path).write_text(text)


def write_failure(stage: str, reason: str, message: str) -> None:
    """A FailureReport whose message is cut (at its end, the least useful part of a long
    error) to the longest prefix whose encoded JSON fits the limit: escaping makes bytes, not
    characters, count."""

    def report(length: int) -> FailureReport:
        return FailureReport(stage=stage, reason=reason, message=message[:length])

    def fits(length: int) -> bool:
        return len(report(length).to_json().encode()) <= LIMIT

    low, high = 0, len(message)
    while low < high:  # the longest prefix that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    write_termination_message(report(low).to_dict())
