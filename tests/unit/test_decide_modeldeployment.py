"""Why a server container stopped, as the ModelDeployment's Degraded condition says it."""

from __future__ import annotations

from typing import Any

import pytest

from llmops.api.workload import FailureReport
from llmops.decide.modeldeployment import server_failure

pytestmark = pytest.mark.unit


def pod(name: str = "server", **states: dict[str, Any]) -> dict[str, Any]:
    return {"status": {"containerStatuses": [{"name": name, **states}]}}


def terminated(code: int, message: str = "", reason: str = "Error") -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "message": message, "reason": reason}}


def test_the_servers_own_report_wins() -> None:
    report = FailureReport(stage="serve", reason="UnsupportedModel", message="use runtime vllm")
    found = server_failure([pod(lastState=terminated(1, report.to_json()))])
    assert found == report


def test_a_crash_without_a_report_shows_the_exit_and_the_log_tail() -> None:
    log = "line\n" * 400 + "torch.OutOfMemoryError: CUDA out of memory"
    found = server_failure([pod(state=terminated(1, log))])
    assert found is not None and found.reason == "ServerCrashed"
    assert found.message.startswith("exit code 1 (Error): ")
    assert found.message.endswith("CUDA out of memory") and len(found.message) < 700

    killed = server_failure([pod(lastState=terminated(137, reason="OOMKilled"))])
    assert killed is not None and killed.message == "exit code 137 (OOMKilled)"


def test_a_drained_server_or_another_container_is_no_failure() -> None:
    assert server_failure([pod(lastState=terminated(0, reason="Completed"))]) is None
    assert server_failure([pod("sidecar", state=terminated(1, "boom"))]) is None
    assert server_failure([{"status": {}}]) is None


def test_a_ready_servers_old_crash_is_history_and_a_failed_download_is_named() -> None:
    ready = pod(lastState=terminated(1, "boom"))
    ready["status"]["containerStatuses"][0]["ready"] = True
    assert server_failure([ready]) is None

    report = FailureReport(stage="model-init", reason="ModelNotFound", message="no s3://m/x")
    fetching = {
        "status": {
            "initContainerStatuses": [
                {"name": "model-init", "state": terminated(1, report.to_json())}
            ]
        }
    }
    assert server_failure([fetching]) == report
