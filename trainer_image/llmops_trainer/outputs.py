"""What a finished run leaves behind (rank 0, after the final evaluation): the exported
model, eval_report.json and the model card. Kept apart from the training loop."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.api.trainingrun import TrainingRun
from llmops.api.workload import (
    EVALUATION_REPORT_FILE,
    FINAL_MODEL_SUBDIR,
    MODEL_CARD_FILE,
    EvaluationReport,
    FinalReport,
)
from llmops_trainer import checkpoint, hf_export, model_card
from llmops_trainer.model import GPTConfig
from llmops_trainer.progress import ProgressState
from llmops_trainer.shards import Manifest
from llmops_trainer.weights import consolidated_state_dict


@dataclass(frozen=True)
class Finished:
    run: TrainingRun
    data: Path
    checkpoints: Path
    output: Path
    manifest: Manifest
    model_config: GPTConfig
    state: ProgressState


def write(
    done: Finished,
    final: FinalReport,
    worst: list[dict[str, Any]],
    examples: list[dict[str, str]],
) -> None:
    latest = checkpoint.read_pointer(done.checkpoints, checkpoint.LATEST)
    assert latest is not None
    weights = consolidated_state_dict(done.checkpoints / latest)
    model_dir = done.output / FINAL_MODEL_SUBDIR
    _export(done, weights, model_dir)
    report = EvaluationReport(
        final=final,
        worst_passages=worst,
        generation_examples=examples,
        best_checkpoint=done.state.best_checkpoint,
        latest_checkpoint=latest,
    )
    (done.output / EVALUATION_REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    parameters = sum(t.numel() for k, t in weights.items() if k != "lm_head.weight")
    spec = done.run.spec
    card = model_card.render(
        done.run.metadata.name or "model",
        spec.to_dict(),
        {
            "name": spec.dataset_ref.name,
            "fingerprint": done.manifest.fingerprint,
            "vocab_size": done.manifest.vocab_size,
            "supervised": done.manifest.supervised,
        },
        {**done.model_config.to_dict(), "parameters": parameters},
        done.state.history,
        final.to_dict(),
        worst,
        examples,
    )
    (done.output / MODEL_CARD_FILE).write_text(card)
    (model_dir / "README.md").write_text(card)


def _export(done: Finished, weights: dict[str, Any], model_dir: Path) -> None:
    tokenizer = done.data / done.manifest.tokenizer
    if done.model_config.causal:
        hf_export.export(
            weights, done.model_config, done.manifest.eos_token_id, model_dir, tokenizer
        )
    else:  # an encoder has no GPT-2 equivalent; keep our own layout
        from safetensors.torch import save_file

        model_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v for k, v in weights.items() if k != "lm_head.weight"}
        save_file(tensors, str(model_dir / "model.safetensors"))
    (model_dir / "llmops_model.json").write_text(json.dumps(done.model_config.to_dict(), indent=2))
