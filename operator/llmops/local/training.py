"""A TrainingRun, locally: the controller's own decisions (`llmops.decide.trainingrun`) acted
on with local processes. The gang Job comes from the operator's builders; every node's pod
is a local `torchrun` reaching its peers over loopback. Observations are what the processes
did: a Job that completed or failed, pods that ran, rank 0's progress lines and termination
message. Restarts, budgets, `activeDeadlineSeconds` and the status therefore follow the same
rules as on a cluster."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmops.api.trainingrun import TrainingRun, TrainingRunStatus
from llmops.api.workload import (
    COMPLETION_INDEX_ANNOTATION,
    EVALUATION_REPORT_FILE,
    METRICS_HISTORY_FILE,
    MODEL_CARD_FILE,
    PROGRESS_FILE,
    EvaluationReport,
    TrainerReport,
    TrainingProgress,
    parse_progress_line,
    read_record,
)
from llmops.builders import trainingrun as build
from llmops.decide import trainingrun as decide
from llmops.decide.status import Conditions, termination_message
from llmops.local import network, plot
from llmops.local.common import copy_if_exists, host_path, now
from llmops.local.context import Context, key_of
from llmops.local.job import POLL_SECONDS, JobResult, run_job
from llmops.local.pod import container_ports
from llmops.local.process import Process, tail

KIND = decide.KIND
SAVE_EVERY_SECONDS = 1.0
OUTPUTS = (MODEL_CARD_FILE, EVALUATION_REPORT_FILE, METRICS_HISTORY_FILE, PROGRESS_FILE)


def check_local(run: TrainingRun) -> None:
    storage_ = run.spec.checkpointing.storage
    if storage_ is not None and storage_.s3 is not None:
        raise ValueError("spec.checkpointing.storage.s3: the local runtime writes to volumes only")


def job_object(name: str, result: JobResult | None) -> dict[str, Any]:
    """The Job as the Job controller would show it: running, or finished as `result` says."""
    conditions: list[dict[str, str]] = []
    if result is not None and result.succeeded:
        conditions = [{"type": "Complete", "status": "True"}]
    elif result is not None:
        reason, _, message = (result.failure or "Failed: failed").partition(": ")
        conditions = [{"type": "Failed", "status": "True", "reason": reason, "message": message}]
    return {
        "metadata": {"name": name},
        "spec": {"suspend": False},
        "status": {"conditions": conditions},
    }


def running_gang(job: str, nodes: int) -> list[dict[str, Any]]:
    return [
        {
            "metadata": {
                "name": f"{job}-{i}",
                "annotations": {COMPLETION_INDEX_ANNOTATION: str(i)},
            },
            "status": {"phase": "Running"},
        }
        for i in range(nodes)
    ]


class Gang:
    """The run's state between decisions: the status, rank 0's latest progress, and the
    decision that asked the running gang to stop (budget, deadline)."""

    def __init__(self, ctx: Context, body: dict[str, Any], run: TrainingRun):
        self.ctx, self.body, self.run = ctx, body, run
        self.status = TrainingRunStatus.model_validate(body.get("status") or {})
        self.lock = threading.Lock()
        self.progress: TrainingProgress | None = None
        self.ending: decide.Decision | None = None  # a decision that stopped the gang
        self.stop = threading.Event()
        self.session_start: tuple[float, int] | None = None

    def observe(self, job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> decide.Observed:
        namespace = self.body["metadata"]["namespace"]
        spec = self.run.spec
        parent_ref = spec.init.training_run if spec.init else None
        leader = next((p for p in pods if decide.is_leader(p)), None)
        return decide.Observed(
            body=self.body,
            dataset=self.ctx.get("Dataset", namespace, spec.dataset_ref.name),
            parent=self.ctx.get(KIND, namespace, parent_ref.name) if parent_ref else None,
            job=job,
            pods=pods,
            progress=self.progress,
            report=read_record(TrainerReport, termination_message(leader)),
        )

    def decision(self, job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> decide.Decision:
        with self.lock:
            return decide.decide(self.run, self.status, self.observe(job, pods), now())

    def apply(self, decision: decide.Decision) -> None:
        with self.lock:
            self.status = decision.status
            self.ctx.save(self.body, self.status.to_dict())

    def on_line(self, pod: str, line: str) -> None:
        if not pod.endswith("-0"):
            return
        record = parse_progress_line(line)
        if record is not None:
            self.progress = record
            self._view(record)

    def watch(self, job_name: str) -> None:
        """While the gang runs: the controller's decision every second, applied; one that
        stops the gang (budget, deadline) ends it, and so does Ctrl-C."""
        pods = running_gang(job_name, self.run.spec.resources.num_nodes)
        last = time.monotonic()
        while not self.stop.wait(POLL_SECONDS):
            if self.ctx.stop.is_set():
                self.stop.set()
                return
            if time.monotonic() - last < SAVE_EVERY_SECONDS:
                continue
            last = time.monotonic()
            decision = self.decision(job_object(job_name, None), pods)
            if decision.suspend_job or decision.delete_job:
                self.ending = decision
                self.stop.set()
                return
            self.apply(decision)

    def _view(self, record: TrainingProgress) -> None:
        step, total = record.step, record.total_steps
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
            loss=record.train_loss,
            tokens_per_second=record.tokens_per_second,
            eta=eta,
            note=record.phase,
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

    def run_gang(self, job: dict[str, Any]) -> JobResult:
        """Run the Job's pods until they end, the user interrupts or a decision stops them."""
        namespace = self.body["metadata"]["namespace"]
        job_name = job["metadata"]["name"]
        service = build.service_name(self.run.metadata.name)
        hosts = frozenset(
            network.pod_names(job_name, service, namespace, self.run.spec.resources.num_nodes)
            | network.service_names(service, namespace)
        )
        # One port map for the gang: peers address rank 0 as <pod>:<containerPort>.
        ports = network.allocate(container_ports(job["spec"]["template"]["spec"]))
        self.stop.clear()
        self.ending = None
        watcher = threading.Thread(target=self.watch, args=(job_name,), daemon=True)
        watcher.start()
        try:
            return run_job(job, self.starter(job, hosts, ports), self.stop)
        finally:
            self.stop.set()
            watcher.join()


def run(ctx: Context, body: dict[str, Any]) -> bool:
    """True when the TrainingRun ends Succeeded (now or in an earlier run)."""
    training = TrainingRun.model_validate(
        {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}
    )
    check_local(training)
    generation = int(body["metadata"]["generation"])
    key = key_of(body)
    gang = Gang(ctx, body, training)
    if gang.status.phase == "Succeeded" and gang.status.observed_generation == generation:
        ctx.view.update(key, note="up to date (trained in an earlier run)")
        return True
    if gang.status.phase == "Failed":
        _retry(gang, generation)
    job: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = []
    while True:
        decision = gang.decision(job, pods)
        gang.apply(decision)
        ctx.record_children(body, [child.manifest for child in decision.children])
        phase = gang.status.phase
        if phase in decide.TERMINAL:
            return _ended(ctx, gang, pods)
        if phase == "Suspended":
            ctx.view.update(key, note="suspended (spec.suspend)")
            return False
        if decision.delete_job:  # a restart: the next decision creates the next attempt
            ctx.view.update(key, note=f"restarting ({gang.status.restart_count})")
            job, pods = None, []
            continue
        manifest = next(
            (c.manifest for c in decision.children if c.manifest["kind"] == "Job"), None
        )
        if manifest is None or job is not None:
            created = next((c for c in gang.status.conditions if c.type == "Created"), None)
            ctx.view.failure(key, "", created.message if created else f"{KIND} cannot start")
            return False
        result = gang.run_gang(manifest)
        # Rank 0's last words (the checkpoint written on SIGTERM) come after the watch ended.
        stopped = gang.ending.status if gang.ending is not None else gang.status
        if gang.progress is not None:
            base = decide.checkpoint_base_uri(training)
            decide.apply_progress(stopped, gang.progress, base, now())
        if gang.ending is not None:  # budget or deadline: the decision that stopped it
            gang.apply(gang.ending)
            return _ended(ctx, gang, result.pod_objects())
        if result.interrupted:
            _interrupted(ctx, gang)
            return False
        job, pods = job_object(manifest["metadata"]["name"], result), result.pod_objects()


def _retry(gang: Gang, generation: int) -> None:
    """Applying the manifests again is asking for another try."""
    status = gang.status
    status.phase = None
    status.restart_count = status.preemption_count = 0
    status.completion_time = status.start_time = None
    Conditions(status.conditions, generation, now(), []).set(
        "Failed", "False", "Retrying", "run again with `llmops run`"
    )


def _interrupted(ctx: Context, gang: Gang) -> None:
    """Ctrl-C: the trainer checkpointed on SIGTERM; the next `llmops run` resumes."""
    status = gang.status
    status.phase = "Suspended"
    latest = status.checkpoints.latest if status.checkpoints else None
    where = f" at {latest.name}" if latest else ""
    conditions = Conditions(status.conditions, gang.run.metadata.generation, now(), [])
    conditions.set("Suspended", "True", "Interrupted", f"stopped{where}; `llmops run` resumes")
    conditions.set("Running", "False", "Interrupted")
    ctx.save(gang.body, status.to_dict())


def _ended(ctx: Context, gang: Gang, pods: list[dict[str, Any]]) -> bool:
    key = key_of(gang.body)
    if gang.status.phase == "Succeeded":
        _succeeded(ctx, gang)
        return True
    failed = next((c for c in gang.status.conditions if c.type == "Failed"), None)
    message = failed.message if failed else "failed"
    logs = [p["metadata"]["name"] for p in pods if p["status"]["phase"] == "Failed"]
    log = ctx.log_file(gang.body, logs[0]) if logs else None
    ctx.view.failure(key, str(log or ""), tail(log) if log else message)
    return False


def _succeeded(ctx: Context, gang: Gang) -> None:
    """What the local user sees besides the status: the perplexity comparison, the reports
    and the training curve next to the resource's state."""
    namespace = gang.body["metadata"]["namespace"]
    name = gang.run.metadata.name
    assert gang.status.model_uri is not None
    output = host_path(ctx.layout, namespace, gang.status.model_uri).parent
    report = read_record(EvaluationReport, _read(output / EVALUATION_REPORT_FILE))
    if report is not None:
        final = report.final
        for split, model, unigram in (
            ("validation", final.validation_perplexity, final.validation_unigram_perplexity),
            (final.split or "test", final.perplexity, final.unigram_perplexity),
        ):
            if model and unigram:
                ctx.view.message(
                    f"{name}: {split} perplexity {model:.1f} against {unigram:.1f} for a "
                    "unigram model of the training split"
                )
    folder = ctx.layout.resource_dir(KIND, namespace, name)
    for file in OUTPUTS:
        copy_if_exists(output / file, folder / file)
    curve = plot.training_curve(folder / METRICS_HISTORY_FILE, folder / "training-curve.png")
    ctx.view.message(curve)


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None
