"""Small learnable datasets, TrainingRun configs and a torchrun launcher for trainer tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmops.api.trainingrun import TrainingRun
from llmops.api.workload import torchrun_command, trainer_env
from llmops_trainer.shards import Manifest, ShardWriter, write_manifest

VOCAB = 32
EOS = 0
CONTEXT = 16


def make_dataset(root: Path, supervised: bool = False, seed: int = 0) -> Path:
    """Arithmetic progressions modulo the vocabulary: each token follows from the two before,
    so a tiny model learns it in a few dozen steps. Supervised: the response repeats the
    prompt shifted by one."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, documents in (("train", 300), ("validation", 40), ("test", 40)):
        writer = ShardWriter(
            root, split, "uint16", EOS, tokens_per_shard=2048, supervised=supervised
        )
        for _ in range(documents):
            start, stride = int(rng.integers(1, VOCAB)), int(rng.integers(1, 4))
            length = int(rng.integers(12, 30))
            tokens = [1 + (start + stride * i) % (VOCAB - 1) for i in range(length)]
            if supervised:
                response = [1 + t % (VOCAB - 1) for t in tokens]
                writer.add(tokens + response, [0] * len(tokens) + [1] * len(response))
            else:
                writer.add(tokens)
        splits[split] = writer.close()
    write_manifest(
        root,
        Manifest("test-fingerprint", "uint16", VOCAB, EOS, supervised=supervised, splits=splits),
    )
    return root


def training_run(**overrides: Any) -> dict[str, Any]:
    """A TrainingRun object (wire form) for a tiny model; `overrides` merge into the spec."""
    spec: dict[str, Any] = {
        "datasetRef": {"name": "toy"},
        "model": {
            "objective": "causal-lm",
            "numLayers": 2,
            "numHeads": 2,
            "hiddenSize": 32,
            "contextLength": CONTEXT,
        },
        "hyperparameters": {
            "learningRate": 0.01,
            "minLearningRate": 0.001,
            "warmupSteps": 2,
            "microBatchSize": 4,
            "maxSteps": 12,
            "seed": 7,
        },
        "deepspeed": {"zeroStage": 0, "precision": "fp32"},
        "resources": {"numNodes": 1, "procsPerNode": 2},
        "checkpointing": {"intervalSteps": 4, "keepLast": 2},
        "evaluation": {"intervalSteps": 4, "batches": 2, "metrics": ["perplexity", "accuracy"]},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    run = {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "toy-run"},
        "spec": spec,
    }
    TrainingRun.model_validate(run)  # fail early on a bad test config
    return run


class Job:
    """One `torchrun` launch of the trainer, as a training pod runs it."""

    def __init__(
        self,
        run: dict[str, Any],
        data: Path,
        work: Path,
        init: Path | None = None,
        port: int = 29611,
    ) -> None:
        self.work = work
        self.output = work / "output"
        self.checkpoints = work / "checkpoints"
        work.mkdir(parents=True, exist_ok=True)
        config = work / "trainingrun.json"
        config.write_text(json.dumps(run))
        spec = TrainingRun.model_validate(run).spec
        self.argv = torchrun_command(
            spec,
            str(config),
            node_rank=0,
            master_addr="127.0.0.1",
            master_port=port,
            launcher=(sys.executable, "-m", "torch.distributed.run"),
        )
        self.env = {
            **os.environ,
            **trainer_env(spec),
            "LLMOPS_DATA_DIR": str(data),
            "LLMOPS_OUTPUT_DIR": str(self.output),
            "LLMOPS_CHECKPOINT_DIR": str(self.checkpoints),
            "LLMOPS_METRICS_PORT": "0",
            "LLMOPS_LOG_INTERVAL": "1",
            "LLMOPS_SAMPLE_LOG": "1",
            "OMP_NUM_THREADS": "1",
        }
        if init is not None:
            self.env["LLMOPS_INIT_CHECKPOINT"] = str(init)
        self.process: subprocess.Popen[str] | None = None
        self.log = work / "log.txt"

    def resume_from(self, other: Job, step: int) -> None:
        """Start from `other`'s checkpoints as they were at `step`: later ones removed,
        `latest` pointing at step-<step>."""
        from llmops_trainer import checkpoint

        shutil.copytree(other.checkpoints, self.checkpoints)
        for folder in self.checkpoints.glob("step-*"):
            if int(folder.name.removeprefix("step-")) > step:
                shutil.rmtree(folder)
        checkpoint.write_pointer(self.checkpoints, "latest", f"step-{step}")

    def start(self) -> subprocess.Popen[str]:
        handle = self.log.open("a")
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        return self.process

    def wait(self, timeout: float = 300) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def run(self, timeout: float = 300) -> int:
        self.start()
        return self.wait(timeout)

    def wait_for_step(self, step: int, timeout: float = 300, poll: float = 0.2) -> None:
        """Block until the training log shows `step` (or the job ends)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.steps() and max(self.steps()) >= step:
                return
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"job ended early:\n{self.log.read_text()[-4000:]}")
            time.sleep(poll)
        raise AssertionError("timed out waiting for training progress")

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def worker_pids(self) -> list[int]:
        """The trainer processes torchrun started (its children)."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def metrics(self) -> list[dict[str, Any]]:
        path = self.output / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def steps(self) -> list[int]:
        return [m["step"] for m in self.metrics() if "trainLoss" in m]

    def losses(self) -> dict[int, float]:
        """Training loss per step; a step re-run after a resume keeps its last value."""
        return {m["step"]: m["trainLoss"] for m in self.metrics() if "trainLoss" in m}

    def samples(self) -> dict[int, list[int]]:
        """Samples per step over all ranks (the last run of a step wins)."""
        per_rank: dict[int, dict[int, list[int]]] = {}
        for path in sorted(self.output.glob("samples-rank*.jsonl")):
            rank = int(path.stem.removeprefix("samples-rank"))
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                per_rank.setdefault(entry["step"], {})[rank] = entry["samples"]
        return {
            step: [s for rank in sorted(ranks) for s in ranks[rank]]
            for step, ranks in per_rank.items()
        }
