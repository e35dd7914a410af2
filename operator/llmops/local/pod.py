"""A pod template -> the command, environment and folders of a local process.

What changes on the way, and only this:
- container paths under a volume mount become the mounted host folders (in env values and
  args that start with a mount path, also as `--flag=/path`);
- cluster DNS names of the gang's peers and Services become 127.0.0.1;
- declared container ports become free local ports (peers on a cluster share a port number
  but not an address; here they share the address);
- `python` and other executables resolve in the running interpreter's environment (the image
  is not used);
- an Indexed Job's pod gets its completion index annotation and JOB_COMPLETION_INDEX, as the
  Job controller sets them.

Init containers are translated by the same code as the pod's container, each with its own
mount table and termination message file; `process.Process` runs them in order first.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops.local import expand
from llmops.local.network import LOOPBACK
from llmops.local.volumes import MountTable

COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
DEFAULT_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class Rewriter:
    """Maps one literal of the pod spec to its local form."""

    mounts: MountTable
    hosts: frozenset[str] = frozenset()
    ports: Mapping[int, int] = field(default_factory=dict)

    def __call__(self, value: str) -> str:
        if value.startswith("--") and "=" in value:
            flag, _, rest = value.partition("=")
            return f"{flag}={self(rest)}"
        path = self.mounts.host_path(value)
        if path is not None:
            return path
        if value in self.hosts:
            return LOOPBACK
        host, sep, port = value.rpartition(":")
        if sep and host in self.hosts and port.isdigit():
            return f"{LOOPBACK}:{self._port(port)}"
        return self._port(value)

    def _port(self, value: str) -> str:
        if value.isdigit() and int(value) in self.ports:
            return str(self.ports[int(value)])
        return value


@dataclass(frozen=True)
class LocalPod:
    """Everything needed to start one pod's (single) container as a process, and before it
    its init containers (each a LocalPod of the same pod, without init containers)."""

    name: str
    argv: list[str]
    env: dict[str, str]  # the container's own env, resolved and rewritten
    mounts: MountTable
    termination_file: Path
    grace_seconds: float
    cwd: Path
    index: int | None = None
    container: str = ""  # the container's name in the pod spec
    init_containers: tuple[LocalPod, ...] = ()


def pod_object(
    template: Mapping[str, Any], name: str, namespace: str, index: int | None
) -> dict[str, Any]:
    """The pod as the Job controller would create it (what fieldRefs read)."""
    metadata = dict(template.get("metadata") or {})
    annotations = dict(metadata.get("annotations") or {})
    if index is not None:
        annotations[COMPLETION_INDEX_ANNOTATION] = str(index)
    metadata.update(name=name, namespace=namespace, annotations=annotations)
    return {"metadata": metadata, "spec": template["spec"]}


def container_ports(pod_spec: Mapping[str, Any]) -> list[int]:
    return [
        int(port["containerPort"])
        for container in pod_spec.get("containers") or []
        for port in container.get("ports") or []
    ]


def resolve_executable(program: str) -> str:
    """`python` is this interpreter; other programs come from its environment first."""
    if program in ("python", "python3"):
        return sys.executable
    if "/" in program:
        return program
    candidate = Path(sys.executable).parent / program
    return str(candidate) if candidate.exists() else program


def translate(
    template: Mapping[str, Any],
    *,
    name: str,
    namespace: str,
    mounts: MountTable,
    termination_file: Path,
    hosts: frozenset[str] = frozenset(),
    ports: Mapping[int, int] | None = None,
    index: int | None = None,
    cwd: Path | None = None,
    init: Sequence[tuple[MountTable, Path]] = (),
    lookup: expand.Lookup = expand.no_lookup,
) -> LocalPod:
    """The pod's container with `mounts` and `termination_file`; `init` holds the mount
    table and termination file of each of `spec.initContainers`, in order."""
    spec = template["spec"]
    containers = spec.get("containers") or []
    if len(containers) != 1:
        raise ValueError(f"pod {name}: the local runtime runs pods of exactly one container")
    init_specs = spec.get("initContainers") or []
    if len(init) != len(init_specs):
        raise ValueError(f"pod {name}: {len(init_specs)} init container(s), {len(init)} given")
    pod = pod_object(template, name, namespace, index)

    def local(container: Mapping[str, Any], table: MountTable, file: Path) -> LocalPod:
        return _container(
            container,
            pod,
            Rewriter(table, hosts, dict(ports or {})),
            termination_file=file,
            grace_seconds=float(spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)),
            index=index,
            cwd=cwd,
            lookup=lookup,
        )

    main = local(containers[0], mounts, termination_file)
    inits = tuple(local(c, t, f) for c, (t, f) in zip(init_specs, init, strict=True))
    return dataclasses.replace(main, init_containers=inits)


def _container(
    container: Mapping[str, Any],
    pod: Mapping[str, Any],
    rewrite: Rewriter,
    *,
    termination_file: Path,
    grace_seconds: float,
    index: int | None,
    cwd: Path | None,
    lookup: expand.Lookup = expand.no_lookup,
) -> LocalPod:
    """One container (init or not) of `pod`: env, command and working folder rewritten."""
    env = expand.resolve_env(container, pod, rewrite, lookup)
    if index is not None:
        # The Job controller sets it in every container of the pod, init containers too.
        env.setdefault("JOB_COMPLETION_INDEX", str(index))
    argv = expand.command_line(container, env, rewrite)
    argv[0] = resolve_executable(argv[0])
    working = container.get("workingDir")
    return LocalPod(
        name=pod["metadata"]["name"],
        argv=argv,
        env=env,
        mounts=rewrite.mounts,
        termination_file=termination_file,
        grace_seconds=grace_seconds,
        cwd=Path(rewrite(working)) if working else (cwd or Path.cwd()),
        index=index,
        container=str(container.get("name") or ""),
    )


def process_env(pod: LocalPod, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This machine's environment (PATH, the virtualenv) under the pod's own variables."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env.update(pod.env)
    env.update(extra or {})
    return env
