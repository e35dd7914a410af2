"""Numbers derived from a TrainingRun spec and the actual world size: batch split, total steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmops.api.trainingrun import TrainingRunSpec


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch_size: int
    accumulation: int  # micro-batches per optimizer step on each process

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world_size

    @property
    def per_rank(self) -> int:
        """Sequences one process consumes per optimizer step."""
        return self.micro_batch_size * self.accumulation


def batch_plan(spec: TrainingRunSpec, world_size: int) -> BatchPlan:
    """Split the global batch over `world_size` processes.

    `globalBatchSize`, when set, wins over `gradientAccumulationSteps`: it is the number that
    defines the optimization, so a run resumed on a different world size keeps it and only
    the accumulation changes.
    """
    hp = spec.hyperparameters
    micro = hp.micro_batch_size
    if hp.global_batch_size is not None:
        per_step = micro * world_size
        if hp.global_batch_size % per_step:
            raise ValueError(
                f"globalBatchSize {hp.global_batch_size} is not a multiple of "
                f"microBatchSize {micro} x world size {world_size}"
            )
        return BatchPlan(world_size, micro, hp.global_batch_size // per_step)
    return BatchPlan(world_size, micro, hp.gradient_accumulation_steps or 1)


def total_steps(spec: TrainingRunSpec, plan: BatchPlan) -> int:
    hp = spec.hyperparameters
    if hp.max_steps is not None:
        return hp.max_steps
    assert hp.max_tokens is not None  # the API guarantees exactly one of the two
    tokens_per_step = plan.global_batch_size * spec.model.context_length
    return max(1, math.ceil(hp.max_tokens / tokens_per_step))
