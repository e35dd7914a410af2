"""What the per-kind runners share: the state directory, the resources seen so far, the
ConfigMaps the builders made, the stop signal, the view, and how a pod is started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from llmops import conditions as cond
from llmops.local import state, volumes
from llmops.local.pod import DEFAULT_TERMINATION_PATH, LocalPod, process_env, translate
from llmops.local.process import LineCallback, Process
from llmops.local.volumes import MountTable

Key = tuple[str, str, str]  # kind, namespace, name


class View(Protocol):
    def update(self, key: Key, **fields: Any) -> None: ...
    def message(self, text: str) -> None: ...
    def failure(self, key: Key, log_file: str, tail: str) -> None: ...


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return body["kind"], meta["namespace"], meta["name"]


def local_gpus() -> int:
    """GPUs on this machine, without importing torch (the operator package never does)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


@dataclass
class Context:
    layout: state.Layout
    view: View
    stop: threading.Event = field(default_factory=threading.Event)
    gpus: int = 0
    cwd: Path = field(default_factory=Path.cwd)
    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    configmaps: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # decoded
    processes: list[Process] = field(default_factory=list)

    def kill_all(self) -> None:
        """A second Ctrl-C: no more grace."""
        for process in self.processes:
            if process.poll() is None:
                process.signal(signal.SIGKILL)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A resource of this run, else one an earlier run left in the state directory."""
        found = self.objects.get((kind, namespace, name))
        return found or state.load_object(self.layout, kind, namespace, name)

    def save(self, body: dict[str, Any], status: Mapping[str, Any]) -> None:
        """Write the status as the operator would patch it, with events for transitions."""
        before = body.get("status") or {}
        new = dict(status)
        new["observedGeneration"] = body["metadata"].get("generation")
        for condition in new.get("conditions") or []:
            old = cond.get_condition(before.get("conditions"), condition["type"])
            transition = old is None or (old.get("status"), old.get("reason")) != (
                condition["status"],
                condition["reason"],
            )
            if transition and condition["status"] == "True":
                state.append_event(self.layout, body, condition)
        body["status"] = new
        self.objects[key_of(body)] = body
        state.save_object(self.layout, body)
        self.view.update(key_of(body), status=new)

    def record_children(
        self, body: Mapping[str, Any], children: list[dict[str, Any] | None]
    ) -> None:
        """Keep the builders' objects for inspection; remember ConfigMaps for volumes."""
        kind, namespace, name = key_of(body)
        folder = self.layout.resource_dir(kind, namespace, name) / "children"
        for child in children:
            if child is None:
                continue
            if child["kind"] == "ConfigMap":
                self.configmaps[(namespace, child["metadata"]["name"])] = child
            target = folder / f"{child['kind'].lower()}-{child['metadata']['name']}.yaml"
            state.write_atomic(target, yaml.safe_dump(child, sort_keys=False))

    def log_file(self, body: Mapping[str, Any], pod: str) -> Path:
        kind, namespace, name = key_of(body)
        return self.layout.log_file(kind, namespace, name, pod)

    def prepare_pod(
        self,
        body: Mapping[str, Any],
        template: Mapping[str, Any],
        pod_name: str,
        *,
        index: int | None = None,
        hosts: frozenset[str] = frozenset(),
        ports: Mapping[int, int] | None = None,
    ) -> LocalPod:
        namespace = body["metadata"]["namespace"]
        spec = template["spec"]
        configmaps = {n: c for (ns, n), c in self.configmaps.items() if ns == namespace}
        secrets = {n: values for (ns, n), values in self.secrets.items() if ns == namespace}
        pod_dir = self.layout.pod_dir(namespace, pod_name)

        def lookup(kind: str, name: str, key: str) -> str | None:
            if kind == "Secret":
                return secrets.get(name, {}).get(key)
            data = (configmaps.get(name) or {}).get("data") or {}
            value = data.get(key)
            return None if value is None else str(value)

        def files(container: Mapping[str, Any], folder: Path) -> tuple[MountTable, Path]:
            """A container's mounts (folders made) and its termination message file."""
            table = volumes.mount_table(spec, container, self.layout, namespace, pod_name)
            volumes.materialize(table, spec, configmaps, secrets)
            termination = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
            return table, folder / termination.lstrip("/")

        table, termination_file = files(spec["containers"][0], pod_dir)
        # Each init container has a file of its own: they share the default path.
        init = [files(c, pod_dir / "init" / c["name"]) for c in spec.get("initContainers") or []]
        return translate(
            template,
            name=pod_name,
            namespace=namespace,
            mounts=table,
            termination_file=termination_file,
            hosts=hosts,
            ports=ports,
            index=index,
            cwd=self.cwd,
            init=init,
            lookup=lookup,
        )

    def start(
        self,
        body: Mapping[str, Any],
        pod: LocalPod,
        on_line: LineCallback | None = None,
        *,
        extra_env: Mapping[str, str] | None = None,
        detach: bool = False,
    ) -> Process:
        extra = {
            "PYTHONUNBUFFERED": "1",  # progress lines arrive as they are printed
            # An image ships DeepSpeed's compiled ops; locally they are compiled once per
            # machine, not in every pod's fresh HOME (minutes each time).
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")
            or str(Path.home() / ".cache" / "torch_extensions"),
            **(extra_env or {}),
        }
        if self.gpus == 0:
            extra["DS_ACCELERATOR"] = "cpu"

        def environment(container: LocalPod) -> dict[str, str]:
            # The kubelet gives each container a file at its terminationMessagePath; locally
            # the workload is told where that file is.
            termination = {"LLMOPS_TERMINATION_LOG": str(container.termination_file)}
            return process_env(container, {**extra, **termination})

        process = Process(
            pod,
            environment(pod),
            self.log_file(body, pod.name),
            on_line,
            detach=detach,
            init_env=[environment(c) for c in pod.init_containers],
        )
        if not detach:
            self.processes = [p for p in self.processes if p.poll() is None] + [process]
        return process
