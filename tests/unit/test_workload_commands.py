from __future__ import annotations

from llmops.api.trainingrun import TrainingRunSpec
from llmops.api.workload import torchrun_command, trainer_env


def spec(gpus: int) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate(
        {
            "datasetRef": {"name": "web"},
            "hyperparameters": {"maxSteps": 10},
            "resources": {"numNodes": 3, "procsPerNode": max(gpus, 2), "gpusPerNode": gpus},
        }
    )


def test_pod_command_takes_rank_and_rendezvous_from_the_pod_env() -> None:
    assert torchrun_command(spec(8)) == [
        "torchrun",
        "--nnodes=3",
        "--nproc-per-node=8",
        "--node-rank=$(NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "--max-restarts=0",
        "-m",
        "llmops_trainer.train",
        "--config",
        "/etc/llmops/trainingrun.json",
    ]


def test_local_command_with_values() -> None:
    argv = torchrun_command(
        spec(0),
        "/tmp/run.json",
        node_rank=1,
        master_addr="127.0.0.1",
        master_port=29500,
        launcher=("python", "-m", "torch.distributed.run"),
    )
    assert argv[:3] == ["python", "-m", "torch.distributed.run"]
    assert "--node-rank=1" in argv and "--master-addr=127.0.0.1" in argv
    assert argv[-2:] == ["--config", "/tmp/run.json"]


def test_cpu_runs_select_deepspeeds_cpu_accelerator() -> None:
    assert trainer_env(spec(0))["DS_ACCELERATOR"] == "cpu"
    assert "DS_ACCELERATOR" not in trainer_env(spec(8))
    assert trainer_env(spec(8))["LLMOPS_METRICS_PORT"] == "9400"
