"""Starting the trainer compiles nothing: DeepSpeed's CPU backend would JIT-compile its
shared-memory communication op (a C++ extension) at every start without a warm cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from helpers import Job, training_run

from llmops_trainer import checkpoint

# What torch's JIT extension builder and DeepSpeed's op loader print.
COMPILE_MARKERS = (
    "PyTorch extensions root",
    "Emitting ninja",
    "Building extension",
    "Loading extension",
    "ninja",
    "shm_comm",
)


def assert_no_extension_work(log: str) -> None:
    found = [marker for marker in COMPILE_MARKERS if marker in log]
    assert not found, f"the trainer built or loaded an extension ({found}):\n{log[-3000:]}"


def test_two_processes_load_no_extension(reference: Job) -> None:
    # The reference job (2 processes) shares the machine's extension cache: a cached op would
    # still be loaded, and DeepSpeed says so ("... shm_comm_op built successfully").
    assert_no_extension_work(reference.log.read_text())


def test_one_process_starts_twice_without_compiling(
    tmp_path: Path, job: Callable[..., Job]
) -> None:
    run = job(
        training_run(
            resources={"numNodes": 1, "procsPerNode": 1},
            deepspeed={"zeroStage": 1, "precision": "fp32"},
            hyperparameters={"maxSteps": 8},
            evaluation={"intervalSteps": 4, "batches": 2, "atStart": False},
        )
    )
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    run.env["TORCH_EXTENSIONS_DIR"] = str(extensions)  # an empty cache: a build would land here
    assert run.run() == 0, run.log.read_text()[-4000:]
    first = run.log.read_text()
    assert run.run() == 0, run.log.read_text()[-4000:]  # the second start resumes at the end
    second = run.log.read_text()[len(first) :]
    assert "resuming from step-8" in second
    assert_no_extension_work(first)
    assert_no_extension_work(second)
    assert list(extensions.iterdir()) == []
    assert "CPU threads per process" in first
    # One process has nothing to shard: ZeRO-1 runs (and checkpoints) as stage 0.
    assert checkpoint.read_state(run.checkpoints / "step-8")["zeroStage"] == 0
    # atStart: false: the first evaluation is at the interval, not at step 0.
    assert [m["step"] for m in run.metrics() if "valLoss" in m] == [4, 8]
    assert sorted(run.losses()) == list(range(1, 9))
