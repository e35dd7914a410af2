"""A ModelDeployment, locally: one replica of the Deployment's pod from the operator's
builders, listening on 127.0.0.1 only, with the status the controller would write once the
pod's readiness probe passes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.api.modeldeployment import ModelDeployment
from llmops.api.workload import Env, read_adapter_entries
from llmops.builders import modeldeployment as build
from llmops.decide.modeldeployment import report_adapters, resolve_adapters, resolve_model
from llmops.decide.status import StatusDraft
from llmops.local import network
from llmops.local.context import Context, key_of
from llmops.local.pod import LocalPod, container_ports
from llmops.local.process import Process, tail

KIND = "ModelDeployment"
PID_FILE = "server.pid"
PROBE_SECONDS = 0.5


@dataclass
class Server:
    body: dict[str, Any]
    process: Process
    url: str  # the OpenAI-compatible base URL, http://127.0.0.1:<port>/v1
    model: str


def _probe(container: Mapping[str, Any], ports: Mapping[int, int]) -> tuple[str, int, float]:
    """(path, local port, seconds allowed) of the startup and readiness probes."""
    probe = container.get("readinessProbe") or container.get("startupProbe") or {}
    http = probe.get("httpGet") or {"path": "/", "port": "http"}
    port = http.get("port")
    if isinstance(port, str):
        named = {p.get("name"): int(p["containerPort"]) for p in container.get("ports") or []}
        port = named[port]
    if port is None:
        raise ValueError("the server's probe names no port")
    startup = container.get("startupProbe") or {}
    allowed = float(startup.get("periodSeconds", 10)) * float(startup.get("failureThreshold", 3))
    return str(http.get("path", "/")), ports[int(port)], allowed


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # loopback only
            code: int = response.status
            return 200 <= code < 300
    except (urllib.error.URLError, OSError):
        return False


def _localize_adapters(pod: LocalPod) -> None:
    """The adapters file lists folders as the container sees them; the local server sees the
    host folders of the same mounts (as env values and arguments are rewritten)."""
    listed = pod.env.get(Env.ADAPTERS_FILE)
    if not listed or not Path(listed).is_file():
        return
    entries = [
        entry.model_copy(update={"path": pod.mounts.host_path(entry.path) or entry.path})
        for entry in read_adapter_entries(Path(listed).read_text())
    ]
    Path(listed).write_text(json.dumps([entry.to_dict() for entry in entries], indent=2))


def stop_detached(folder: Path) -> None:
    """A server an earlier `llmops run --detach` left running holds the port: stop it."""
    pid_file = folder / PID_FILE
    if not pid_file.is_file():
        return
    with contextlib.suppress(ValueError, OSError):
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"llmops_trainer.serve" in cmdline:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.1)
    pid_file.unlink(missing_ok=True)


def run(ctx: Context, body: dict[str, Any], *, serve: bool, detach: bool) -> Server | None:
    md = ModelDeployment.model_validate(
        {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")}
    )
    namespace = body["metadata"]["namespace"]
    key = key_of(body)
    status = StatusDraft(body, KIND)
    training, run_name, policy = None, None, "latest"
    if md.spec.model.training_run is not None:
        run_name, policy = md.spec.model.training_run.name, md.spec.model.training_run.policy
        training = ctx.get("TrainingRun", namespace, run_name)
    elif md.spec.model.uri is None:
        raise ValueError("a model from a TrainingSchedule or Sweep needs a cluster")
    model_uri, described = resolve_model(md, run_name, policy, training)
    status.set(selector=build.selector_string(body), model=build.served_name(md))
    if model_uri is None:
        status.set(phase="Pending")
        status.condition("Available", "False", "WaitingForModel", described)
        status.condition("Progressing", "False", "WaitingForModel", described)
        ctx.save(body, status.status)
        ctx.view.failure(key, "", described)
        return None
    if not serve:
        status.set(phase="Pending", replicas=0, readyReplicas=0, checkpoint=described)
        status.condition("Available", "False", "NotServed", "llmops run --no-serve")
        ctx.save(body, status.status)
        ctx.view.update(key, note=f"{described} (not served: --no-serve)")
        return None

    adapter_runs = {
        a.training_run.name: ctx.get("TrainingRun", namespace, a.training_run.name)
        for a in md.spec.adapters
        if a.training_run is not None
    }
    adapters = resolve_adapters(md, adapter_runs, status.status.get("servedAdapters") or ())
    report_adapters(status, md, adapters)
    deployment = build.deployment(body, md, 1, model_uri, adapters.ready)
    ctx.record_children(
        body,
        [
            build.config_map(body),
            *(
                [build.adapters_config_map(body, adapters.ready)]
                if md.spec.adapters and md.spec.runtime == "builtin"
                else []
            ),
            deployment,
            build.service(body, md),
            build.disruption_budget(body),
            build.autoscaler(body, md),
        ],
    )
    folder = ctx.layout.resource_dir(*key)
    stop_detached(folder)
    template = deployment["spec"]["template"]
    container = template["spec"]["containers"][0]
    ports = network.allocate(container_ports(template["spec"]), prefer_same=[md.spec.server.port])
    pod = ctx.prepare_pod(body, template, f"{deployment['metadata']['name']}-0", ports=ports)
    _localize_adapters(pod)
    path, port, allowed = _probe(container, ports)
    # The pod listens on all addresses of its own network namespace; here it shares the
    # machine's, so it is told to listen on loopback only, on the local port.
    pod = dataclasses.replace(
        pod, argv=[*pod.argv, "--host", network.LOOPBACK, "--port", str(port)]
    )
    status.set(phase="Deploying", replicas=1, readyReplicas=0, updatedReplicas=1)
    status.condition("Progressing", "True", "RollingOut", "1/1 updated, 0/1 ready")
    status.condition("Available", "False", "WaitingForReplicas", "0/1 ready")
    ctx.save(body, status.status)
    ctx.view.update(key, note=f"loading {described}")
    process = ctx.start(body, pod, detach=detach)
    if detach:
        (folder / PID_FILE).write_text(f"{process.pid}\n")
    base = f"http://{network.LOOPBACK}:{port}"
    deadline = time.monotonic() + allowed
    while not _ready(base + path):
        if process.poll() is not None or ctx.stop.is_set() or time.monotonic() > deadline:
            process.terminate()
            why = "stopped" if ctx.stop.is_set() else "the server exited or never became ready"
            status.set(phase="Failed" if not ctx.stop.is_set() else "Pending", readyReplicas=0)
            status.condition("Available", "False", "WaitingForReplicas", why)
            if not ctx.stop.is_set():
                status.condition("Degraded", "True", "ReplicasUnavailable", why)
            ctx.save(body, status.status)
            if not ctx.stop.is_set():
                ctx.view.failure(key, str(process.log_file), tail(process.log_file))
            return None
        time.sleep(PROBE_SECONDS)

    # From here on, what the controller reports for a rolled-out Deployment.
    status.set(
        phase="Ready",
        readyReplicas=1,
        checkpoint=described,
        url=f"{base}/v1",
    )
    status.condition("Degraded", "False", "AsExpected")
    status.condition("Progressing", "False", "RolloutComplete", f"serving {described}")
    status.condition("Available", "True", "MinimumReplicasAvailable", "1/1 replicas ready")
    status.condition("Ready", "True", "Ready")
    ctx.save(body, status.status)
    ctx.view.update(key, note=f"serving {described} at {base}/v1")
    return Server(body, process, f"{base}/v1", build.served_name(md))


def stopped(ctx: Context, server: Server) -> None:
    """The status after the local server went away (Ctrl-C or exit)."""
    status = StatusDraft(server.body, KIND)
    status.set(phase="Pending", replicas=0, readyReplicas=0, updatedReplicas=0)
    status.condition("Available", "False", "Stopped", "the local server was stopped")
    status.condition("Ready", "False", "NotReady")
    ctx.save(server.body, status.status)
    ctx.view.update(key_of(server.body), note="stopped")
