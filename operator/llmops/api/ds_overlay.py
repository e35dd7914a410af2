"""Keys of the raw DeepSpeed config overlay (TrainingRun spec.deepspeed.config) that belong
to typed fields.

The trainer acts on the typed fields, not on the merged config: zeroStage picks the checkpoint
layout on resume, the batch plan sets the data order and the step count, the learning-rate
schedule runs beside DeepSpeed's, status reports the precision asked for. An overlay that set
these keys would make the run do one thing and report another, so they are refused outright
(even with an equal value: one place to set each thing): at admission by CEL, in pydantic,
and again when the trainer merges the overlay. The generator's tuning choices (overlap_comm,
reduce_scatter, bucket sizes, Adam betas, loss scaling, ...) stay open to the overlay.

CEL cannot see fields a schema does not declare, so the overlay's schema declares exactly the
refused keys (and keeps every other key as free-form data).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

from pydantic import WithJsonSchema

from llmops.api.base import Rule

# Dotted key in the DeepSpeed config -> (the typed field that sets it, its JSON type).
OWNED: dict[str, tuple[str, str]] = {
    "train_batch_size": ("hyperparameters.globalBatchSize", "integer"),
    "train_micro_batch_size_per_gpu": ("hyperparameters.microBatchSize", "integer"),
    "gradient_accumulation_steps": ("hyperparameters.gradientAccumulationSteps", "integer"),
    "gradient_clipping": ("hyperparameters.gradientClipping", "number"),
    "optimizer.type": ("hyperparameters (AdamW)", "string"),
    "optimizer.params.lr": ("hyperparameters.learningRate", "number"),
    "optimizer.params.weight_decay": ("hyperparameters.weightDecay", "number"),
    "scheduler": ("hyperparameters.schedule, warmupSteps and minLearningRate", "object"),
    "zero_optimization.stage": ("deepspeed.zeroStage", "integer"),
    "zero_optimization.offload_optimizer.device": ("deepspeed.offloadOptimizer", "string"),
    "zero_optimization.offload_param.device": ("deepspeed.offloadParameters", "string"),
    "bf16.enabled": ("deepspeed.precision", "boolean"),
    "bfloat16.enabled": ("deepspeed.precision", "boolean"),  # DeepSpeed's alias of bf16
    "fp16.enabled": ("deepspeed.precision", "boolean"),
    "amp.enabled": ("deepspeed.precision", "boolean"),
}

DESCRIPTION = (
    "Raw DeepSpeed config merged over the generated one, for experts; keys here win. Keys that "
    "typed fields set are refused, even with an equal value: " + ", ".join(OWNED) + "."
)


def present(config: Mapping[str, Any] | None, key: str) -> bool:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def owned_keys(config: Mapping[str, Any] | None) -> list[str]:
    """The refused keys an overlay sets, dotted."""
    return [key for key in OWNED if present(config, key)]


def refusal(key: str) -> str:
    return f"set by {OWNED[key][0]}, not in the raw config"


def _cel(key: str) -> str:
    path = "self.config"
    terms = ["!has(self.config)"]
    for part in key.split("."):
        path += f".{part}"
        terms.append(f"!has({path})")
    return " || ".join(terms)


def _absent(key: str) -> Callable[[Any], bool]:
    return lambda s: not present(s.config, key)


RULES = tuple(
    Rule(cel=_cel(key), message=refusal(key), check=_absent(key), field_path=f".config.{key}")
    for key in OWNED
)


def _schema() -> dict[str, Any]:
    root: dict[str, Any] = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {},
    }
    for key, (owner, kind) in OWNED.items():
        node = root
        *sections, leaf = key.split(".")
        for section in sections:
            node = node["properties"].setdefault(
                section,
                {
                    "type": "object",
                    "description": f"DeepSpeed's `{section}` section.",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {},
                },
            )
        prop: dict[str, Any] = {"type": kind, "description": f"Refused: set by {owner}."}
        if kind == "object":
            prop["x-kubernetes-preserve-unknown-fields"] = True
        node["properties"][leaf] = prop
    return root


# The overlay: free-form, but with the refused keys declared so that CEL can check them.
Overlay = Annotated[dict[str, Any], WithJsonSchema(_schema())]
