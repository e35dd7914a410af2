"""One pod as a sequence of process groups: its init containers one after another, each to
a successful end, then its container, as the kubelet runs them; output to the pod's log file
(and to a line callback); stopped the way the kubelet stops a container: SIGTERM, a grace
period, then SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmops.local.pod import LocalPod

LineCallback = Callable[[str, str], None]  # (pod name, line)
TAIL_LINES = 40
MESSAGE_LIMIT = 4096  # what the kubelet keeps of a termination message


@dataclass(frozen=True)
class Ended:
    """An init container that ran to its end: what the pod status shows of it."""

    container: str
    exit_code: int
    message: str


def read_message(container: LocalPod) -> str:
    """What a container left at its terminationMessagePath (capped like the kubelet)."""
    try:
        return container.termination_file.read_text(errors="replace")[:MESSAGE_LIMIT]
    except OSError:
        return ""


class Process:
    """A started pod. `env` is the environment of its container, `init_env` that of each of
    its init containers. The next container starts when `poll` or `wait` sees the previous
    one succeed; an init container that fails ends the pod and its container never starts.
    A detached pod outlives this process, so its init containers run to their end here."""

    def __init__(
        self,
        pod: LocalPod,
        env: Mapping[str, str],
        log_file: Path,
        on_line: LineCallback | None = None,
        *,
        detach: bool = False,
        init_env: Sequence[Mapping[str, str]] = (),
    ) -> None:
        if len(init_env) != len(pod.init_containers):
            raise ValueError(f"pod {pod.name}: an environment for each init container is needed")
        self.pod = pod
        self.log_file = log_file
        self.on_line = on_line
        self.detach = detach
        self.init_ended: list[Ended] = []
        self._waiting = deque(zip((*pod.init_containers, pod), (*init_env, env), strict=True))
        self._lock = threading.Lock()  # one container starts at a time, even from a handler
        self._signalled: int | None = None  # once stopping, no further container starts
        self._ended_in_init: int | None = None  # the exit code of a pod ended before its start
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_file.open("ab")
        self._reader: threading.Thread | None = None
        self.container, self.popen = self._start_next()
        self.started = time.monotonic()
        if detach:
            while self.container is not pod and self.poll() is None:
                self.popen.wait()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def failed_init(self) -> Ended | None:
        """The init container that failed the pod, if one did."""
        last = self.init_ended[-1] if self.init_ended else None
        return last if last is not None and last.exit_code != 0 else None

    def _start_next(self) -> tuple[LocalPod, subprocess.Popen[bytes]]:
        container, env = self._waiting.popleft()
        container.termination_file.parent.mkdir(parents=True, exist_ok=True)
        container.termination_file.unlink(missing_ok=True)
        label = "" if container is self.pod else f"[init container {container.container}] "
        self._log.write(f"==> {label}{' '.join(container.argv)}\n".encode())
        self._log.flush()
        # Its own session: Ctrl-C in the terminal reaches us only, and we stop the children
        # in order (SIGTERM first, so the trainer can checkpoint).
        popen = subprocess.Popen(
            container.argv,
            env=dict(env),
            cwd=container.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log if self.detach else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self._signalled is not None:  # stopped while this one was being started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, self._signalled)
        self._reader = None
        if not self.detach:
            self._reader = threading.Thread(target=self._pump, args=(popen,), daemon=True)
            self._reader.start()
        return container, popen

    def _pump(self, popen: subprocess.Popen[bytes]) -> None:
        assert popen.stdout is not None
        for raw in popen.stdout:
            self._log.write(raw)
            self._log.flush()
            if self.on_line is not None:
                line = raw.decode(errors="replace").rstrip("\n")
                with contextlib.suppress(Exception):  # a view error must not stop the pod
                    self.on_line(self.pod.name, line)

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)

    def poll(self) -> int | None:
        """None while the pod runs, else the exit code of the container that ended it: a
        failed init container, or the pod's container."""
        if not self._lock.acquire(blocking=False):
            return None  # another caller is starting the next container
        try:
            while self._ended_in_init is None:
                code = self.popen.poll()
                if code is None:
                    return None
                self._join_reader()
                if self.container is self.pod:
                    return code
                ended = Ended(self.container.container, code, read_message(self.container))
                self.init_ended.append(ended)
                if code != 0 or self._signalled is not None:
                    self._ended_in_init = code  # the pod's container never starts
                    return code
                self.container, self.popen = self._start_next()
            return self._ended_in_init
        finally:
            self._lock.release()

    def wait(self, timeout: float | None = None) -> int:
        """The pod's exit code (see poll); TimeoutExpired after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.popen.wait(left)  # TimeoutExpired when the current container outlives it
        return code

    def signal(self, signum: int) -> None:
        self._signalled = signum
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)

    def terminate(self, grace: float | None = None) -> int:
        """SIGTERM to the process group, SIGKILL after the pod's grace period."""
        if self.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.wait(self.pod.grace_seconds if grace is None else grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
        code = self.wait()
        self.close()
        return code

    def close(self) -> None:
        self._join_reader()
        with contextlib.suppress(OSError):
            self._log.close()

    def termination_message(self) -> str:
        """The termination message of the container that ended the pod: a failed init
        container's (the pod's container never ran), else the pod's container's."""
        failed = self.failed_init
        return failed.message if failed is not None else read_message(self.pod)


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
