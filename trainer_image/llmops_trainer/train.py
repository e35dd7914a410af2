"""The training pods' entrypoint: one process per accelerator, started by `torchrun`.

    torchrun ... -m llmops_trainer.train --config /etc/llmops/trainingrun.json

The config is the TrainingRun object as JSON. Paths come from the environment:
LLMOPS_DATA_DIR (the prepared Dataset), LLMOPS_CHECKPOINT_DIR, LLMOPS_OUTPUT_DIR (final
model, model card, reports, progress.json) and optionally LLMOPS_INIT_CHECKPOINT (weights to
fine-tune from). The process resumes from the newest valid checkpoint it finds, saves every
`checkpointing.intervalSteps` steps and when it receives SIGTERM, and exits 143 after a
SIGTERM checkpoint so the controller can tell preemption from completion.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from llmops.api.trainingrun import TrainingRun, TrainingRunSpec
from llmops.api.workload import (
    METRICS_HISTORY_FILE,
    METRICS_PORT,
    TRAINER_STAGE,
    Env,
    FailureReport,
    FinalReport,
    TrainingPhase,
    ValidationScores,
)
from llmops_trainer import checkpoint, evaluate, hf_models, outputs
from llmops_trainer.batches import (
    Objective,
    SampleOrder,
    Windows,
    eval_indices,
    make_batch,
    rank_positions,
)
from llmops_trainer.ds_config import deepspeed_config, linear_lr
from llmops_trainer.model import GPT, GPTConfig, flops_per_token, lm_loss
from llmops_trainer.plan import BatchPlan, batch_plan, total_steps
from llmops_trainer.progress import ProgressState, Reporter, progress_record, trainer_report
from llmops_trainer.shards import Manifest, read_manifest
from llmops_trainer.termination import write_termination_message
from llmops_trainer.weights import consolidated_state_dict

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a killed process would have returned
# Errors a restart would meet again: the set-up (spec, data, model) and what follows training.
PERMANENT_AT = {"setup": "InvalidTrainingSetup", "finish": "FinalEvaluationFailed"}
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
    model.load_state_dict(state_dict, strict=True)


def _grad_norm(module: torch.nn.Module) -> float:
    """L2 norm of all gradients (already averaged over ranks at the accumulation boundary)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def peak_flops(device: torch.device) -> float | None:
    if Env.PEAK_FLOPS in os.environ:
        return float(os.environ[Env.PEAK_FLOPS])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


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
        backend = "gloo" if accelerator.device_name() == "cpu" else "nccl"
        deepspeed.init_distributed(dist_backend=backend)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if accelerator.device_name() == "cpu":
            self.device = torch.device("cpu")
        else:
            accelerator.set_device(local_rank)
            self.device = torch.device(accelerator.device_name(local_rank))
        self.reporter = Reporter(
            self.rank == 0, paths.output, int(os.environ.get(Env.METRICS_PORT, str(METRICS_PORT)))
        )
        self.log_interval = int(os.environ.get(Env.LOG_INTERVAL, "10"))
        self.sample_log = os.environ.get(Env.SAMPLE_LOG) == "1"

        self.manifest: Manifest = read_manifest(paths.data)
        hp = spec.hyperparameters
        self.objective = Objective(spec.model.objective, self.manifest.vocab_size, hp.seed)
        self.plan: BatchPlan = batch_plan(spec, self.world)
        self.total_steps = total_steps(spec, self.plan)
        self.ds_config = deepspeed_config(spec, self.plan)
        self.train_windows = Windows(paths.data, self.manifest, "train", spec.model.context_length)
        self.order = SampleOrder(len(self.train_windows), hp.seed)
        self.validates = self._has_samples("validation")
        self.model_config = GPTConfig(
            vocab_size=self.objective.model_vocab_size,
            context_length=spec.model.context_length,
            num_layers=spec.model.num_layers,
            num_heads=spec.model.num_heads,
            hidden_size=spec.model.hidden_size,
            dropout=spec.model.dropout,
            causal=spec.model.objective != "masked-lm",
        )
        # Models from transformers: an open-weights checkpoint or a llama built from the spec.
        self.transformers = spec.model.pretrained is not None or spec.model.architecture == "llama"
        self.shape: hf_models.Shape | None = None
        self.state = ProgressState()
        self.engine: Any = None
        # DeepSpeed reports the gradient norm except without ZeRO in fp32; then we compute it.
        self._plain_fp32 = spec.deepspeed.zero_stage == 0 and spec.deepspeed.precision == "fp32"
        self._grad_norm: float | None = None
        self._step_lr = 0.0

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

    def setup(self) -> None:
        import deepspeed

        resume = self._pick_checkpoint()
        torch.manual_seed(self.spec.hyperparameters.seed)
        model = self._build_model()
        exact = False
        if resume is not None:
            saved = checkpoint.read_state(resume)
            # DeepSpeed's sharded optimizer state only loads into the same layout; otherwise
            # continue from the consolidated fp32 weights with fresh optimizer moments.
            exact = (saved["worldSize"], saved["zeroStage"]) == (
                self.world,
                self.spec.deepspeed.zero_stage,
            )
            if not exact:
                load_weights(model, consolidated_state_dict(resume))
            self.state.restore(saved)
            self._info(
                f"resuming from {resume.name} at step {saved['step']}"
                + ("" if exact else f" (world size {saved['worldSize']} -> {self.world})")
            )
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
        # DeepSpeed's schedulers start before step 0; point them at the next step to take.
        if self.engine.lr_scheduler is not None and not exact:
            self.engine.lr_scheduler.step(self.state.step)
        self.engine.global_steps = self.state.step

    # -- the loop -------------------------------------------------------------------------

    def train(self) -> str:
        """Train until the planned step, early stopping or SIGTERM; returns why it stopped."""
        spec = self.spec
        plan = self.plan
        tokens_per_step = plan.global_batch_size * spec.model.context_length
        flops = self._flops_per_token()
        peak = peak_flops(self.device)
        window_start, window_steps = time.perf_counter(), 0
        last_saved = self.state.step
        self._report("Training")
        while self.state.step < self.total_steps:
            step = self.state.step
            if self.engine.lr_scheduler is None:
                factor = linear_lr(spec, plan, step)
                for group in self.engine.optimizer.param_groups:
                    group["lr"] = spec.hyperparameters.learning_rate * factor
            self._step_lr = self.engine.get_lr()[0]
            loss = self._step(step)
            # One collective agrees on the step's mean loss and on whether anyone got SIGTERM.
            agreed = torch.tensor([loss, float(Stop.requested)], dtype=torch.float64)
            dist.all_reduce(agreed)
            mean_loss, stop = agreed[0].item() / self.world, agreed[1].item() > 0
            self.state.step = step = step + 1
            self.state.consumed_samples += plan.global_batch_size
            window_steps += 1
            if step % self.log_interval == 0 or step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                tokens_per_second = window_steps * tokens_per_step / elapsed
                mfu = None if peak is None else tokens_per_second * flops / (peak * self.world)
                self._log_step(mean_loss, tokens_per_second, mfu, window_steps * tokens_per_step)
                window_start, window_steps = time.perf_counter(), 0
            stopped_early = False
            if step % spec.evaluation.interval_steps == 0 and self.validates:
                stopped_early = self._validate()
            if stop:
                self._save("SIGTERM")
                return "Interrupted"
            if step % spec.checkpointing.interval_steps == 0 or stopped_early:
                self._save("interval")
                last_saved = step
            if stopped_early:
                return "EarlyStopped"
        if last_saved != self.state.step:
            self._save("final")
        return "Completed"

    def _step(self, step: int) -> float:
        plan = self.plan
        positions = rank_positions(
            self.state.consumed_samples, plan.global_batch_size, self.world, self.rank
        )
        indices = [self.order.index(p) for p in positions]
        if self.sample_log:
            with (self.paths.output / f"samples-rank{self.rank}.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": step, "samples": indices}) + "\n")
        total = 0.0
        self.engine.train()
        for m in range(plan.accumulation):
            chunk = indices[m * plan.micro_batch_size : (m + 1) * plan.micro_batch_size]
            inputs, labels = make_batch(self.train_windows, chunk, self.objective)
            logits = self.engine(inputs.to(self.device))
            loss = lm_loss(logits, labels.to(self.device))
            self.engine.backward(loss)
            if m == plan.accumulation - 1 and self._plain_fp32:
                self._grad_norm = _grad_norm(self.engine.module)
            self.engine.step()
            total += loss.item()
        return total / plan.accumulation

    def _log_step(
        self, loss: float, tokens_per_second: float, mfu: float | None, tokens: int
    ) -> None:
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self._grad_norm
        entry = {
            "step": self.state.step,
            "trainLoss": loss,
            "learningRate": self._step_lr,
            "gradNorm": None if grad_norm is None else float(grad_norm),
            "tokensPerSecond": tokens_per_second,
            "mfu": mfu,
        }
        self.state.history.append(entry)
        if self.rank == 0:
            with (self.paths.output / METRICS_HISTORY_FILE).open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
            m = self.reporter.metrics
            m.tokens.inc(tokens)
            if self.device.type == "cuda":
                m.memory.set(torch.cuda.max_memory_allocated(self.device))
        self._report("Training")

    def _validate(self) -> bool:
        """Evaluate on the validation split; True when early stopping says stop."""
        spec = self.spec
        scores = self._score("validation", spec.evaluation.batches)
        bleu = self._bleu("validation")[0] if "bleu" in spec.evaluation.metrics else None
        self.state.validation = ValidationScores(
            loss=scores.loss, perplexity=scores.perplexity, accuracy=scores.accuracy, bleu=bleu
        )
        entry: dict[str, Any] = {
            "step": self.state.step,
            "valLoss": scores.loss,
            "perplexity": scores.perplexity,
            "accuracy": scores.accuracy,
        }
        if bleu is not None:
            entry["bleu"] = bleu
        self.state.history.append(entry)
        if self.rank == 0:
            with (self.paths.output / METRICS_HISTORY_FILE).open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
        self._report("Training")
        stopping = spec.evaluation.early_stopping
        if stopping is None:
            return False
        metric = {"loss": "valLoss"}.get(stopping.metric, stopping.metric)
        value = entry.get(metric)
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
        self, split: str, batches: int, keep_per_sample: bool = False
    ) -> evaluate.SplitScores:
        windows = Windows(self.paths.data, self.manifest, split, self.spec.model.context_length)
        count = batches * self.plan.micro_batch_size * self.world
        indices = eval_indices(
            len(windows), count, self.spec.hyperparameters.seed, self.world, self.rank
        )
        self.engine.eval()
        scores = evaluate.score_split(
            self.engine,
            windows,
            indices,
            self.objective,
            self.plan.micro_batch_size,
            self.device,
            keep_per_sample,
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
                    "zeroStage": self.spec.deepspeed.zero_stage,
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
        usable = [s for s in ("test", "validation") if self._has_samples(s)]
        split = usable[0] if usable else "none"
        final: dict[str, Any] = {"stopReason": reason, "steps": self.state.step, "split": split}
        worst: list[dict[str, Any]] = []
        examples: list[dict[str, str]] = []
        decode = evaluate.decoder(self.paths.data / self.manifest.tokenizer)
        if split in self.manifest.splits:
            scores = self._score(split, self.spec.evaluation.batches, keep_per_sample=True)
            final.update(loss=scores.loss, perplexity=scores.perplexity, accuracy=scores.accuracy)
            windows = Windows(self.paths.data, self.manifest, split, self.spec.model.context_length)
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
            outputs.write(
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
            )
            write_termination_message(trainer_report(self.state, report).to_dict())
        dist.barrier()
        return final

    def _has_samples(self, split: str) -> bool:
        if split not in self.manifest.splits:
            return False
        windows = Windows(self.paths.data, self.manifest, split, self.spec.model.context_length)
        return len(windows) > 0

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
        if permanent is not None and isinstance(error, Exception):
            report = FailureReport(
                stage=TRAINER_STAGE,
                reason=permanent,
                message=f"{type(error).__name__}: {error}"[:1000],
            )
            write_termination_message(report.to_dict())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
