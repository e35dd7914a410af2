"""A pod's last word: a short JSON report left as the container's termination message, which
the operator reads from the pod status after the pod ends (Kubernetes keeps 4096 bytes)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmops.api.workload import Env

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
