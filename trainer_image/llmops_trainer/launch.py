"""The command and environment that start one training pod: `torchrun` running
`llmops_trainer.train`. Pure, and free of torch, so the operator's pod builder and the local
runtime use the same command.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmops.api.trainingrun import TrainingRunSpec

CONFIG_PATH = "/etc/llmops/trainingrun.json"
MODULE = "llmops_trainer.train"
DEFAULT_MASTER_PORT = 29500
METRICS_PORT = 9400


def _env_ref(name: str) -> str:
    """Kubernetes expands `$(NAME)` in a container's command from the container's env."""
    return f"$({name})"


def torchrun_command(
    spec: TrainingRunSpec,
    config_path: str = CONFIG_PATH,
    *,
    node_rank: int | str = _env_ref("NODE_RANK"),
    master_addr: str = _env_ref("MASTER_ADDR"),
    master_port: int | str = _env_ref("MASTER_PORT"),
    launcher: Sequence[str] = ("torchrun",),
) -> list[str]:
    """argv of one pod's launcher.

    The gang's shape comes from the spec; the pod's rank and the rendezvous address default
    to `$(VAR)` references that Kubernetes fills in from the pod's env (the Indexed Job's
    completion index and the first pod's stable DNS name), and the local runtime passes
    values. `--max-restarts=0`: a failed process fails the pod, and the controller restarts
    the whole gang from the last checkpoint.
    """
    resources = spec.resources
    return [
        *launcher,
        f"--nnodes={resources.num_nodes}",
        f"--nproc-per-node={resources.procs_per_node}",
        f"--node-rank={node_rank}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
        "--max-restarts=0",
        "-m",
        MODULE,
        "--config",
        config_path,
    ]


def trainer_env(spec: TrainingRunSpec) -> dict[str, str]:
    """Environment the trainer needs besides the paths and rendezvous variables."""
    env = {"PYTHONUNBUFFERED": "1", "LLMOPS_METRICS_PORT": str(METRICS_PORT)}
    if spec.resources.gpus_per_node == 0:
        # DeepSpeed on CPUs: its CPU accelerator, gloo for collectives.
        env["DS_ACCELERATOR"] = "cpu"
    return env
