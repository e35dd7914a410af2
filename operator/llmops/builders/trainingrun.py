"""TrainingRun -> its children: config, headless Service, checkpoint claim, worker Job.

The workers are an Indexed Job with one pod per node: the completion index is the node rank,
and each pod runs `torchrun` for its `procsPerNode` processes. Pod 0 is the rendezvous point,
reached through the headless Service by a stable DNS name. A gang restart replaces the whole
Job; the attempt number is part of its name so the old and new gangs never collide.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from llmops.api import workload
from llmops.api.trainingrun import TrainingRun, TrainingRunSpec
from llmops.api.workload import (
    BENCHMARKS_DIR,
    CHECKPOINT_DIR,
    COMPLETION_INDEX_ANNOTATION,
    CONFIG_DIR,
    DATA_DIR,
    INIT_DIR,
    METRICS_PORT,
    OUTPUT_SUBDIR,
    PRETRAINED_SUBDIR,
    RENDEZVOUS_PORT,
    ROLE_LABEL,
    TERMINATION_LOG,
    WORKER_ROLE,
    Env,
)
from llmops.builders import pods, pretrained, storage
from llmops.builders.common import OWNER_LABEL, child_metadata, child_name
from llmops.builders.common import config_map as common_config_map

COMPONENT = "training"
CONFIG_FILE = workload.TRAINING_CONFIG_FILE
# Where a remote pretrained model goes when the run has no checkpoint volume (each pod then
# downloads its own copy into scratch).
SCRATCH_PRETRAINED_DIR = "/tmp/llmops-pretrained"
# Time a pod gets between SIGTERM and SIGKILL: enough to write a checkpoint.
TERMINATION_GRACE_SECONDS = 300
COMPLETION_INDEX = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"


def accelerators(spec: TrainingRunSpec) -> int:
    """What one hour of the gang costs in accelerator-hours: GPUs, or pods without GPUs."""
    return spec.resources.num_nodes * max(1, spec.resources.gpus_per_node)


def accelerator_hours(
    spec: TrainingRunSpec, status: Mapping[str, Any], now: datetime.datetime
) -> float:
    """The run's accelerator-hours up to `now`: what its status counted, plus the stretch a
    running gang has run since (the status is written once a minute, not at every tick)."""
    hours = float(status.get("acceleratorHours") or 0.0)
    since = status.get("accountedUntil")
    if status.get("phase") == "Running" and since:
        started = datetime.datetime.fromisoformat(str(since).replace("Z", "+00:00"))
        hours += max(0.0, (now - started).total_seconds()) / 3600 * accelerators(spec)
    return hours


# `<name>-run-config`: not `<name>-config`, which a ModelDeployment of the same name holds
# (examples/quickstart.yaml serves run stdlib-gpt as deployment stdlib-gpt).
CONFIG_ROLE = "run-config"


def config_name(name: str) -> str:
    return child_name(name, CONFIG_ROLE)


def service_name(name: str) -> str:
    return child_name(name, "headless")


def job_name(name: str, attempt: int) -> str:
    return child_name(name, f"workers-{attempt}")


def config_map(body: Mapping[str, Any]) -> dict[str, Any]:
    return common_config_map(body, CONFIG_FILE, COMPONENT, CONFIG_ROLE)


def headless_service(body: Mapping[str, Any]) -> dict[str, Any]:
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(body, "headless", COMPONENT),
        "spec": {
            "clusterIP": "None",
            # Peers must resolve each other before they are ready: rendezvous comes first.
            "publishNotReadyAddresses": True,
            "selector": {OWNER_LABEL["TrainingRun"]: name, ROLE_LABEL: WORKER_ROLE},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}],
        },
    }


def checkpoint_claim(body: Mapping[str, Any], run: TrainingRun) -> dict[str, Any] | None:
    return storage.owned_claim(body, "checkpoints", COMPONENT, run.spec.checkpointing.storage)


def gang_env(run: TrainingRun, job: str) -> list[dict[str, Any]]:
    """The rendezvous environment torchrun users (and Kubeflow's PET_* readers) expect."""
    resources = run.spec.resources
    name = run.metadata.name
    namespace = run.metadata.namespace
    master = f"{job}-0.{service_name(name)}.{namespace}.svc"
    values = {
        "MASTER_ADDR": master,
        "MASTER_PORT": str(RENDEZVOUS_PORT),
        "NNODES": str(resources.num_nodes),
        "NPROC_PER_NODE": str(resources.processes_per_node),
        "WORLD_SIZE": str(resources.num_nodes * resources.processes_per_node),
    }
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in values.items()]
    rank = {"valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}}
    env += [{"name": "NODE_RANK", **rank}, {"name": "RANK", **rank}]
    env += [
        {"name": f"PET_{k}", "value": values[k]}
        for k in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE")
    ]
    env.append({"name": "PET_NODE_RANK", **rank})
    return env


def _read_only_input(
    volume_name: str, uri: str, mount_path: str, env_path: str, env_uri: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes, mounts and env for an input the workers only read (data, initial weights):
    a local path where the URI can be mounted, else the URI itself."""
    volumes, mounts, path = storage.read_only_volume(volume_name, uri, mount_path)
    env = [{"name": env_path, "value": path}] if path else [{"name": env_uri, "value": uri}]
    return volumes, mounts, env


def dataset_volume(
    uri: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """How the workers read the prepared dataset."""
    return _read_only_input("data", uri, DATA_DIR, Env.DATA_DIR, Env.DATA_URI)


def benchmark_inputs(
    spec: TrainingRunSpec,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes, mounts and env that give the trainer each benchmark's task folder: a
    ConfigMap or claim mounted read-only under BENCHMARKS_DIR, a path in the image as it is,
    an s3:// URI with its endpoint and credentials (the trainer copies it)."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    env: list[dict[str, Any]] = []
    for i, benchmark in enumerate(spec.evaluation.benchmarks):
        tasks = benchmark.tasks
        volume = f"benchmark-{i}"
        mount_path = f"{BENCHMARKS_DIR}/{i}"
        folder: str
        if tasks.config_map is not None:
            volumes.append({"name": volume, "configMap": {"name": tasks.config_map.name}})
            mounts.append({"name": volume, "mountPath": mount_path, "readOnly": True})
            folder = mount_path
        else:
            assert tasks.path is not None
            if tasks.path.startswith(("pvc://", "s3://")):
                extra_volumes, extra_mounts, path = storage.read_only_volume(
                    volume, tasks.path, mount_path
                )
                volumes += extra_volumes
                mounts += extra_mounts
                folder = path or tasks.path
            else:
                folder = tasks.path  # in the image (relative: to its working folder)
        env.append({"name": f"{Env.BENCHMARK_TASKS}{i}", "value": folder})
        if tasks.endpoint:
            env.append({"name": f"{Env.BENCHMARK_S3_ENDPOINT}{i}", "value": tasks.endpoint})
        if tasks.credentials_secret is not None:
            secret = tasks.credentials_secret.name
            for variable, key in (
                (Env.BENCHMARK_S3_ACCESS_KEY, "AWS_ACCESS_KEY_ID"),
                (Env.BENCHMARK_S3_SECRET_KEY, "AWS_SECRET_ACCESS_KEY"),
            ):
                env.append(
                    {
                        "name": f"{variable}{i}",
                        "valueFrom": {"secretKeyRef": {"name": secret, "key": key}},
                    }
                )
    return volumes, mounts, env


def worker_job(
    body: Mapping[str, Any],
    run: TrainingRun,
    attempt: int,
    dataset_uri: str,
    init_uri: str | None = None,
) -> dict[str, Any]:
    """The gang. `dataset_uri` is the Dataset's status.outputUri: the version of the data
    this attempt trains on."""
    spec = run.spec
    name = run.metadata.name
    job = job_name(name, attempt)
    gpus = spec.resources.gpus_per_node
    worker_labels = {ROLE_LABEL: WORKER_ROLE}

    scratch_volumes, scratch_mounts = pods.scratch_volumes()
    data_volumes, data_mounts, data_env = dataset_volume(dataset_uri)
    ckpt_volumes, ckpt_mounts = storage.mount(
        "checkpoints", name, "checkpoints", spec.checkpointing.storage, CHECKPOINT_DIR
    )
    env = gang_env(run, job)
    env += [
        *data_env,
        {"name": Env.CHECKPOINT_DIR, "value": CHECKPOINT_DIR},
        {"name": Env.OUTPUT_DIR, "value": f"{CHECKPOINT_DIR}/{OUTPUT_SUBDIR}"},
        {"name": Env.ATTEMPT, "value": str(attempt)},
        {"name": Env.TERMINATION_LOG, "value": TERMINATION_LOG},
        {"name": "HOME", "value": "/tmp"},
    ]
    init_volumes: list[dict[str, Any]] = []
    init_mounts: list[dict[str, Any]] = []
    if init_uri:
        init_volumes, init_mounts, init_env = _read_only_input(
            "init", init_uri, INIT_DIR, Env.INIT_CHECKPOINT, Env.INIT_CHECKPOINT
        )
        env += init_env
    env += [{"name": k, "value": v} for k, v in workload.trainer_env(spec).items()]
    bench_volumes, bench_mounts, bench_env = benchmark_inputs(spec)
    env += bench_env
    init_containers: list[dict[str, Any]] = []
    if spec.model.pretrained is not None:
        # On the checkpoint volume a restarted gang finds the model already fetched.
        on_volume = bool(ckpt_mounts)
        model = pretrained.model_input(
            spec.model.pretrained,
            target=f"{CHECKPOINT_DIR}/{PRETRAINED_SUBDIR}" if on_volume else SCRATCH_PRETRAINED_DIR,
            shared=on_volume,
            resources=spec.resources,
            extra_mounts=ckpt_mounts,
        )
        init_containers.append(model.init_container)
        init_volumes += model.volumes
        init_mounts += model.mounts
        env += model.env

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name(name),  # pods resolve as <job>-<index>.<service>
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": pods.pod_security_context(),
        **({"initContainers": init_containers} if init_containers else {}),
        "containers": [
            {
                "name": "trainer",
                "image": pods.trainer_image(spec.resources),
                "command": workload.torchrun_command(spec, f"{CONFIG_DIR}/{CONFIG_FILE}"),
                "env": env,
                "ports": [
                    {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT},
                    {"name": "metrics", "containerPort": METRICS_PORT},
                ],
                "resources": pods.container_resources(spec.resources, gpus),
                "securityContext": pods.container_security_context(),
                # Rank 0 leaves its final evaluation here for the TrainingRun status.
                "terminationMessagePath": TERMINATION_LOG,
                "terminationMessagePolicy": "File",
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    *scratch_mounts,
                    *data_mounts,
                    *ckpt_mounts,
                    *init_mounts,
                    *bench_mounts,
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": config_name(name)}},
            *scratch_volumes,
            *data_volumes,
            *ckpt_volumes,
            *init_volumes,
            *bench_volumes,
        ],
        **pods.scheduling_fields(spec.scheduling),
    }
    metadata = child_metadata(
        body, f"workers-{attempt}", COMPONENT, **pods.queue_labels(spec.scheduling)
    )
    pod_labels = {**metadata["labels"], **worker_labels}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.resources.num_nodes,
            "parallelism": spec.resources.num_nodes,
            # The operator restarts the whole gang; the Job itself never retries a pod.
            "backoffLimit": 0,
            # Kueue's webhook suspends a queued Job on creation and admission unsuspends it;
            # the controller never unsuspends a queued Job (llmops.decide.trainingrun).
            "suspend": spec.suspend,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }
