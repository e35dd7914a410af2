"""A batch/v1 Job run locally: its indexes (Indexed Jobs), its parallelism, its retry
budget (backoffLimit, backoffLimitPerIndex) and its failure reasons, as the Job controller
has them. A gang (backoffLimit 0) fails as a whole when one pod fails."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmops.local.process import Ended, Process

POLL_SECONDS = 0.2
DEFAULT_BACKOFF_LIMIT = 6
EXIT_SIGTERM = 143


@dataclass
class PodResult:
    name: str
    index: int | None
    exit_code: int  # of the container that ended the pod (a failed init container's)
    message: str  # that container's termination message
    log_file: str
    init_containers: list[Ended] = field(default_factory=list)

    def as_pod(self) -> dict[str, Any]:
        """Shaped like a core/v1 Pod, for the controllers' helpers."""
        annotations = (
            {}
            if self.index is None
            else {"batch.kubernetes.io/job-completion-index": str(self.index)}
        )
        failed_init = any(c.exit_code != 0 for c in self.init_containers)
        container: dict[str, Any] = (
            {"waiting": {"reason": "PodInitializing"}}  # it never started
            if failed_init
            else {"terminated": {"exitCode": self.exit_code, "message": self.message}}
        )
        status: dict[str, Any] = {
            "phase": "Succeeded" if self.exit_code == 0 else "Failed",
            "containerStatuses": [{"state": container}],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [
                {"name": c.container, "state": {"terminated": terminated(c)}}
                for c in self.init_containers
            ]
        return {"metadata": {"name": self.name, "annotations": annotations}, "status": status}


def terminated(container: Ended) -> dict[str, Any]:
    """`state.terminated` of a container status, as the kubelet fills it in."""
    return {
        "exitCode": container.exit_code,
        "reason": "Completed" if container.exit_code == 0 else "Error",
        "message": container.message,
    }


@dataclass
class JobResult:
    succeeded: bool = False
    interrupted: bool = False
    failure: str | None = None
    failed_pod: PodResult | None = None
    pods: list[PodResult] = field(default_factory=list)

    def pod_objects(self) -> list[dict[str, Any]]:
        return [p.as_pod() for p in self.pods]


StartPod = Callable[[int | None], Process]


def terminate_all(processes: list[Process]) -> None:
    """SIGTERM to every pod at once, then SIGKILL to each still there at its deadline."""
    for process in processes:
        if process.poll() is None:
            process.signal(signal.SIGTERM)
    for process in processes:
        deadline = process.pod.grace_seconds
        try:
            process.popen.wait(deadline)
        except subprocess.TimeoutExpired:
            process.signal(signal.SIGKILL)
        process.wait()
        process.close()


def run_job(job: dict[str, Any], start_pod: StartPod, stop: threading.Event) -> JobResult:
    spec = job["spec"]
    indexed = spec.get("completionMode") == "Indexed"
    completions = int(spec.get("completions") or 1)
    parallelism = int(spec.get("parallelism") or 1)
    per_index = spec.get("backoffLimitPerIndex")
    backoff = int(spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT))
    pending: deque[int] = deque(range(completions))
    running: dict[int, Process] = {}
    failures: dict[int, int] = {}
    result = JobResult()
    while True:
        if stop.is_set():
            terminate_all(list(running.values()))
            result.interrupted = True
            return result
        while pending and len(running) < parallelism:
            index = pending.popleft()
            running[index] = start_pod(index if indexed else None)
        for index, process in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            del running[index]
            process.close()
            pod = PodResult(
                name=process.pod.name,
                index=index if indexed else None,
                exit_code=code,
                message=process.termination_message(),
                log_file=str(process.log_file),
                init_containers=list(process.init_ended),
            )
            result.pods.append(pod)
            if code == 0:
                continue
            failures[index] = failures.get(index, 0) + 1
            budget_left = (
                failures[index] <= int(per_index)
                if per_index is not None
                else sum(failures.values()) <= backoff
            )
            if budget_left and not stop.is_set():
                pending.appendleft(index)
                continue
            terminate_all(list(running.values()))
            reason = "FailedIndexes" if per_index is not None else "BackoffLimitExceeded"
            detail = pod.message.strip() or f"exit code {code}"
            result.failure = f"{reason}: pod {pod.name} failed ({detail})"
            result.failed_pod = pod
            return result
        if not running and not pending:
            result.succeeded = True
            return result
        time.sleep(POLL_SECONDS)
