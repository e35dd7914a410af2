"""Semi-supervised training: one run on a Dataset mixing plain text and supervised records
learns both, and reports the two losses (training steps, validation, progress, model card);
objective sft on plain text alone is refused at start, naming the field."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from helpers import EOS, VOCAB, Job, training_run

from llmops_trainer.shards import Manifest, ShardWriter, write_manifest


def make_mixed_dataset(root: Path, seed: int = 0) -> Path:
    """Half plain documents (arithmetic progressions), half supervised pairs whose response
    repeats the prompt shifted by one, in supervised shards (plain text marked 2)."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, documents in (("train", 300), ("validation", 40), ("test", 40)):
        writer = ShardWriter(root, split, "uint16", EOS, tokens_per_shard=2048, supervised=True)
        for number in range(documents):
            start, stride = int(rng.integers(1, VOCAB)), int(rng.integers(1, 4))
            length = int(rng.integers(12, 30))
            tokens = [1 + (start + stride * i) % (VOCAB - 1) for i in range(length)]
            if number % 2:
                response = [1 + t % (VOCAB - 1) for t in tokens]
                writer.add(tokens + response, [0] * len(tokens) + [1] * len(response))
            else:
                writer.add_text(tokens)
        splits[split] = writer.close()
    manifest = Manifest("mixed", "uint16", VOCAB, EOS, supervised=True, mixed=True, splits=splits)
    write_manifest(root, manifest)
    return root


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_a_mixed_dataset_trains_both_objectives_and_reports_both_losses(
    tmp_path: Path, job: Callable[..., Job]
) -> None:
    data = make_mixed_dataset(tmp_path / "mixed")
    run = job(
        training_run(
            model={"objective": "sft"},
            hyperparameters={"maxSteps": 30},
            checkpointing={"intervalSteps": 30, "keepLast": 1},
            evaluation={"intervalSteps": 10, "batches": 2, "metrics": ["perplexity", "bleu"]},
        ),
        data=data,
    )
    assert run.run() == 0, run.log.read_text()[-4000:]
    steps = [m for m in run.metrics() if "trainLoss" in m]
    assert len(steps) == 30
    for kind in ("trainLossText", "trainLossSupervised"):
        values = [m[kind] for m in steps]
        assert all(math.isfinite(v) for v in values), (kind, values)
        first, last = _mean(values[:5]), _mean(values[-5:])
        assert last < 0.8 * first, (kind, values)  # about 0.6 here
    evaluations = [m for m in run.metrics() if "valLoss" in m]
    assert evaluations and all(
        math.isfinite(m["valLossText"]) and math.isfinite(m["valLossSupervised"])
        for m in evaluations
    )
    assert evaluations[-1]["valLossSupervised"] < evaluations[0]["valLossSupervised"]
    assert evaluations[-1]["valLossText"] < evaluations[0]["valLossText"]
    progress = json.loads((run.output / "progress.json").read_text())
    assert progress["trainLossText"] == steps[-1]["trainLossText"]
    assert progress["validation"]["lossSupervised"] == evaluations[-1]["valLossSupervised"]
    log = run.log.read_text()
    assert '"trainLossSupervised"' in log  # the LLMOPS_PROGRESS line
    card = (run.output / "model_card.md").read_text()
    assert "mixed with plain text" in card and "Training loss on plain text tokens" in card


def test_sft_on_plain_text_only_is_refused_at_start(
    tmp_path: Path, job: Callable[..., Job]
) -> None:
    run = job(
        training_run(
            model={"objective": "sft"},
            resources={"numNodes": 1, "procsPerNode": 1},
            hyperparameters={"maxSteps": 4},
        )
    )
    termination = tmp_path / "termination-log"
    run.env["LLMOPS_TERMINATION_LOG"] = str(termination)
    assert run.run() != 0
    report = json.loads(termination.read_text())
    assert report["reason"] == "InvalidTrainingSetup"
    assert "spec.model.objective sft" in report["message"]
