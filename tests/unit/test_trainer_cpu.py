"""The trainer's choices for speed on CPUs: threads per process, the DeepSpeed config of the
fast paths (fused AdamW, the trainer's own clipping, stage 0 on one process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from llmops.api.trainingrun import TrainingRunSpec
from llmops_trainer import train
from llmops_trainer.ds_config import deepspeed_config, trainer_clips, zero_stage
from llmops_trainer.plan import batch_plan


def spec(**overrides: Any) -> TrainingRunSpec:
    data: dict[str, Any] = {
        "datasetRef": {"name": "web"},
        "hyperparameters": {"maxSteps": 100, "gradientClipping": 0.5},
        "deepspeed": {"zeroStage": 0, "precision": "fp32"},
        "resources": {"procsPerNode": 1},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    return TrainingRunSpec.model_validate(data)


# -- threads ----------------------------------------------------------------------------------


def test_cgroup_quota_v2_and_v1(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert train._cgroup_cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert train._cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert train._cgroup_cpu_quota(v1) == 4.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert train._cgroup_cpu_quota(v1) is None
    assert train._cgroup_cpu_quota(tmp_path / "none") is None


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A node of 16 cores; the test sets the container's limit and the environment."""

    def set_up(limit: float | None, env: dict[str, str], launcher: set[str] | None) -> None:
        monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: set(range(16)))
        monkeypatch.setattr(train, "_cgroup_cpu_quota", lambda: limit)
        monkeypatch.setattr(train, "_launcher_environ", lambda: launcher)
        for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    return set_up


def test_threads_share_the_cpu_limit_among_the_processes(machine: Any) -> None:
    machine(4.0, {}, None)
    assert train.usable_cpus() == 4
    assert train.cpu_threads(1) == 4
    assert train.cpu_threads(2) == 2
    assert train.cpu_threads(8) == 1  # never 0
    machine(2.5, {}, None)
    assert train.cpu_threads(1) == 3  # a fractional limit rounds up
    machine(None, {}, None)  # no limit: the affinity mask
    assert train.cpu_threads(2) == 8


def test_torchruns_default_omp_setting_is_not_the_users(machine: Any) -> None:
    # torchrun with 2 workers sets OMP_NUM_THREADS=1 for them when nobody set it.
    machine(8.0, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, {"PATH", "HOME"})
    assert train.cpu_threads(2) == 4
    # Set by whoever started torchrun: it wins.
    machine(8.0, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, {"PATH", "OMP_NUM_THREADS"})
    assert train.cpu_threads(2) == 1
    # One worker: torchrun sets nothing, so the variable is the user's.
    machine(8.0, {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "1"}, {"PATH"})
    assert train.cpu_threads(1) == 3
    # The launcher's environment unreadable: trust the variable.
    machine(8.0, {"OMP_NUM_THREADS": "2", "LOCAL_WORLD_SIZE": "2"}, None)
    assert train.cpu_threads(2) == 2


def test_the_shm_op_is_never_built(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("deepspeed")
    import importlib

    module = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(module, "build_shm_op", lambda: pytest.fail("would build the op"))
    train.without_shm_comm()
    assert module.build_shm_op() is None


# -- the DeepSpeed config of the fast paths ---------------------------------------------------


def test_adamw_is_torchs_fused_kernel_unless_offloaded_or_foreach() -> None:
    s = spec()
    params = deepspeed_config(s, batch_plan(s, 1))["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    offload = spec(deepspeed={"zeroStage": 2, "offloadOptimizer": "cpu"})
    assert "fused" not in deepspeed_config(offload, batch_plan(offload, 1))["optimizer"]["params"]
    foreach = spec(deepspeed={"config": {"optimizer": {"params": {"foreach": True}}}})
    params = deepspeed_config(foreach, batch_plan(foreach, 1))["optimizer"]["params"]
    assert params["foreach"] is True and "fused" not in params
    unfused = spec(deepspeed={"config": {"optimizer": {"params": {"fused": False}}}})
    params = deepspeed_config(unfused, batch_plan(unfused, 1))["optimizer"]["params"]
    assert params["fused"] is False


@pytest.mark.parametrize(
    ("deepspeed", "procs", "gpus", "stage", "trainer_clips_"),
    [
        ({"zeroStage": 0, "precision": "fp32"}, 1, 0, 0, True),
        ({"zeroStage": 1, "precision": "fp32"}, 1, 0, 0, True),  # nothing to shard
        ({"zeroStage": 2, "precision": "bf16"}, 1, 0, 0, False),  # DeepSpeed's bf16 wrapper
        ({"zeroStage": 1, "precision": "fp32"}, 2, 0, 1, False),
        ({"zeroStage": 2, "precision": "fp32", "offloadOptimizer": "cpu"}, 1, 0, 2, False),
        ({"zeroStage": 3, "precision": "fp32"}, 1, 0, 3, False),
        ({"zeroStage": 1, "precision": "fp32"}, 1, 1, 1, False),  # GPUs: as asked
        ({"zeroStage": 0, "precision": "bf16"}, 2, 0, 0, False),
    ],
)
def test_stage_and_clipping_of_each_path(
    deepspeed: dict[str, Any], procs: int, gpus: int, stage: int, trainer_clips_: bool
) -> None:
    s = spec(deepspeed=deepspeed, resources={"procsPerNode": procs, "gpusPerNode": gpus})
    plan = batch_plan(s, procs)
    config = deepspeed_config(s, plan)
    assert zero_stage(s, plan) == config["zero_optimization"]["stage"] == stage
    assert trainer_clips(s, plan) is trainer_clips_
    # On the plain path the trainer clips (and reports the norm); DeepSpeed must not as well.
    assert config["gradient_clipping"] == (0.0 if trainer_clips_ else 0.5)
    if stage == 0:
        assert "reduce_scatter" not in config["zero_optimization"]


@pytest.mark.parametrize(
    ("resumes", "stage"),
    [
        (None, 0),  # a fresh start: nothing to shard
        ((1, 0), 0),  # its own checkpoint
        ((1, 2), 2),  # one process wrote it with ZeRO-2 (before stage 0): resumed exactly
        ((2, 2), 0),  # another world size: fresh moments either way
        ((1, 1), 0),  # another stage than the spec's
    ],
)
def test_one_process_keeps_the_stage_of_the_checkpoint_it_resumes(
    resumes: tuple[int, int] | None, stage: int
) -> None:
    s = spec(deepspeed={"zeroStage": 2, "precision": "fp32"}, resources={"procsPerNode": 1})
    plan = batch_plan(s, 1)
    config = deepspeed_config(s, plan, resumes)
    assert zero_stage(s, plan, resumes) == config["zero_optimization"]["stage"] == stage
    assert trainer_clips(s, plan, resumes) is (stage == 0)
    assert config["gradient_clipping"] == (0.0 if stage == 0 else 0.5)


# A block larger than glibc's largest automatic mmap threshold (32 MiB), smaller than ours:
# freed and allocated again, glibc's defaults map it anew (and fault every page in again)
# each time, while the trainer's settings keep it in the heap.
FAULTS_SCRIPT = """
import resource, sys
from llmops_trainer.cpu_memory import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
size = 48 << 20
def touch():
    block = bytearray(size)
    block[::4096] = bytes(len(range(0, size, 4096)))  # write to every page
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT, mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def test_freed_memory_is_reused_without_page_faults() -> None:
    pages = (48 << 20) // 4096
    assert page_faults("default") > 5 * pages  # what the settings are for
    assert page_faults("tuned") < pages // 10


def test_malloc_settings_from_the_environment_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmops_trainer.cpu_memory import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False
