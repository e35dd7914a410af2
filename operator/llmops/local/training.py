"""A TrainingRun, locally: the gang Job from the operator's builders, every node's pod a
local `torchrun` reaching its peers over loopback, restarted from the latest checkpoint after
a failure as the controller does, with the status the controller would write."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmops.api.trainingrun import TrainingRun
from llmops.builders import storage
from llmops.builders import trainingrun as build
from llmops.conditions import is_true
from llmops.controllers.common import StatusWriter
from llmops.controllers.trainingrun import _finish, parse_progress, progress_status
from llmops.local import network, plot
from llmops.local.common import copy_if_exists, host_path, now, parse_time, timestamp
from llmops.local.context import Context, key_of
from llmops.local.job import run_job
from llmops.local.pod import container_ports
from llmops.local.process import Process, tail

KIND = "TrainingRun"
SAVE_EVERY_SECONDS = 1.0
OUTPUTS = ("model_card.md", "eval_report.json", "metrics.jsonl", "progress.json")


class WaitingError(RuntimeError):
    """A reference that is not ready: locally there is nobody to wait for."""


def check_local(run: TrainingRun) -> None:
    storage_ = run.spec.checkpointing.storage
    if storage_ is not None and storage_.s3 is not None:
        raise ValueError("spec.checkpointing.storage.s3: the local runtime writes to volumes only")


def dataset_uri(ctx: Context, run: TrainingRun, namespace: str) -> str:
    ref = run.spec.dataset_ref.name
    dataset = ctx.get("Dataset", namespace, ref)
    if dataset is None:
        raise WaitingError(f"Dataset {ref!r} not found")
    status = dataset.get("status") or {}
    if not is_true(status.get("conditions"), "Complete") or not status.get("outputUri"):
        raise WaitingError(f"Dataset {ref!r} is not ready")
    return str(status["outputUri"])


def init_uri(ctx: Context, run: TrainingRun, namespace: str) -> str | None:
    """The starting weights, as the controller resolves them (latest, best or step-N)."""
    init = run.spec.init
    if init is None:
        return None
    if init.path:
        return init.path
    assert init.training_run is not None
    parent = ctx.get(KIND, namespace, init.training_run.name)
    checkpoints = ((parent or {}).get("status") or {}).get("checkpoints") or {}
    wanted = init.training_run.checkpoint
    if wanted in ("latest", "best") and checkpoints.get(wanted):
        return str(checkpoints[wanted]["uri"])
    latest = (checkpoints.get("latest") or {}).get("uri", "")
    if wanted.startswith("step-") and latest:
        return f"{latest.rsplit('/', 1)[0]}/{wanted}"
    raise WaitingError(f"TrainingRun {init.training_run.name!r} has no {wanted} checkpoint")


def checkpoint_status(run: TrainingRun, record: dict[str, Any]) -> dict[str, Any]:
    """status.checkpoints from the trainer's progress record (latest and best by name)."""
    base = storage.uri(run.metadata.name, "checkpoints", run.spec.checkpointing.storage)
    found: dict[str, Any] = {}
    for key, field in (("latest", "latestCheckpoint"), ("best", "bestCheckpoint")):
        name = record.get(field)
        if name:
            step = int(str(name).rsplit("-", 1)[-1])
            found[key] = {"name": name, "step": step, "uri": f"{base}/{name}"}
    return found


class Gang:
    """One attempt: the worker Job's pods, rank 0's progress feeding status and view."""

    def __init__(self, ctx: Context, body: dict[str, Any], run: TrainingRun, status: StatusWriter):
        self.ctx, self.body, self.run, self.status = ctx, body, run, status
        self.lock = threading.Lock()
        self.last_save = 0.0
        self.session_start: tuple[float, int] | None = None

    def on_line(self, pod: str, line: str) -> None:
        if not pod.endswith("-0"):
            return
        record = parse_progress(line)
        if record is None:
            return
        with self.lock:
            started = parse_time(self.status.status.get("startTime"))
            self.status.set(**progress_status(record, started, now()))
            checkpoints = checkpoint_status(self.run, record)
            if checkpoints:
                self.status.set(checkpoints=checkpoints)
            self._view(record)
            if time.monotonic() - self.last_save > SAVE_EVERY_SECONDS:
                self.last_save = time.monotonic()
                self.ctx.save(self.body, self.status.status)

    def _view(self, record: dict[str, Any]) -> None:
        step, total = int(record.get("step", 0)), int(record.get("totalSteps", 0))
        clock = time.monotonic()
        if self.session_start is None or step < self.session_start[1]:
            self.session_start = (clock, step)
        eta = None
        t0, s0 = self.session_start
        if step > s0 and total:
            eta = (clock - t0) / (step - s0) * max(0, total - step)
        self.ctx.view.update(
            key_of(self.body),
            step=step,
            total=total,
            loss=record.get("trainLoss"),
            tokens_per_second=record.get("tokensPerSecond"),
            eta=eta,
            note=str(record.get("phase", "")),
        )

    def starter(
        self, job: dict[str, Any], hosts: frozenset[str], ports: dict[int, int]
    ) -> Callable[[int | None], Process]:
        return lambda index: self.start(job, index, hosts, ports)

    def start(
        self, job: dict[str, Any], index: int | None, hosts: frozenset[str], ports: dict[int, int]
    ) -> Process:
        template = job["spec"]["template"]
        pod_name = f"{job['metadata']['name']}-{index or 0}"
        pod = self.ctx.prepare_pod(
            self.body, template, pod_name, index=index, hosts=hosts, ports=ports
        )
        extra: dict[str, str] = {}
        gpus = self.run.spec.resources.gpus_per_node
        if gpus and self.ctx.gpus >= gpus:
            first = ((index or 0) * gpus) % self.ctx.gpus
            extra["CUDA_VISIBLE_DEVICES"] = ",".join(
                str((first + i) % self.ctx.gpus) for i in range(gpus)
            )
        return self.ctx.start(self.body, pod, self.on_line, extra_env=extra)


def run(ctx: Context, body: dict[str, Any]) -> bool:
    """True when the TrainingRun ends Succeeded (now or in an earlier run)."""
    training = TrainingRun.model_validate(
        {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")}
    )
    check_local(training)
    namespace = body["metadata"]["namespace"]
    name = training.metadata.name
    generation = int(body["metadata"]["generation"])
    status = StatusWriter(body, KIND)
    key = key_of(body)
    if status.phase == "Succeeded" and status.status.get("observedGeneration") == generation:
        ctx.view.update(key, note="up to date (trained in an earlier run)")
        return True
    if status.phase == "Failed":
        # Applying the manifests again is asking for another try.
        status.set(phase=None, restartCount=0, completionTime=None)
        status.condition("Failed", "False", "Retrying", "run again with `llmops run`")
    try:
        data_uri = dataset_uri(ctx, training, namespace)
        init = init_uri(ctx, training, namespace)
    except WaitingError as error:
        status.set(phase="Pending")
        status.condition("Created", "False", "WaitingForDataset", str(error))
        ctx.save(body, status.status)
        ctx.view.failure(key, "", str(error))
        return False

    ctx.record_children(
        body,
        [
            build.config_map(body),
            build.headless_service(body),
            build.checkpoint_claim(body, training),
        ],
    )
    gang = Gang(ctx, body, training, status)
    service = build.service_name(name)
    while True:
        attempt = int(status.status.get("restartCount") or 0)
        job = build.worker_job(body, training, attempt, data_uri, init)
        ctx.record_children(body, [job])
        job_name = job["metadata"]["name"]
        nodes = training.spec.resources.num_nodes
        hosts = frozenset(
            network.pod_names(job_name, service, namespace, nodes)
            | network.service_names(service, namespace)
        )
        # One port map for the gang: peers address rank 0 as <pod>:<containerPort>.
        ports = network.allocate(container_ports(job["spec"]["template"]["spec"]))
        with gang.lock:
            status.condition(
                "Created", "True", "GangCreated", f"Job {job_name} with {nodes} pod(s)"
            )
            if not status.status.get("startTime"):
                status.set(startTime=timestamp())
            status.set(phase="Running")
            status.condition("Running", "True", "GangRunning", f"{nodes}/{nodes} pods running")
            status.condition("Restarting", "False", "GangRunning")
            status.condition("Suspended", "False", "Resumed")
            ctx.save(body, status.status)
        result = run_job(job, gang.starter(job, hosts, ports), ctx.stop)
        with gang.lock:
            if result.succeeded:
                _succeeded(ctx, body, training, status)
                return True
            if result.interrupted:
                status.set(phase="Suspended")
                latest = (status.status.get("checkpoints") or {}).get("latest") or {}
                where = f" at {latest['name']}" if latest else ""
                status.condition(
                    "Suspended", "True", "Interrupted", f"stopped{where}; `llmops run` resumes"
                )
                status.condition("Running", "False", "Interrupted")
                ctx.save(body, status.status)
                return False
            failure = result.failure or "failed"
            if attempt >= training.spec.max_restarts:
                _finish(
                    status,
                    "Failed",
                    "MaxRestartsExceeded",
                    f"gang failed after {attempt} restart(s): {failure}",
                    now(),
                )
                ctx.save(body, status.status)
                if result.failed_pod is not None:
                    log = Path(result.failed_pod.log_file)
                    ctx.view.failure(key, str(log), tail(log))
                return False
            status.set(phase="Restarting", restartCount=attempt + 1)
            status.condition(
                "Restarting",
                "True",
                "GangMemberFailed",
                f"restart {attempt + 1}/{training.spec.max_restarts} from the latest "
                f"checkpoint: {failure}",
            )
            status.condition("Running", "False", "GangMemberFailed")
            ctx.save(body, status.status)
            ctx.view.update(key, note=f"restarting ({attempt + 1}/{training.spec.max_restarts})")


def _succeeded(
    ctx: Context, body: dict[str, Any], training: TrainingRun, status: StatusWriter
) -> None:
    namespace = body["metadata"]["namespace"]
    name = training.metadata.name
    _finish(status, "Succeeded", "TrainingComplete", "training finished", now())
    output_uri = (
        storage.uri(name, "checkpoints", training.spec.checkpointing.storage)
        + f"/{build.OUTPUT_SUBDIR}"
    )
    status.set(modelUri=f"{output_uri}/model")  # as the operator reports it
    output = host_path(ctx.layout, namespace, output_uri)
    report = output / "eval_report.json"
    if report.is_file():
        final = json.loads(report.read_text()).get("final") or {}
        evaluation = {
            k: final[k]
            for k in ("loss", "perplexity", "accuracy", "bleu")
            if final.get(k) is not None
        }
        if evaluation:
            status.set(finalEvaluation=evaluation)
        for split, model, unigram in (
            ("validation", "validationPerplexity", "validationUnigramPerplexity"),
            ("test", "perplexity", "unigramPerplexity"),
        ):
            if final.get(model) and final.get(unigram):
                ctx.view.message(
                    f"{name}: {split} perplexity {final[model]:.1f} against "
                    f"{final[unigram]:.1f} for a unigram model of the training split"
                )
    ctx.save(body, status.status)
    folder = ctx.layout.resource_dir(KIND, namespace, name)
    for file in OUTPUTS:
        copy_if_exists(output / file, folder / file)
    ctx.view.message(plot.training_curve(folder / "metrics.jsonl", folder / "training-curve.png"))
