"""TrainingRun -> its children: config, headless Service, checkpoint claim, worker Job.

The workers are an Indexed Job with one pod per node: the completion index is the node rank,
and each pod runs `torchrun` for its `procsPerNode` processes. Pod 0 is the rendezvous point,
reached through the headless Service by a stable DNS name. A gang restart replaces the whole
Job; the attempt number is part of its name so the old and new gangs never collide.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llmops.api.trainingrun import TrainingRun
from llmops.builders import pods, storage
from llmops.builders.common import child_metadata, child_name

COMPONENT = "training"
CONFIG_DIR = "/etc/llmops"
CONFIG_FILE = "trainingrun.json"
DATA_DIR = "/data"
CHECKPOINT_DIR = "/checkpoints"
OUTPUT_SUBDIR = "model"
RENDEZVOUS_PORT = 29500
METRICS_PORT = 9400
# Time a pod gets between SIGTERM and SIGKILL: enough to write a checkpoint.
TERMINATION_GRACE_SECONDS = 300
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def config_name(name: str) -> str:
    return child_name(name, "config")


def service_name(name: str) -> str:
    return child_name(name, "headless")


def job_name(name: str, attempt: int) -> str:
    return child_name(name, f"workers-{attempt}")


def config_map(body: Mapping[str, Any]) -> dict[str, Any]:
    """The whole TrainingRun as the trainer reads it (parsed by the same API models)."""
    config = {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {
            k: body["metadata"][k]
            for k in ("name", "namespace", "uid", "generation")
            if k in body["metadata"]
        },
        "spec": body["spec"],
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(body, "config", COMPONENT),
        "data": {CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True)},
    }


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
            "selector": {"llmops.dev/training-run": name, "llmops.dev/role": "worker"},
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
        "NPROC_PER_NODE": str(resources.procs_per_node),
        "WORLD_SIZE": str(resources.num_nodes * resources.procs_per_node),
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


def dataset_volume(
    uri: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes, mounts and env through which the workers read the prepared dataset."""
    scheme, location, path = storage.parse_uri(uri)
    if scheme == "s3":
        return [], [], [{"name": "LLMOPS_DATA_URI", "value": uri}]
    volume = {"name": "data", "persistentVolumeClaim": {"claimName": location, "readOnly": True}}
    mount = {"name": "data", "mountPath": DATA_DIR, "readOnly": True}
    data_dir = f"{DATA_DIR}/{path}".rstrip("/")
    return [volume], [mount], [{"name": "LLMOPS_DATA_DIR", "value": data_dir}]


def torchrun_command() -> list[str]:
    """One torchrun per pod; Kubernetes expands $(VAR) from the container's env."""
    return [
        "torchrun",
        "--nnodes=$(NNODES)",
        "--nproc-per-node=$(NPROC_PER_NODE)",
        "--node-rank=$(NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "-m",
        "llmops_trainer.train",
        "--config",
        f"{CONFIG_DIR}/{CONFIG_FILE}",
    ]


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
    worker_labels = {"llmops.dev/role": "worker"}

    scratch_volumes, scratch_mounts = pods.scratch_volumes()
    data_volumes, data_mounts, data_env = dataset_volume(dataset_uri)
    ckpt_volumes, ckpt_mounts = storage.mount(
        "checkpoints", name, "checkpoints", spec.checkpointing.storage, CHECKPOINT_DIR
    )
    env = gang_env(run, job)
    env += [
        *data_env,
        {"name": "LLMOPS_CHECKPOINT_DIR", "value": CHECKPOINT_DIR},
        {"name": "LLMOPS_OUTPUT_DIR", "value": f"{CHECKPOINT_DIR}/{OUTPUT_SUBDIR}"},
        {"name": "LLMOPS_METRICS_PORT", "value": str(METRICS_PORT)},
        {"name": "LLMOPS_ATTEMPT", "value": str(attempt)},
        {"name": "HOME", "value": "/tmp"},
    ]
    if init_uri:
        env.append({"name": "LLMOPS_INIT_CHECKPOINT", "value": init_uri})
    if gpus == 0:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name(name),  # pods resolve as <job>-<index>.<service>
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": pods.pod_security_context(),
        "containers": [
            {
                "name": "trainer",
                "image": pods.trainer_image(spec.resources),
                "command": torchrun_command(),
                "env": env,
                "ports": [
                    {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT},
                    {"name": "metrics", "containerPort": METRICS_PORT},
                ],
                "resources": pods.container_resources(spec.resources, gpus),
                "securityContext": pods.container_security_context(),
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    *scratch_mounts,
                    *data_mounts,
                    *ckpt_mounts,
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": config_name(name)}},
            *scratch_volumes,
            *data_volumes,
            *ckpt_volumes,
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
            "suspend": spec.suspend,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }
