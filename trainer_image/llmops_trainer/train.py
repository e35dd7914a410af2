"""The training pods' entrypoint: one process per accelerator, started by `torchrun`.

    torchrun ... -m llmops_trainer.train --config /etc/llmops/trainingrun.json

The config is the TrainingRun object as JSON. Paths come from the environment:
LLMOPS_DATA_DIR (the prepared Dataset), LLMOPS_CHECKPOINT_DIR, LLMOPS_OUTPUT_DIR (final
model, model card, reports, progress.json) and optionally LLMOPS_INIT_CHECKPOINT (weights to
fine-tune from). The process resumes from the newest valid checkpoint it finds, saves every
`checkpointing.intervalSteps` steps and when it receives SIGTERM, and exits 143 after a
SIGTERM checkpoint so the controller can tell preemption from completion.

On CPUs (no GPUs in the spec):

- Threads: each process runs torch with (usable CPUs) / (processes in this pod) intra-op
  threads, at least 1, where the usable CPUs are those of the process's affinity mask, capped by
  the container's CPU limit (the cgroup's CPU quota): torch's default is every core of the node,
  which oversubscribes a pod with a CPU limit, and torchrun's default for several processes is 1,
  which leaves cores idle when there are more cores than processes. An OMP_NUM_THREADS that
  whoever started torchrun set wins (torchrun's own default does not count).
- Process count: `resources.procsPerNode`; unset means one (one per GPU on GPUs). A process
  per core with one thread each does less work per process, but adds a gradient all-reduce
  (gloo) and a lockstep that another program on the node stalls; on 2 cores and nanoGPT's
  small model it measured about 0.9x one process with 2 threads, so one process per pod is
  the faster layout there (benchmarks/train_throughput.py --nanogpt measures both).
- One process has nothing to shard: ZeRO stage 1 or 2 runs as stage 0 there, and stage 0 on
  one process skips the gradient all-reduce (ds_config.zero_stage).
- No compiled op at start: DeepSpeed's CPU communication backend would JIT-compile its
  shared-memory all-reduce (a C++ extension: a compiler, ninja and minutes at every pod start
  without a warm cache). Only DeepSpeed's inference all-reduce uses it; training's collectives
  go through torch.distributed (gloo) either way, so the trainer starts without it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from llmops.api.trainingrun import TrainingRun, TrainingRunSpec, fold_split
from llmops.api.workload import (
    ADAPTER_SUBDIR,
    METRICS_HISTORY_FILE,
    METRICS_PORT,
    TRAINER_STAGE,
    BenchmarkResult,
    Env,
    FinalReport,
    MetricsEntry,
    TrainingPhase,
    ValidationScores,
)
from llmops_trainer import benchmarks, checkpoint, evaluate, hf_models, outputs
from llmops_trainer.batches import (
    Objective,
    SampleOrder,
    Samples,
    Windows,
    cross_validation_split,
    eval_indices,
    make_batch,
    rank_positions,
    text_targets,
)
from llmops_trainer.cpu_memory import keep_freed_memory
from llmops_trainer.ds_config import deepspeed_config, linear_lr, trainer_clips, zero_stage
from llmops_trainer.model import GPT, GPTConfig, flops_per_token, kind_means, lm_loss, loss_by_kind
from llmops_trainer.plan import BatchPlan, batch_plan, total_steps
from llmops_trainer.progress import ProgressState, Reporter, progress_record, trainer_report
from llmops_trainer.shards import Manifest, read_manifest
from llmops_trainer.termination import write_failure, write_termination_message
from llmops_trainer.weights import consolidated_state_dict

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a killed process would have returned
# Errors a restart would meet again: the set-up (spec, data, model) and what follows training,
# unless the error is a fault of the gang itself (see node_fault).
PERMANENT_AT = {"setup": "InvalidTrainingSetup", "finish": "FinalEvaluationFailed"}
# What gloo, NCCL and the rendezvous say when a peer process or its node went away.
PEER_LOSS = (
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "timed out",
    "timeout",
    "nccl",
    "gloo",
    "rendezvous",
    "socket",
)


def node_fault(error: BaseException) -> bool:
    """Whether an error is the gang's (a lost peer, the network, the rendezvous) rather than
    the run's: a restart on healthy pods can get past it, so it must not fail the run."""
    if isinstance(error, (dist.DistError, ConnectionError, TimeoutError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and any(words in message for words in PEER_LOSS)


BLEU_EXAMPLES = 16
WORST_PASSAGES = 10
log = logging.getLogger("llmops_trainer")

# Dense peak FLOP/s per accelerator in 16-bit, for MFU when LLMOPS_PEAK_FLOPS is not set.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


@dataclass(frozen=True)
class Paths:
    data: Path
    checkpoints: Path
    output: Path
    init: Path | None
    pretrained: Path | None = None  # the verified open-weights model folder (model.pretrained)

    @classmethod
    def from_env(cls, spec: TrainingRunSpec) -> Paths:
        output = Path(os.environ.get(Env.OUTPUT_DIR, "output"))
        init = os.environ.get(Env.INIT_CHECKPOINT)
        if not init and spec.init is not None and spec.init.path and spec.init.path[0] == "/":
            init = spec.init.path  # a path inside the image needs no help from the operator
        pretrained = None
        if spec.model.pretrained is not None:
            uri = spec.model.pretrained.uri
            folder = os.environ.get(Env.PRETRAINED_DIR) or (uri if uri[0] == "/" else None)
            if folder is None:
                raise RuntimeError(f"model.pretrained needs {Env.PRETRAINED_DIR} (the initializer)")
            pretrained = Path(folder)
        return cls(
            data=Path(os.environ[Env.DATA_DIR]),
            checkpoints=Path(os.environ.get(Env.CHECKPOINT_DIR, str(output / "checkpoints"))),
            output=output,
            init=Path(init) if init else None,
            pretrained=pretrained,
        )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only, not on biases, norms (nanoGPT, GPT-3); frozen
    parameters (a LoRA run's base) are not the optimizer's."""
    trained = [p for p in model.parameters() if p.requires_grad]
    # ZeRO-3 leaves a 0-d placeholder on each rank; ds_shape is the real shape.
    decay = [p for p in trained if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in trained if len(getattr(p, "ds_shape", p.shape)) < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    if isinstance(model, hf_models.CausalLM):
        hf_models.load_trained(model, state_dict)
        return
    state_dict = dict(state_dict)
    # The tied head may be stored once, under the embedding's name.
    state_dict.setdefault("lm_head.weight", state_dict["transformer.wte.weight"])
    # A GPT-2 layout export of a model without biases carries them as zeros.
    expected = model.state_dict().keys()
    for name in [n for n in state_dict if n.endswith(".bias") and n not in expected]:
        if state_dict[name].count_nonzero():
            raise ValueError(f"{name} is not zero but the model has none (model.bias: false)")
        del state_dict[name]
    model.load_state_dict(state_dict, strict=True)


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of all gradients (already averaged over ranks at the accumulation boundary)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def peak_flops(device: torch.device) -> float | None:
    if Env.PEAK_FLOPS in os.environ:
        return float(os.environ[Env.PEAK_FLOPS])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup's CPU quota
    (a container's CPU limit), rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup may use (quota / period), or None when unlimited or unknown."""
    try:
        if (root / "cpu.max").is_file():  # cgroup v2: "<quota> <period>" or "max <period>"
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").is_file():
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def _omp_threads_from_user() -> int | None:
    """OMP_NUM_THREADS when whoever started torchrun set it; None when unset or when torchrun
    made it up (it sets 1 for its workers when it starts several and the variable is unset:
    then its own environment, as it was started, lacks it)."""
    value = os.environ.get("OMP_NUM_THREADS")
    if not value or not value.isdigit() or int(value) < 1:
        return None
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        launcher = _launcher_environ()
        if launcher is not None and "OMP_NUM_THREADS" not in launcher:
            return None
    return int(value)


def _launcher_environ() -> set[str] | None:
    """Names in the environment torchrun (the parent process) was started with; None when
    unreadable (then OMP_NUM_THREADS is trusted)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/environ").read_bytes()
    except OSError:
        return None
    return {item.split(b"=", 1)[0].decode(errors="replace") for item in raw.split(b"\0") if item}


def cpu_threads(local_processes: int) -> int:
    """Intra-op threads for one of `local_processes` training processes on CPUs."""
    from_user = _omp_threads_from_user()
    if from_user is not None:
        return from_user
    return max(1, usable_cpus() // max(1, local_processes))


def without_nvml_cuda_check() -> None:
    """DeepSpeed's import makes torch answer "is CUDA available?" from NVML, which loads
    libnvidia-ml again each time it is asked, and torch's AdamW asks on every step. A CPU
    process has no CUDA state to protect from forks."""
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)


def without_shm_comm() -> None:
    """Keep DeepSpeed's CPU backend from building (JIT-compiling) and loading its
    shared-memory communication op when it initializes. The op serves only
    `inference_all_reduce` (tensor-parallel inference); every collective of training goes
    through torch.distributed, so nothing the trainer does changes without it."""
    module = importlib.import_module("deepspeed.comm.torch")
    if hasattr(module, "build_shm_op"):
        setattr(module, "build_shm_op", lambda: None)  # noqa: B010
    else:  # a DeepSpeed that moved it: say so rather than compile silently
        log.warning("deepspeed.comm.torch.build_shm_op not found; DeepSpeed may compile ops")


class Stop:
    """Set by SIGTERM; checked (and agreed on by all ranks) at every step boundary."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            cls.requested = True

        signal.signal(signal.SIGTERM, handler)


class Trainer:
    def __init__(self, run: TrainingRun, paths: Paths) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.run = run
        self.spec = spec = run.spec
        self.paths = paths
        accelerator = get_accelerator()
        on_cpu = accelerator.device_name() == "cpu"
        if on_cpu:
            without_nvml_cuda_check()
            keep_freed_memory()
            without_shm_comm()
            torch.set_num_threads(cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        if on_cpu:
            self._info(f"{torch.get_num_threads()} CPU threads per process")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if on_cpu:
            self.device = torch.device("cpu")
        else:
            accelerator.set_device(local_rank)
            self.device = torch.device(accelerator.device_name(local_rank))
        self.reporter = Reporter(
            self.rank == 0, paths.output, int(os.environ.get(Env.METRICS_PORT, str(METRICS_PORT)))
        )
        # The spec's interval, unless the pod's environment overrides it.
        self.log_interval = int(
            os.environ.get(Env.LOG_INTERVAL) or spec.evaluation.log_interval_steps
        )
        self.sample_log = os.environ.get(Env.SAMPLE_LOG) == "1"

        self.manifest: Manifest = read_manifest(paths.data)
        hp = spec.hyperparameters
        self.objective = Objective(spec.model.objective, self.manifest.vocab_size, hp.seed)
        self.plan: BatchPlan = batch_plan(spec, self.world)
        self.total_steps = total_steps(spec, self.plan)
        self.ds_config = deepspeed_config(spec, self.plan)
        self.zero_stage = zero_stage(spec, self.plan)  # what runs; see ds_config.zero_stage
        # Cross-validation: train on the other folds of the training split, validate on the
        # held-out one (`fold-<i>/<k>`) instead of the validation split.
        self.train_windows: Samples = Windows(
            paths.data, self.manifest, "train", spec.model.context_length
        )
        self.held_out: Samples | None = None
        self.validation_split = "validation"
        cv = spec.cross_validation
        if cv is not None:
            assert isinstance(self.train_windows, Windows)
            self.train_windows, self.held_out = cross_validation_split(
                self.train_windows, cv.folds, cv.fold
            )
            self.validation_split = fold_split(cv.fold, cv.folds)
        self.order = SampleOrder(len(self.train_windows), hp.seed)
        self.validates = self._has_samples(self.validation_split)
        self.evaluates = self.validates or spec.evaluation.train_split
        self.model_config = GPTConfig(
            vocab_size=self.objective.model_vocab_size,
            context_length=spec.model.context_length,
            num_layers=spec.model.num_layers,
            num_heads=spec.model.num_heads,
            hidden_size=spec.model.hidden_size,
            dropout=spec.model.dropout,
            causal=spec.model.objective != "masked-lm",
            bias=spec.model.with_biases,
            activation=spec.model.activation_function,
        )
        # Models from transformers: an open-weights checkpoint or a llama built from the spec.
        self.transformers = spec.model.pretrained is not None or spec.model.architecture == "llama"
        self.shape: hf_models.Shape | None = None
        self.state = ProgressState()
        self.engine: Any = None
        # DeepSpeed reports the gradient norm except without ZeRO in fp32; on that path the
        # trainer clips (ds_config.trainer_clips) and takes the norm from its clipping.
        self._plain_fp32 = trainer_clips(spec, self.plan)
        self._grad_norm: torch.Tensor | None = None
        self._trained: list[torch.nn.Parameter] = []
        # A mixed dataset: [text loss sum, tokens, supervised loss sum, tokens] of a logged step.
        self._kind_sums: torch.Tensor | None = None
        self._step_lr = 0.0
        self.benchmark_tasks: list[Path] = []  # rank 0: copies of the task folders

    # -- set-up ---------------------------------------------------------------------------

    def _pick_checkpoint(self) -> Path | None:
        """Rank 0 finds the newest valid checkpoint and tells the others (verification reads
        every byte, so it is done once)."""
        choice: list[str | None] = [None]
        if self.rank == 0:
            checkpoint.clean_partials(self.paths.checkpoints)
            skipped: list[str] = []
            folder = checkpoint.find_resumable(self.paths.checkpoints, skipped)
            for problem in skipped:
                log.warning("skipping damaged checkpoint: %s", problem)
            choice = [str(folder) if folder else None]
        dist.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] else None

    def _build_model(self) -> torch.nn.Module:
        spec = self.spec
        if not self.transformers:
            return GPT(self.model_config)
        if (spec.model.pretrained is None) != (self.paths.pretrained is None):
            raise ValueError("model.pretrained and the pretrained model folder go together")
        network = hf_models.build(
            spec.model, self.objective.model_vocab_size, self.paths.pretrained, self.ds_config
        )
        self.shape = hf_models.Shape.of(network.config)
        hf_models.check_compatible(self.shape, self.manifest.vocab_size, spec.model.context_length)
        if spec.deepspeed.activation_checkpointing:
            hf_models.enable_activation_checkpointing(network)
        if spec.adapter is not None:
            network = hf_models.add_adapter(network, spec.adapter, self.device)
        model = hf_models.CausalLM(network, spec.model.context_length)
        self._info(
            f"{self.shape.architecture}: {model.num_parameters():,} parameters, "
            f"{model.num_trainable_parameters():,} trained"
            + (f", from {spec.model.pretrained.uri}" if spec.model.pretrained else "")
        )
        return model

    def model_description(self) -> dict[str, Any]:
        if self.shape is None:
            return self.model_config.to_dict()
        source = self.spec.model.pretrained
        return hf_models.describe(self.shape, source.uri if source else None, self.spec.adapter)

    def _flops_per_token(self) -> float:
        module = self.engine.module
        if self.shape is None:
            return flops_per_token(self.model_config, module.num_parameters())
        return hf_models.flops_per_token(
            self.shape,
            module.num_parameters(),
            self.spec.model.context_length,
            self.spec.adapter is not None,
        )

    def _check_data(self) -> None:
        """Refuse an objective the Dataset cannot feed, before any model is built."""
        if self.spec.model.objective == "sft" and not self.manifest.supervised:
            raise ValueError(
                "spec.model.objective sft learns the responses of supervised records, and "
                f"Dataset {self.spec.dataset_ref.name!r} has plain text only (no source with "
                "promptField/responseField or messagesField): use objective causal-lm, or "
                "add a supervised source"
            )

    def setup(self) -> None:
        import deepspeed

        self._check_data()
        if self.spec.evaluation.benchmarks:
            self._prepare_benchmarks()
        resume = self._pick_checkpoint()
        saved = checkpoint.read_state(resume) if resume is not None else None
        if saved is not None:
            self._resume_layout((saved["worldSize"], saved["zeroStage"]))
        torch.manual_seed(self.spec.hyperparameters.seed)
        model = self._build_model()
        exact = False
        if resume is not None and saved is not None:
            # DeepSpeed's sharded optimizer state only loads into the same layout; otherwise
            # continue from the consolidated fp32 weights with fresh optimizer moments.
            exact = (saved["worldSize"], saved["zeroStage"]) == (self.world, self.zero_stage)
            if not exact:
                load_weights(model, consolidated_state_dict(resume))
            self.state.restore(saved)
            change = ""
            if saved["worldSize"] != self.world:
                change = f" (world size {saved['worldSize']} -> {self.world})"
            elif not exact:
                change = f" (ZeRO stage {saved['zeroStage']} -> {self.zero_stage})"
            self._info(f"resuming from {resume.name} at step {saved['step']}{change}")
        elif self.paths.init is not None:
            source = checkpoint.resolve(self.paths.init)
            load_weights(model, consolidated_state_dict(source))
            self._info(f"initialised weights from {source}")
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, self.spec.hyperparameters.weight_decay),
            config=self.ds_config,
        )
        if exact and resume is not None:
            self.engine.load_checkpoint(
                str(resume.parent), tag=resume.name, load_module_strict=False
            )
        if self._direct:
            # Averaging gradients over one process changes nothing; DeepSpeed would still
            # flatten, all-reduce and copy them back every step.
            self.engine.enable_backward_allreduce = False
        # What _clip clips, listed once (walking the module tree costs ~1% of a small step).
        self._trained = [p for p in self.engine.module.parameters() if p.requires_grad]
        # DeepSpeed's schedulers start before step 0; point them at the next step to take.
        if self.engine.lr_scheduler is not None and not exact:
            self.engine.lr_scheduler.step(self.state.step)
        self.engine.global_steps = self.state.step

    def _prepare_benchmarks(self) -> None:
        """Rank 0 copies the benchmarks' task folders and checks them before training, so a
        wrong folder or task name fails the run now rather than after training. Every rank
        fails with rank 0's reason (they share the pod's termination message)."""
        problem: list[str | None] = [None]
        if self.rank == 0:
            try:
                self._benchmark_folders()
            except (ValueError, OSError) as error:
                problem = [str(error)]
        dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise benchmarks.BenchmarkError(problem[0])

    def _benchmark_folders(self) -> None:
        if not self.transformers and not (self.paths.data / self.manifest.tokenizer).is_file():
            raise ValueError(
                "evaluation.benchmarks need a tokenizer, and the Dataset has none (token ids "
                "only): give it a tokenizer, or fine-tune a model.pretrained"
            )
        scratch = Path(tempfile.mkdtemp(prefix="llmops-benchmarks-"))
        self.benchmark_tasks = benchmarks.prepare(self.spec.evaluation.benchmarks, scratch)
        names = ", ".join(b.name for b in self.spec.evaluation.benchmarks)
        self._info(f"benchmarks after training: {names}")

    def _benchmark(self, model: benchmarks.ModelFolders) -> list[BenchmarkResult]:
        self._info("running benchmarks (lm-evaluation-harness)")
        results = benchmarks.run(
            self.spec.evaluation.benchmarks,
            self.benchmark_tasks,
            model,
            str(self.device),
            seed=self.spec.hyperparameters.seed,
        )
        for result in results:
            score = result.score
            self._info(f"benchmark {score.name}: {score.metric} {score.value:.4g}")
        return results

    def _resume_layout(self, layout: tuple[int, int]) -> None:
        """Runs the configured ZeRO stage instead of one process's stage 0 when the checkpoint
        to resume was written that way (ds_config.zero_stage), so it resumes exactly."""
        stage = zero_stage(self.spec, self.plan, resumes=layout)
        if stage == self.zero_stage:
            return
        self._info(f"running ZeRO stage {stage}, as the checkpoint to resume was written")
        self.zero_stage = stage
        self.ds_config = deepspeed_config(self.spec, self.plan, resumes=layout)
        self._plain_fp32 = trainer_clips(self.spec, self.plan, resumes=layout)

    # -- the loop -------------------------------------------------------------------------

    @property
    def _direct(self) -> bool:
        """One process in fp32 without ZeRO: the trainer steps the module and the optimizer
        itself. The engine's per-step wrappers (output hooks, timers, gradient-accumulation
        counters, a walk of the module tree to drop the gradients) do nothing there but cost
        ~5% of a small model's step. DeepSpeed still saves and loads the checkpoints."""
        return self.world == 1 and self._plain_fp32

    def train(self) -> str:
        """Train until the planned step, early stopping or SIGTERM; returns why it stopped."""
        spec = self.spec
        plan = self.plan
        tokens_per_step = plan.global_batch_size * spec.model.context_length
        flops = self._flops_per_token()
        peak = peak_flops(self.device)
        last_saved = self.state.step
        self._report("Training")
        if self.state.step == 0 and spec.evaluation.at_start and self.evaluates:
            self._validate()  # the initial weights: where the curves start
        self.engine.train()
        # Tokens/s counts training time only: evaluations and checkpoints are paused out.
        window_start, window_steps = time.perf_counter(), 0
        while self.state.step < self.total_steps:
            step = self.state.step
            if self.engine.lr_scheduler is None:
                factor = linear_lr(spec, plan, step)
                for group in self.engine.optimizer.param_groups:
                    group["lr"] = spec.hyperparameters.learning_rate * factor
            self._step_lr = self.engine.get_lr()[0]
            loss = self._step(step, logs=self._logs(step + 1))
            # One collective agrees on the step's mean loss and on whether anyone got SIGTERM.
            mean_loss, stop = loss, Stop.requested
            if self.world > 1:
                agreed = torch.tensor([loss, float(Stop.requested)], dtype=torch.float64)
                dist.all_reduce(agreed)
                mean_loss, stop = agreed[0].item() / self.world, agreed[1].item() > 0
            self.state.step = step = step + 1
            self.state.consumed_samples += plan.global_batch_size
            window_steps += 1
            if self._logs(step):
                elapsed = time.perf_counter() - window_start
                tokens_per_second = window_steps * tokens_per_step / elapsed
                mfu = None if peak is None else tokens_per_second * flops / (peak * self.world)
                self._log_step(mean_loss, tokens_per_second, mfu, window_steps * tokens_per_step)
                window_start, window_steps = time.perf_counter(), 0
            paused = time.perf_counter()
            stopped_early = False
            if step % spec.evaluation.interval_steps == 0 and self.evaluates:
                stopped_early = self._validate()
            if stop:
                self._save("SIGTERM")
                return "Interrupted"
            if step % spec.checkpointing.interval_steps == 0 or stopped_early:
                self._save("interval")
                last_saved = step
            if stopped_early:
                return "EarlyStopped"
            window_start += time.perf_counter() - paused
        if last_saved != self.state.step:
            self._save("final")
        return "Completed"

    def _logs(self, step: int) -> bool:
        """Whether the metrics of the step that ends at `step` are logged."""
        return step % self.log_interval == 0 or step == self.total_steps

    def _step(self, step: int, logs: bool = True) -> float:
        plan = self.plan
        positions = rank_positions(
            self.state.consumed_samples, plan.global_batch_size, self.world, self.rank
        )
        indices = [self.order.index(p) for p in positions]
        if self.sample_log:  # indices into the training split (across folds too)
            samples = [self.train_windows.source_index(i) for i in indices]
            with (self.paths.output / f"samples-rank{self.rank}.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": step, "samples": samples}) + "\n")
        total = 0.0  # the engine is in training mode (evaluations switch back when done)
        by_kind = logs and self.manifest.mixed
        self._kind_sums = torch.zeros(4, dtype=torch.float64) if by_kind else None
        for m in range(plan.accumulation):
            chunk = indices[m * plan.micro_batch_size : (m + 1) * plan.micro_batch_size]
            inputs, labels = make_batch(self.train_windows, chunk, self.objective)
            inputs = inputs.to(self.device)
            logits = self.engine.module(inputs) if self._direct else self.engine(inputs)
            labels = labels.to(self.device)
            loss = lm_loss(logits, labels)
            if self._kind_sums is not None:
                text = text_targets(self.train_windows, chunk, self.objective)
                self._kind_sums += loss_by_kind(logits, labels, text)
            boundary = m == plan.accumulation - 1
            if self._direct:
                # The mean over the micro-batches, as DeepSpeed's backward scales it.
                scaled = loss / plan.accumulation if plan.accumulation > 1 else loss
                torch.autograd.backward(scaled)
            else:
                self.engine.backward(loss)
            if boundary and self._plain_fp32:
                # Gradients are averaged over the ranks by now; the optimizer steps next.
                self._clip(logs)
            if not self._direct:
                self.engine.step()
            elif boundary:
                self._optimizer_step()
            total += loss.item()
        return total / plan.accumulation

    def _optimizer_step(self) -> None:
        """What DeepSpeed's engine.step does at a boundary without ZeRO in fp32 (the direct
        path): step, drop the gradients, advance the schedule and the engine's counters (a
        checkpoint records them)."""
        engine = self.engine
        engine.optimizer.step()
        for parameter in self._trained:
            parameter.grad = None
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.step()
        engine.global_steps += 1
        engine.global_samples += self.plan.global_batch_size

    def _clip(self, logs: bool) -> None:
        """Clip to gradientClipping (torch's fused clip_grad_norm_, whose result is the
        reported norm); without clipping, take the norm of a step that is logged only."""
        clipping = self.spec.hyperparameters.gradient_clipping
        if clipping > 0:  # parameters without a gradient are skipped by torch
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self._trained, clipping)
        elif logs:
            self._grad_norm = _grad_norm(self.engine.module)

    def _record(self, entry: MetricsEntry) -> None:
        """Keep the entry (the model card's curve, resumable) and, on rank 0, append it to
        the metrics history."""
        self.state.history.append(entry.to_dict())
        if self.rank == 0:
            with (self.paths.output / METRICS_HISTORY_FILE).open("a") as handle:
                handle.write(entry.to_json() + "\n")

    def _kind_losses(self) -> tuple[float | None, float | None]:
        """A mixed dataset's logged step: the mean loss of its plain-text targets and of its
        supervised ones, over all micro-batches and ranks (token-weighted, unlike trainLoss,
        the mean of the micro-batches' means). Collective: every rank calls it."""
        sums = self._kind_sums
        if sums is None:
            return None, None
        if self.world > 1:
            sums = sums.to(self.device)  # NCCL reduces accelerator tensors only
            dist.all_reduce(sums)
        return kind_means(sums.cpu())

    def _log_step(
        self, loss: float, tokens_per_second: float, mfu: float | None, tokens: int
    ) -> None:
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None and self._grad_norm is not None:
            grad_norm = float(self._grad_norm)
        text, supervised = self._kind_losses()
        entry = MetricsEntry(
            step=self.state.step,
            train_loss=loss,
            train_loss_text=text,
            train_loss_supervised=supervised,
            learning_rate=self._step_lr,
            grad_norm=None if grad_norm is None else float(grad_norm),
            tokens_per_second=tokens_per_second,
            mfu=mfu,
        )
        self._record(entry)
        if self.rank == 0:
            m = self.reporter.metrics
            m.tokens.inc(tokens)
            if self.device.type == "cuda":
                m.memory.set(torch.cuda.max_memory_allocated(self.device))
        self._report("Training")

    def _validate(self) -> bool:
        """Evaluate on the validation split, and on the training split when the spec asks;
        True when early stopping says stop."""
        spec = self.spec
        evaluation = spec.evaluation
        # fixed: draw 0 every time; fresh: the next stretch of the split at each evaluation.
        draw = 0 if evaluation.sample == "fixed" else self.state.step // evaluation.interval_steps
        entry = MetricsEntry(step=self.state.step)
        if self.validates:
            scores = self._score(self.validation_split, evaluation.batches, draw=draw)
            bleu = None
            if "bleu" in evaluation.metrics and self.held_out is None:  # none on a fold
                bleu = self._bleu("validation")[0]
            self.state.validation = ValidationScores(
                loss=scores.loss,
                perplexity=scores.perplexity,
                accuracy=scores.accuracy,
                bleu=bleu,
                loss_text=scores.loss_text,
                loss_supervised=scores.loss_supervised,
            )
            entry.val_loss, entry.perplexity = scores.loss, scores.perplexity
            entry.val_loss_text = scores.loss_text
            entry.val_loss_supervised = scores.loss_supervised
            entry.accuracy, entry.bleu = scores.accuracy, bleu
        if evaluation.train_split:
            # Another seed than the training order's, so these are not the first samples
            # trained on but a spread over the split.
            train = self._score("train", evaluation.batches, draw=draw, seed_offset=1)
            entry.train_split_loss = train.loss
        self._record(entry)
        if self.rank == 0 and entry.train_split_loss is not None:
            self.reporter.metrics.train_split_loss.set(entry.train_split_loss)
        self._report("Training")
        stopping = evaluation.early_stopping
        if stopping is None or not self.validates:
            return False
        metric = {"loss": "valLoss"}.get(stopping.metric, stopping.metric)
        value = entry.to_dict().get(metric)
        if value is None:
            return False
        sign = 1.0 if stopping.metric in ("accuracy", "bleu") else -1.0
        best = self.state.best_metric
        if best is None or sign * (value - best) > stopping.min_delta:
            self.state.best_metric = value
            self.state.evals_without_improvement = 0
            return False
        self.state.evals_without_improvement += 1
        if self.state.evals_without_improvement >= stopping.patience:
            self._info(f"early stopping: {stopping.metric} did not improve for {stopping.patience}")
            return True
        return False

    def _score(
        self,
        split: str,
        batches: int,
        keep_per_sample: bool = False,
        draw: int = 0,
        seed_offset: int = 0,
    ) -> evaluate.SplitScores:
        """Scores of `split` on its evaluation subset (batches.eval_indices: `draw` 0 is the
        fixed one)."""
        windows = self._windows(split)
        count = batches * self.plan.micro_batch_size * self.world
        seed = self.spec.hyperparameters.seed + seed_offset
        indices = eval_indices(len(windows), count, seed, self.world, self.rank, draw)
        self.engine.eval()
        scores = evaluate.score_split(
            self.engine,
            windows,
            indices,
            self.objective,
            self.plan.micro_batch_size,
            self.device,
            keep_per_sample,
            by_kind=self.manifest.mixed,
        )
        self.engine.train()
        return scores

    def _bleu(self, split: str) -> tuple[float | None, list[dict[str, str]]]:
        if not self.model_config.causal:
            return None, []
        task = evaluate.generation_task(
            self.paths.data, self.manifest, split, self.spec.model.context_length, BLEU_EXAMPLES
        )
        self.engine.eval()
        result = evaluate.bleu(
            self.engine.module,
            task,
            self.manifest.eos_token_id,
            evaluate.decoder(self.paths.data / self.manifest.tokenizer),
            self.device,
        )
        self.engine.train()
        return result

    # -- checkpoints ----------------------------------------------------------------------

    def _save(self, reason: str) -> Path:
        start = time.perf_counter()
        step = self.state.step
        root = self.paths.checkpoints
        partial = root / checkpoint.partial_name(step)
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            checkpoint.clean_partials(root)
        dist.barrier()
        # A LoRA checkpoint holds the adapter only: the frozen base comes from the model.
        self.engine.save_checkpoint(
            str(root),
            tag=partial.name,
            save_latest=False,
            exclude_frozen_parameters=self.spec.adapter is not None,
        )
        dist.barrier()  # every rank's shards are on disk
        name = checkpoint.name_for(step)
        # Every rank keeps the same view of the checkpoints (rank 0 reports it).
        self.state.checkpointed(name)
        if self.rank == 0:
            checkpoint.write_state(
                partial,
                {
                    **self.state.saved(),
                    "worldSize": self.world,
                    "zeroStage": self.zero_stage,
                    "validationLoss": self.state.latest_checkpoint_validation_loss,
                    "model": self.model_description(),
                    "reason": reason,
                },
            )
            # A checkpoint is self-contained: whoever serves or fine-tunes it needs the
            # vocabulary it was trained with.
            tokenizer = self.paths.data / self.manifest.tokenizer
            if tokenizer.is_file():
                shutil.copyfile(tokenizer, partial / "tokenizer.json")
            if self.spec.adapter is not None:  # servable as it is, as the final adapter is
                sources = [p for p in (self.paths.pretrained, self.paths.data) if p is not None]
                hf_models.save_checkpoint_adapter(
                    self.engine.module, partial, ADAPTER_SUBDIR, sources
                )
            checkpoint.seal(partial)
            found = checkpoint.problems(partial)
            if found:
                raise RuntimeError(f"checkpoint {name} failed verification: {found}")
            checkpoint.publish(root, step)
            if self.state.best_checkpoint == name:
                checkpoint.write_pointer(root, checkpoint.BEST, name)
            checkpoint.retain(root, self.spec.checkpointing.keep_last)
            seconds = time.perf_counter() - start
            self.reporter.metrics.checkpoint_seconds.observe(seconds)
            self._info(f"checkpoint {name} ({reason}) in {seconds:.1f}s")
        dist.barrier()
        self._report("Training")
        return root / name

    # -- the end --------------------------------------------------------------------------

    def finish(self, reason: str) -> dict[str, Any]:
        """Test-split evaluation, generation, export, reports and the model card."""
        self._report("Evaluating")
        # A Dataset may have no test split (split.test: 0), or an empty one: then the
        # validation split is evaluated, or nothing, and the report says which.
        # A cross-validation run scores its held-out fold (`fold-<i>/<k>`).
        candidates = ("test", "validation") if self.held_out is None else (self.validation_split,)
        usable = [s for s in candidates if self._has_samples(s)]
        split = usable[0] if usable else "none"
        final: dict[str, Any] = {"stopReason": reason, "steps": self.state.step, "split": split}
        worst: list[dict[str, Any]] = []
        examples: list[dict[str, str]] = []
        decode = evaluate.decoder(self.paths.data / self.manifest.tokenizer)
        if split == self.validation_split and self.held_out is not None:
            # A fold: no unigram comparison or BLEU (both read whole splits of the Dataset).
            scores = self._score(split, self.spec.evaluation.batches, keep_per_sample=True)
            final.update(loss=scores.loss, perplexity=scores.perplexity, accuracy=scores.accuracy)
            worst = evaluate.worst_passages(scores, self.held_out, decode, WORST_PASSAGES)
        elif split in self.manifest.splits:
            scores = self._score(split, self.spec.evaluation.batches, keep_per_sample=True)
            final.update(loss=scores.loss, perplexity=scores.perplexity, accuracy=scores.accuracy)
            windows = self._windows(split)
            worst = evaluate.worst_passages(scores, windows, decode, WORST_PASSAGES)
            final["unigramPerplexity"] = evaluate.unigram_perplexity(
                self.paths.data, self.manifest, "train", split
            )
            if split != "validation" and self._has_samples("validation"):
                # The same comparison on the validation split, as training curves show it.
                validation = self._score("validation", self.spec.evaluation.batches)
                final["validationPerplexity"] = validation.perplexity
                final["validationUnigramPerplexity"] = evaluate.unigram_perplexity(
                    self.paths.data, self.manifest, "train", "validation"
                )
            final["bleu"], examples = self._bleu(split)
            final["bleuTask"] = "responses" if self.manifest.supervised else "continuation"
        final["tokensSeen"] = self.state.consumed_samples * self.spec.model.context_length
        if self.rank == 0:
            report = FinalReport.model_validate(final)
            report = outputs.write(
                outputs.Finished(
                    self.run,
                    self.paths.data,
                    self.paths.checkpoints,
                    self.paths.output,
                    self.manifest,
                    self.model_config,
                    self.state,
                    pretrained=self.paths.pretrained if self.transformers else None,
                    transformers=self.transformers,
                    description=self.model_description(),
                    parameters=self.engine.module.num_parameters(),
                ),
                report,
                worst,
                examples,
                self._benchmark if self.spec.evaluation.benchmarks else None,
            )
            final["benchmarks"] = [b.to_dict() for b in report.benchmarks or []] or None
            write_termination_message(trainer_report(self.state, report).to_dict())
        dist.barrier()
        return final

    def _windows(self, split: str) -> Samples:
        """The samples of a split: the training samples (the other folds under
        cross-validation), the held-out fold, or a split of the Dataset."""
        if split == "train":
            return self.train_windows
        if split == self.validation_split and self.held_out is not None:
            return self.held_out
        return Windows(self.paths.data, self.manifest, split, self.spec.model.context_length)

    def _has_samples(self, split: str) -> bool:
        if split == self.validation_split and self.held_out is not None:
            return len(self.held_out) > 0
        if split not in self.manifest.splits:
            return False
        return len(self._windows(split)) > 0

    # -- reporting ------------------------------------------------------------------------

    def _report(self, phase: TrainingPhase) -> None:
        record = progress_record(self.state, phase, self.total_steps, self.order.num_samples)
        self.reporter.report(record)

    def _info(self, message: str) -> None:
        if self.rank == 0:
            print(f"llmops_trainer: {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmops_trainer.train")
    parser.add_argument("--config", required=True, type=Path, help="TrainingRun as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    run = TrainingRun.model_validate_json(args.config.read_text())
    Stop.install()
    trainer = Trainer(run, Paths.from_env(run.spec))
    stage = "setup"
    try:
        trainer.setup()
        stage = "training"
        reason = trainer.train()
        if reason == "Interrupted":
            trainer._report("Interrupted")
            return EXIT_PREEMPTED
        stage = "finish"
        trainer.finish(reason)
        trainer._report("Completed")
        return 0
    except BaseException as error:
        trainer._report("Failed")
        permanent = PERMANENT_AT.get(stage)
        if permanent is not None and isinstance(error, Exception) and not node_fault(error):
            write_failure(TRAINER_STAGE, permanent, f"{type(error).__name__}: {error}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
