"""What a finished run leaves behind (rank 0, after the final evaluation): the exported
model, eval_report.json and the model card. Kept apart from the training loop."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.api.trainingrun import TrainingRun
from llmops.api.workload import (
    ADAPTER_SUBDIR,
    EVALUATION_REPORT_FILE,
    FINAL_MODEL_SUBDIR,
    MODEL_CARD_FILE,
    BenchmarkResult,
    EvaluationReport,
    FinalReport,
)
from llmops_trainer import checkpoint, hf_export, hf_models, model_card
from llmops_trainer.benchmarks import ModelFolders
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
    # A transformers model (open-weights or llama): exported with save_pretrained.
    transformers: bool = False
    pretrained: Path | None = None
    description: dict[str, Any] | None = None
    parameters: int | None = None


# Scores the exported model on spec.evaluation.benchmarks (llmops_trainer.benchmarks.run).
Benchmarker = Callable[[ModelFolders], list[BenchmarkResult]]


def write(
    done: Finished,
    final: FinalReport,
    worst: list[dict[str, Any]],
    examples: list[dict[str, str]],
    benchmark: Benchmarker | None = None,
) -> FinalReport:
    """Export, benchmark (on the exported model), then eval_report.json and the model card;
    returns `final` with the benchmark scores."""
    latest = checkpoint.read_pointer(done.checkpoints, checkpoint.LATEST)
    assert latest is not None
    weights = consolidated_state_dict(done.checkpoints / latest)
    if done.transformers:
        folders = _export_transformers(done, weights)
    else:
        folders = [done.output / FINAL_MODEL_SUBDIR]
        _export(done, weights, folders[0])
    parameters = done.parameters or sum(
        t.numel() for k, t in weights.items() if k != "lm_head.weight"
    )
    del weights  # the benchmarks load the exported model
    results: list[BenchmarkResult] = []
    if benchmark is not None:
        results = benchmark(_model_folders(done, folders))
        final = final.model_copy(update={"benchmarks": [r.score for r in results]})
    report = EvaluationReport(
        final=final,
        worst_passages=worst,
        generation_examples=examples,
        benchmarks=results,
        best_checkpoint=done.state.best_checkpoint,
        latest_checkpoint=latest,
    )
    (done.output / EVALUATION_REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    spec = done.run.spec
    card = model_card.render(
        done.run.metadata.name or "model",
        spec.to_dict(),
        {
            "name": spec.dataset_ref.name,
            "fingerprint": done.manifest.fingerprint,
            "vocab_size": done.manifest.vocab_size,
            "supervised": done.manifest.supervised,
            "mixed": done.manifest.mixed,
        },
        {**(done.description or done.model_config.to_dict()), "parameters": parameters},
        done.state.history,
        {k: v for k, v in final.to_dict().items() if k != "benchmarks"},
        worst,
        examples,
        [r.to_dict() for r in results],
    )
    (done.output / MODEL_CARD_FILE).write_text(card)
    for folder in folders:
        (folder / "README.md").write_text(card)
    return final


def _model_folders(done: Finished, folders: list[Path]) -> ModelFolders:
    """What lm-eval loads: the exported model, or the base model and the adapter when a
    LoRA run kept the adapter alone."""
    full = [f for f in folders if f.name == FINAL_MODEL_SUBDIR]
    if full:
        # The built-in GPT's tokenizer (the Dataset's) has no special tokens configured.
        prefix = None if done.transformers else done.manifest.eos_token_id
        if (
            not (full[0] / "tokenizer.json").is_file()
            and not (full[0] / "tokenizer_config.json").is_file()
        ):
            raise ValueError("benchmarks need a tokenizer: the exported model has none")
        return ModelFolders(full[0], prefix_token_id=prefix)
    assert done.pretrained is not None, "an adapter-only export has a pretrained base"
    return ModelFolders(done.pretrained, adapter=folders[0])


def _export_transformers(done: Finished, weights: dict[str, Any]) -> list[Path]:
    spec = done.run.spec
    folders = hf_models.export(
        spec.model,
        spec.adapter,
        done.pretrained,
        done.manifest.vocab_size,
        weights,
        done.output,
        FINAL_MODEL_SUBDIR,
        ADAPTER_SUBDIR,
        # The model's own tokenizer files; a llama trained from scratch has the Dataset's.
        [p for p in (done.pretrained, done.data) if p is not None],
    )
    for folder in folders:
        if not (folder / "tokenizer_config.json").is_file():
            hf_export.write_tokenizer_config(folder, spec.model.context_length)
    return folders


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
