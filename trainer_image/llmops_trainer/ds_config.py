"""The DeepSpeed config of a TrainingRun: generated from the spec, raw overlay applied last.

A pure function of the spec and the batch plan, so the operator can render the same config
into the job's ConfigMap and tests can check it without DeepSpeed installed.

Choices made for speed (benchmarks/train_throughput.py --nanogpt measures them):

- The optimizer is torch's AdamW with `fused=True` (one kernel over all tensors; on CPUs since
  torch 2.4), not its per-tensor loop, unless the optimizer state is offloaded (DeepSpeed's CPU
  Adam then) or the overlay asks for `foreach`.
- Without ZeRO in fp32 ("the plain path", `trainer_clips`) the trainer clips the gradients
  itself with torch's fused `clip_grad_norm_`, which also yields the norm it reports, so
  DeepSpeed's `gradient_clipping` (a Python loop over the parameters there) is 0 in the config.
  Everywhere else DeepSpeed's optimizer wrappers clip, on flat buffers, and report the norm.
- One CPU process runs ZeRO stage 0 whatever stage 1 or 2 the spec asks (`zero_stage`; a
  one-process checkpoint written with that stage is resumed with it, exactly), and CPU runs of
  stages 1 and 2 all-reduce uncopied gradients (no reduce-scatter, no contiguous buffer).
"""

from __future__ import annotations

import copy
from typing import Any

from llmops.api.ds_overlay import owned_keys, refusal
from llmops.api.trainingrun import TrainingRunSpec
from llmops_trainer.plan import BatchPlan, total_steps

# Keeps DeepSpeed's own periodic printing out of the way; the trainer reports progress itself.
_QUIET_STEPS = 1_000_000_000


Layout = tuple[int, int]
"""(world size, ZeRO stage) that wrote a checkpoint: its optimizer state loads only into the
same layout."""


def zero_stage(spec: TrainingRunSpec, plan: BatchPlan, resumes: Layout | None = None) -> int:
    """The ZeRO stage the engine runs. Stages 1 and 2 shard optimizer state (and gradients)
    over the processes; one process has nothing to shard, and on CPUs stage 0 does the same
    math without ZeRO's flat-buffer copies and collectives (about 1.2x the step rate of a
    small model). So a one-process CPU run of stage 1 or 2 runs stage 0, unless the optimizer
    state is offloaded, which needs ZeRO. Checkpoints record the stage that ran.

    `resumes`: the layout of the checkpoint the run resumes. One that this world size wrote
    with the configured stage (a one-process checkpoint from before this rule) keeps that
    stage, so its optimizer state loads exactly instead of the moments restarting. Any other
    layout loads as after a change of world size (consolidated weights, fresh moments)."""
    ds = spec.deepspeed
    if (
        plan.world_size == 1
        and ds.zero_stage in (1, 2)
        and ds.offload_optimizer == "none"
        and spec.resources.gpus_per_node == 0
        and resumes != (plan.world_size, ds.zero_stage)
    ):
        return 0
    return ds.zero_stage


def trainer_clips(spec: TrainingRunSpec, plan: BatchPlan, resumes: Layout | None = None) -> bool:
    """The plain path (no ZeRO, fp32): the trainer, not DeepSpeed, clips the gradients."""
    return zero_stage(spec, plan, resumes) == 0 and spec.deepspeed.precision == "fp32"


def deepspeed_config(
    spec: TrainingRunSpec, plan: BatchPlan, resumes: Layout | None = None
) -> dict[str, Any]:
    """The engine's config; `resumes` as for `zero_stage`."""
    hp = spec.hyperparameters
    ds = spec.deepspeed
    config: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": 0.0 if trainer_clips(spec, plan, resumes) else hp.gradient_clipping,
        "optimizer": _optimizer(spec),
        "zero_optimization": _zero(spec, zero_stage(spec, plan, resumes)),
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": _fp16(ds.precision == "fp16"),
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    scheduler = lr_scheduler(spec, plan)
    if scheduler is not None:
        config["scheduler"] = scheduler
    merged = merge(config, checked_overlay(ds.config))
    params = merged.get("optimizer", {}).get("params", {})
    if params.get("foreach") or not params.get("torch_adam"):
        params.pop("fused", None)  # torch refuses fused with foreach; DeepSpeed's Adams lack it
    return merged


def checked_overlay(overlay: dict[str, Any] | None) -> dict[str, Any]:
    """The raw overlay, refused if it sets a key a typed field owns: the trainer acts on the
    typed fields (resume layout, batch plan, schedule), so the two must not disagree. Parsing
    the spec refuses these already; this also covers a spec changed in code after parsing."""
    refused = owned_keys(overlay)
    if refused:
        raise ValueError("; ".join(f"deepspeed.config.{key}: {refusal(key)}" for key in refused))
    return overlay or {}


def _optimizer(spec: TrainingRunSpec) -> dict[str, Any]:
    hp = spec.hyperparameters
    params: dict[str, Any] = {
        "lr": hp.learning_rate,
        "betas": [hp.adam_beta1, hp.adam_beta2],
        "eps": hp.adam_epsilon,
        "weight_decay": hp.weight_decay,
    }
    if spec.deepspeed.offload_optimizer == "none":
        # torch's AdamW needs no compiled extension (DeepSpeed's FusedAdam is built at first
        # use, which needs a compiler the image does not ship), and its fused kernel runs on
        # CPUs and GPUs alike. Offload keeps DeepSpeed's CPU Adam, which is much faster there.
        params["torch_adam"] = True
        params["fused"] = True
    return {"type": "AdamW", "params": params}


def _zero(spec: TrainingRunSpec, stage: int) -> dict[str, Any]:
    ds = spec.deepspeed
    zero: dict[str, Any] = {"stage": stage}
    on_cpus = spec.resources.gpus_per_node == 0
    if stage >= 1:
        # Contiguous gradients avoid fragmenting GPU memory; on CPUs the extra copy into the
        # buffer only costs time (ZeRO-2 on 2 processes: about 1.06x the step rate without).
        zero.update(contiguous_gradients=not on_cpus, overlap_comm=False)
    if stage in (1, 2) and on_cpus:
        # On CPUs gloo's all-reduce of a bucket is faster than its reduce-scatter (about 1.4x
        # the step rate of ZeRO-2 on 2 processes, benchmarks/train_throughput.py).
        zero["reduce_scatter"] = False
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_parameters == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # Lets the final export gather a full 16-bit state dict on rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return zero


def _fp16(enabled: bool) -> dict[str, Any]:
    if not enabled:
        return {"enabled": False}
    # Dynamic loss scaling (loss_scale 0), starting at 2^16.
    return {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2}


def lr_scheduler(spec: TrainingRunSpec, plan: BatchPlan) -> dict[str, Any] | None:
    """DeepSpeed's scheduler for the spec's schedule; None for a linear decay to a non-zero
    floor, which DeepSpeed has no scheduler for (the trainer then runs `linear_lr` itself)."""
    hp = spec.hyperparameters
    steps = total_steps(spec, plan)
    # DeepSpeed's warmup lasts at least 2 steps; "no warmup" is a warmup from the peak.
    warmup = max(hp.warmup_steps, 1)
    warmup_min_ratio = 0.0 if hp.warmup_steps else 1.0
    if hp.schedule == "cosine":
        return {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": steps,
                "warmup_num_steps": warmup,
                "warmup_min_ratio": warmup_min_ratio,
                "cos_min_ratio": hp.min_learning_rate / hp.learning_rate,
                "warmup_type": "linear",
            },
        }
    if hp.schedule == "constant":
        return {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": hp.learning_rate * warmup_min_ratio,
                "warmup_max_lr": hp.learning_rate,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        }
    if hp.min_learning_rate == 0:
        return {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": steps,
                "warmup_min_lr": hp.learning_rate * warmup_min_ratio,
                "warmup_max_lr": hp.learning_rate,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        }
    return None


def linear_lr(spec: TrainingRunSpec, plan: BatchPlan, step: int) -> float:
    """Learning-rate factor (of the peak) at `step` for linear warmup then linear decay to
    minLearningRate: the schedule DeepSpeed lacks."""
    hp = spec.hyperparameters
    steps = total_steps(spec, plan)
    if step < hp.warmup_steps:
        return step / hp.warmup_steps
    floor = hp.min_learning_rate / hp.learning_rate
    progress = min(1.0, (step - hp.warmup_steps) / max(1, steps - hp.warmup_steps))
    return floor + (1.0 - floor) * (1.0 - progress)


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: nested objects merge key by key, anything else in `overlay` replaces."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
