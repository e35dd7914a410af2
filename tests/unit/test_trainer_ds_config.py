from __future__ import annotations

import re
from typing import Any

import pytest

from llmops.api.ds_overlay import OWNED
from llmops.api.trainingrun import TrainingRunSpec
from llmops_trainer.ds_config import deepspeed_config, linear_lr, merge
from llmops_trainer.plan import BatchPlan, batch_plan, total_steps


def spec(**overrides: Any) -> TrainingRunSpec:
    data: dict[str, Any] = {
        "datasetRef": {"name": "web"},
        "hyperparameters": {"maxSteps": 1000, "learningRate": 6e-4, "minLearningRate": 6e-5},
        "resources": {"numNodes": 2, "procsPerNode": 4, "gpusPerNode": 4},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    return TrainingRunSpec.model_validate(data)


def test_batch_sizes_follow_the_global_batch() -> None:
    s = spec(hyperparameters={"microBatchSize": 4, "globalBatchSize": 256})
    assert batch_plan(s, 8) == BatchPlan(8, 4, 8)
    # On half the processes the accumulation doubles; the optimization stays the same.
    assert batch_plan(s, 4).global_batch_size == 256
    assert batch_plan(s, 4).accumulation == 16
    with pytest.raises(ValueError, match="not a multiple"):
        batch_plan(s, 3)


def test_batch_sizes_from_accumulation_or_default() -> None:
    s = spec(hyperparameters={"microBatchSize": 2, "gradientAccumulationSteps": 3})
    assert batch_plan(s, 8).global_batch_size == 48
    assert batch_plan(spec(), 8).accumulation == 1


def test_total_steps_from_tokens() -> None:
    s = spec(
        hyperparameters={"maxSteps": None, "maxTokens": 1_000_000, "microBatchSize": 8},
        model={"contextLength": 256},
    )
    plan = batch_plan(s, 8)  # 64 sequences x 256 tokens = 16384 tokens per step
    assert total_steps(s, plan) == 62  # ceil(1e6 / 16384)


def test_generated_config_carries_the_spec() -> None:
    s = spec(
        hyperparameters={"microBatchSize": 4, "globalBatchSize": 64, "gradientClipping": 0.5},
        deepspeed={
            "zeroStage": 3,
            "offloadOptimizer": "cpu",
            "offloadParameters": "cpu",
            "precision": "bf16",
        },
    )
    config = deepspeed_config(s, batch_plan(s, 8))
    assert config["train_batch_size"] == 64
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    optimizer = config["optimizer"]
    assert optimizer["type"] == "AdamW" and optimizer["params"]["lr"] == 6e-4
    assert "torch_adam" not in optimizer["params"]  # offload uses DeepSpeed's CPU Adam


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_no_offload_below_stage_3(stage: int) -> None:
    config = deepspeed_config(spec(deepspeed={"zeroStage": stage}), BatchPlan(8, 8, 1))
    assert config["zero_optimization"]["stage"] == stage
    assert "offload_param" not in config["zero_optimization"]
    assert config["optimizer"]["params"]["torch_adam"] is True


def test_fp16_uses_dynamic_loss_scaling() -> None:
    config = deepspeed_config(spec(deepspeed={"precision": "fp16"}), BatchPlan(8, 8, 1))
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0
    assert not config["bf16"]["enabled"]


def test_warmup_and_cosine_schedule() -> None:
    s = spec(hyperparameters={"warmupSteps": 100})
    scheduler = deepspeed_config(s, BatchPlan(8, 8, 1))["scheduler"]
    assert scheduler["type"] == "WarmupCosineLR"
    assert scheduler["params"] == {
        "total_num_steps": 1000,
        "warmup_num_steps": 100,
        "warmup_min_ratio": 0.0,
        "cos_min_ratio": pytest.approx(0.1),
        "warmup_type": "linear",
    }


def test_schedules_without_warmup_start_at_the_peak() -> None:
    constant = spec(hyperparameters={"schedule": "constant"})
    params = deepspeed_config(constant, BatchPlan(8, 8, 1))["scheduler"]["params"]
    assert params["warmup_min_lr"] == params["warmup_max_lr"] == 6e-4


def test_linear_decay_to_a_floor_is_left_to_the_trainer() -> None:
    s = spec(hyperparameters={"schedule": "linear", "warmupSteps": 10})
    plan = BatchPlan(8, 8, 1)
    assert "scheduler" not in deepspeed_config(s, plan)
    assert linear_lr(s, plan, 0) == 0 and linear_lr(s, plan, 5) == 0.5
    assert linear_lr(s, plan, 10) == 1.0
    assert linear_lr(s, plan, 1000) == pytest.approx(0.1)
    to_zero = spec(hyperparameters={"schedule": "linear", "minLearningRate": 0})
    assert deepspeed_config(to_zero, plan)["scheduler"]["type"] == "WarmupDecayLR"


def test_raw_overlay_is_applied_last() -> None:
    s = spec(
        deepspeed={
            "zeroStage": 2,
            "config": {
                "zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 5e7},
                "optimizer": {"params": {"betas": [0.9, 0.99]}},
                "activation_checkpointing": {"partition_activations": True},
            },
        }
    )
    config = deepspeed_config(s, BatchPlan(8, 8, 1))
    assert config["zero_optimization"]["stage"] == 2  # kept
    assert config["zero_optimization"]["overlap_comm"] is True  # overridden
    assert config["zero_optimization"]["reduce_bucket_size"] == 5e7  # added
    assert config["optimizer"]["params"]["betas"] == [0.9, 0.99]
    assert config["optimizer"]["params"]["lr"] == 6e-4  # kept
    assert config["activation_checkpointing"] == {"partition_activations": True}


@pytest.mark.parametrize(
    ("overlay", "key"),
    [
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage"),  # equal is refused too
        ({"bf16": {"enabled": False}}, "bf16.enabled"),
        ({"fp16": {"enabled": True, "loss_scale": 128}}, "fp16.enabled"),
        ({"train_batch_size": 1024}, "train_batch_size"),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
        ({"gradient_clipping": 2.0}, "gradient_clipping"),
        ({"optimizer": {"type": "Lamb"}}, "optimizer.type"),
        ({"optimizer": {"params": {"lr": 1e-3}}}, "optimizer.params.lr"),
        ({"scheduler": {"type": "OneCycle"}}, "scheduler"),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "nvme"}}},
            "zero_optimization.offload_optimizer.device",
        ),
    ],
)
def test_overlay_keys_owned_by_typed_fields_are_refused(overlay: dict[str, Any], key: str) -> None:
    s = spec(deepspeed={"zeroStage": 2})
    s.deepspeed.config = overlay  # after parsing, which refuses these already
    with pytest.raises(ValueError, match=rf"deepspeed\.config\.{re.escape(key)}: set by"):
        deepspeed_config(s, BatchPlan(8, 8, 1))


def _leaves(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, dict) and name != "scheduler":
            out.update(_leaves(value, f"{prefix}{name}."))
        else:
            out[prefix + name] = value
    return out


# Generated keys that vary with the spec but only tune how DeepSpeed works, not what the run
# means; the overlay may change them.
TUNING = {
    "zero_optimization.contiguous_gradients",
    "zero_optimization.overlap_comm",
    "zero_optimization.reduce_scatter",
    "zero_optimization.offload_optimizer.pin_memory",
    "zero_optimization.offload_param.pin_memory",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save",
    "optimizer.params.torch_adam",
    "optimizer.params.fused",
    "fp16.loss_scale",
    "fp16.initial_scale_power",
    "fp16.hysteresis",
}


def test_every_key_derived_from_a_typed_field_is_owned_or_tuning() -> None:
    """Vary each typed field the generator reads: every config key that changes must be
    refused in the overlay or be a known tuning key, so a new derived key cannot slip by."""
    base = spec(hyperparameters={"microBatchSize": 4, "globalBatchSize": 64})
    variations = [
        {"hyperparameters": {"microBatchSize": 2, "globalBatchSize": 64}},
        {"hyperparameters": {"globalBatchSize": 128}},
        {"hyperparameters": {"gradientClipping": 0.5, "learningRate": 1e-3, "weightDecay": 0}},
        {"hyperparameters": {"schedule": "constant", "warmupSteps": 10}},
        {"hyperparameters": {"schedule": "linear"}},
        {"hyperparameters": {"maxSteps": 10}},
        {"deepspeed": {"zeroStage": 0}},
        {"deepspeed": {"zeroStage": 3, "offloadOptimizer": "cpu", "offloadParameters": "cpu"}},
        {"deepspeed": {"precision": "fp16"}},
        {"deepspeed": {"precision": "fp32"}},
        {"resources": {"gpusPerNode": 0}},
    ]
    before = _leaves(deepspeed_config(base, batch_plan(base, 8)))
    changed: set[str] = set()
    for overrides in variations:
        data = base.to_dict()
        for section, values in overrides.items():
            data[section] = {**data[section], **values}
        varied = TrainingRunSpec.model_validate(data)
        after = _leaves(deepspeed_config(varied, batch_plan(varied, 8)))
        changed |= {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert "zero_optimization.stage" in changed and "scheduler" in changed
    assert not changed - set(OWNED) - TUNING


def test_merge_does_not_mutate() -> None:
    base = {"a": {"b": 1}}
    assert merge(base, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}
    assert base == {"a": {"b": 1}}


def test_cpu_runs_all_reduce_instead_of_reduce_scatter() -> None:
    cpu = spec(deepspeed={"zeroStage": 2}, resources={"gpusPerNode": 0, "procsPerNode": 2})
    assert deepspeed_config(cpu, BatchPlan(4, 8, 1))["zero_optimization"]["reduce_scatter"] is False
    gpu = deepspeed_config(spec(deepspeed={"zeroStage": 2}), BatchPlan(8, 8, 1))
    assert "reduce_scatter" not in gpu["zero_optimization"]
