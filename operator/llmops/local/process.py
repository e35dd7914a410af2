"""One pod as one process group: output to a log file (and to a line callback), stopped the
way the kubelet stops a container: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from llmops.local.pod import LocalPod

LineCallback = Callable[[str, str], None]  # (pod name, line)
TAIL_LINES = 40


class Process:
    def __init__(
        self,
        pod: LocalPod,
        env: Mapping[str, str],
        log_file: Path,
        on_line: LineCallback | None = None,
        *,
        detach: bool = False,
    ) -> None:
        self.pod = pod
        self.log_file = log_file
        self.on_line = on_line
        log_file.parent.mkdir(parents=True, exist_ok=True)
        pod.termination_file.parent.mkdir(parents=True, exist_ok=True)
        pod.termination_file.unlink(missing_ok=True)
        self._log = log_file.open("ab")
        self._log.write(f"==> {' '.join(pod.argv)}\n".encode())
        self._log.flush()
        # Its own session: Ctrl-C in the terminal reaches us only, and we stop the children
        # in order (SIGTERM first, so the trainer can checkpoint).
        self.popen = subprocess.Popen(
            pod.argv,
            env=dict(env),
            cwd=pod.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log if detach else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started = time.monotonic()
        self._reader: threading.Thread | None = None
        if not detach:
            self._reader = threading.Thread(target=self._pump, daemon=True)
            self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self._log.write(raw)
            self._log.flush()
            if self.on_line is not None:
                line = raw.decode(errors="replace").rstrip("\n")
                with contextlib.suppress(Exception):  # a view error must not stop the pod
                    self.on_line(self.pod.name, line)

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None and self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def wait(self, timeout: float | None = None) -> int:
        code = self.popen.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)

    def terminate(self, grace: float | None = None) -> int:
        """SIGTERM to the process group, SIGKILL after the pod's grace period."""
        if self.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(self.pod.grace_seconds if grace is None else grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
        code = self.wait()
        self.close()
        return code

    def close(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)
        with contextlib.suppress(OSError):
            self._log.close()

    def termination_message(self) -> str:
        """What the container left at its terminationMessagePath (capped like the kubelet)."""
        try:
            return self.pod.termination_file.read_text(errors="replace")[:4096]
        except OSError:
            return ""


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
