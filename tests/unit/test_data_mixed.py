"""Semi-supervised Datasets: plain-text and supervised sources in one Dataset, source weights,
the mixed shard format (mask 2 on plain text) and the two losses it lets the trainer report.
Old shards (masks of 0 and 1 only, or no masks) keep reading as before."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from llmops.api.dataset import Dataset, DatasetSpec
from llmops.api.trainingrun import TrainingRunStatus
from llmops.api.workload import MetricsEntry, TrainingProgress, ValidationScores
from llmops.decide.trainingrun import apply_progress
from llmops_trainer.batches import Objective, Windows, make_batch, text_targets
from llmops_trainer.data import run_local
from llmops_trainer.data.chat import ChatEncoder, Message
from llmops_trainer.data.tokenize import encode, load_model
from llmops_trainer.data.tokenize_stage import weighted_copies
from llmops_trainer.model import IGNORE_INDEX, kind_means, loss_by_kind
from llmops_trainer.progress import ProgressState, progress_record
from llmops_trainer.shards import (
    MASK_RESPONSE,
    MASK_TEXT,
    Manifest,
    ShardWriter,
    open_mask,
    open_tokens,
    read_manifest,
    write_manifest,
)

ROOT = Path(__file__).resolve().parents[2]
TEXT = "the river runs under the old stone bridge"
CHAT: list[Message] = [
    ("user", "what is under the bridge?"),
    ("assistant", "the river is under the bridge."),
]


def _spec(sources: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"sources": sources, "tokenizer": {"byte": {}}, **extra}


# -- the API rule ---------------------------------------------------------------------------


def test_a_dataset_may_mix_plain_text_and_supervised_sources() -> None:
    spec = DatasetSpec.model_validate(
        _spec(
            [
                {"name": "web", "path": "/data/web"},
                {
                    "name": "pairs",
                    "path": "/data/pairs.jsonl",
                    "format": "jsonl",
                    "promptField": "q",
                    "responseField": "a",
                    "weight": 0.5,
                },
            ]
        )
    )
    assert [s.supervised for s in spec.sources] == [False, True]
    assert spec.sources[1].weight == 0.5
    # The CRD no longer carries the refusal either.
    crd = (ROOT / "crds" / "llmops.dev_datasets.yaml").read_text()
    assert "must be all supervised" not in crd
    schema = yaml.safe_load(crd)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    weight = schema["properties"]["spec"]["properties"]["sources"]["items"]["properties"]["weight"]
    assert "floor(weight)" in weight["description"]


def test_the_other_source_rules_still_hold_in_a_mixed_dataset() -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.fromModel"):
        DatasetSpec.model_validate(
            _spec(
                [
                    {"name": "web", "path": "/data/web"},
                    {"name": "chats", "path": "/c.jsonl", "format": "jsonl", "messagesField": "m"},
                ]
            )
        )
    with pytest.raises(ValueError, match="weight"):
        DatasetSpec.model_validate(_spec([{"name": "web", "path": "/w", "weight": 0}]))


# -- weights ---------------------------------------------------------------------------------


def _heads(count: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**63, count, dtype=np.uint64)


@pytest.mark.parametrize("weight", [1.0, 2.0, 3.0])
def test_a_whole_weight_repeats_every_document_that_often(weight: float) -> None:
    assert (weighted_copies(weight, _heads(1000)) == int(weight)).all()


@pytest.mark.parametrize("weight", [0.3, 0.5, 1.25, 2.5])
def test_a_fractional_weight_adds_a_copy_to_that_share_of_documents(weight: float) -> None:
    heads = _heads(20000)
    copies = weighted_copies(weight, heads)
    assert set(np.unique(copies).tolist()) <= {int(weight), int(weight) + 1}
    # The mean is the weight (binomial: within 4 standard deviations).
    frac = weight - int(weight)
    assert abs(copies.mean() - weight) < 4 * math.sqrt(frac * (1 - frac) / len(heads))
    # Deterministic: a function of the content hash only (reruns, reorderings agree).
    assert (weighted_copies(weight, heads[::-1])[::-1] == copies).all()
    # Nested: a document kept at a lower weight is kept at every higher one.
    assert (weighted_copies(weight + 0.1, heads) >= copies).all()


# -- shards -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures.tiny_llama import build

    return build(tmp_path_factory.mktemp("tiny-llama"))


def test_mixed_shards_mark_plain_text_2_and_responses_1_token_by_token(
    tmp_path: Path, model: Path
) -> None:
    (tmp_path / "web.txt").write_text(TEXT + "\n")
    (tmp_path / "chats.jsonl").write_text(
        json.dumps({"messages": [{"role": r, "content": c} for r, c in CHAT]}) + "\n"
    )
    dataset = Dataset.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "mixed"},
            "spec": {
                "sources": [
                    {"name": "web", "path": str(tmp_path / "web.txt"), "weight": 2.0},
                    {
                        "name": "chats",
                        "path": str(tmp_path / "chats.jsonl"),
                        "format": "jsonl",
                        "messagesField": "messages",
                    },
                ],
                "processing": {
                    "filters": {"minWords": 1, "quality": False, "repetition": False},
                    "deduplication": {"near": {"enabled": False}},
                },
                "tokenizer": {"fromModel": {"uri": str(model)}},
                "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
            },
        }
    )
    output = tmp_path / "out"
    manifest = run_local(dataset, output, 1)
    assert manifest.supervised and manifest.mixed
    assert read_manifest(output).mixed
    loaded = load_model(model)
    eos = loaded.eos_id
    text_ids = encode(loaded.tokenizer, [TEXT])[0].tolist()
    chat_ids, chat_mask = ChatEncoder(loaded.folder, loaded.tokenizer, eos).encode([CHAT])[0]
    # In stream order: the plain document twice (weight 2), then the chat.
    expected_ids = [*text_ids, eos] * 2 + [*chat_ids.tolist(), eos]
    expected_mask = [MASK_TEXT] * (len(text_ids) + 1) * 2 + [*chat_mask.tolist(), MASK_RESPONSE]
    (shard,) = manifest.splits["train"].shards
    assert np.asarray(open_tokens(output, manifest, shard)).tolist() == expected_ids
    mask = open_mask(output, shard)
    assert mask is not None and np.asarray(mask).tolist() == expected_mask
    assert 0 in chat_mask.tolist() and 1 in chat_mask.tolist()  # the user turn is not learned
    sources = manifest.stats["sources"]
    assert sources["web"] == {
        "documents": 1,
        "trainDocuments": 2,
        "tokens": 2 * (len(text_ids) + 1),
        "weight": 2.0,
        "kind": "text",
    }
    assert sources["chats"]["kind"] == "supervised" and sources["chats"]["trainDocuments"] == 1
    card = (output / "README.md").read_text()
    assert "training copies" in card and "Plain text and supervised records are mixed" in card


def test_plain_text_in_supervised_shards_is_all_text_including_its_eos(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "train", "uint16", 0, 1024, supervised=True)
    writer.add_text([5, 6, 7])
    writer.add([8, 9], [0, 1])
    info = writer.close()
    mask = open_mask(tmp_path, info.shards[0])
    assert mask is not None and mask.tolist() == [2, 2, 2, 2, 0, 1, 1]
    plain = ShardWriter(tmp_path, "plain", "uint16", 0, 1024)
    plain.add_text([5, 6, 7])  # without masks: the same as add
    assert plain.close().shards[0].mask is None


# -- reading: batches, both losses, old shards -------------------------------------------------


def _dataset(root: Path, documents: list[tuple[list[int], list[int] | None]], mixed: bool) -> Path:
    supervised = any(mask is not None for _, mask in documents)
    writer = ShardWriter(root, "train", "uint16", 0, 1 << 20, supervised=supervised)
    for tokens, mask in documents:
        if mask is None:
            writer.add_text(tokens)
        else:
            writer.add(tokens, mask)
    split = writer.close()
    manifest = Manifest("f", "uint16", 64, 0, supervised=supervised, splits={"train": split})
    manifest.mixed = mixed
    write_manifest(root, manifest)
    return root


def test_sft_on_mixed_windows_learns_text_and_responses_and_tells_them_apart(
    tmp_path: Path,
) -> None:
    # Tokens: text 3 4 5 <eos>, prompt 6 7, response 8 9 <eos>; one window of 8 targets.
    root = _dataset(tmp_path, [([3, 4, 5], None), ([6, 7, 8, 9], [0, 0, 1, 1])], mixed=True)
    manifest = read_manifest(root)
    windows = Windows(root, manifest, "train", 8)
    _, labels = make_batch(windows, [0], Objective("sft", 64, 0))
    # Targets 4 5 0 | 6 7 8 9 0: the prompt (6, 7) is not learned, everything else is.
    assert labels[0].tolist() == [4, 5, 0, IGNORE_INDEX, IGNORE_INDEX, 8, 9, 0]
    text = text_targets(windows, [0], Objective("sft", 64, 0))
    assert text[0].tolist() == [True, True, True, False, False, False, False, False]
    # Causal-lm on the same data learns every token; the prompt counts as supervised.
    _, causal = make_batch(windows, [0], Objective("causal-lm", 64, 0))
    assert (causal != IGNORE_INDEX).all()


def test_loss_by_kind_splits_the_token_mean() -> None:
    logits = torch.randn(1, 8, 16)
    labels = torch.tensor([[4, 5, 0, IGNORE_INDEX, IGNORE_INDEX, 8, 9, 0]])
    text = torch.tensor([[True, True, True, False, False, False, False, False]])
    sums = loss_by_kind(logits, labels, text)
    losses = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")
    text_loss, supervised_loss = kind_means(sums)
    assert text_loss == pytest.approx(losses[:3].mean().item(), rel=1e-5)
    assert supervised_loss == pytest.approx(losses[5:].mean().item(), rel=1e-5)
    assert sums[1].item() == 3 and sums[3].item() == 3
    assert kind_means(torch.zeros(4, dtype=torch.float64)) == (None, None)


def test_old_supervised_and_plain_shards_read_as_before(tmp_path: Path) -> None:
    pair = ([6, 7, 8, 9, 3, 4, 5, 6, 7], [0, 0] + [1] * 7)
    supervised = _dataset(tmp_path / "sft", [pair], False)
    # Unmixed manifests are written as before `mixed` existed (older trainers read them), and
    # a key a newer writer adds is ignored.
    path = supervised / "manifest.json"
    data = json.loads(path.read_text())
    assert "mixed" not in data
    path.write_text(json.dumps({**data, "somethingNewer": 1}))
    manifest = read_manifest(supervised)
    assert manifest.supervised and not manifest.mixed
    windows = Windows(supervised, manifest, "train", 8)
    _, labels = make_batch(windows, [0], Objective("sft", 64, 0))
    assert labels[0].tolist()[:2] == [IGNORE_INDEX, 8]
    assert not text_targets(windows, [0], Objective("sft", 64, 0)).any()
    plain = _dataset(tmp_path / "plain", [(list(range(1, 12)), None)], False)
    windows = Windows(plain, read_manifest(plain), "train", 8)
    assert open_mask(plain, read_manifest(plain).splits["train"].shards[0]) is None
    assert text_targets(windows, [0], Objective("causal-lm", 64, 0)).all()


# -- reporting ---------------------------------------------------------------------------------


def test_both_losses_reach_the_progress_record_and_the_status() -> None:
    state = ProgressState()
    entry = MetricsEntry(step=3, train_loss=2.0, train_loss_text=2.5, train_loss_supervised=1.5)
    state.history.append(entry.to_dict())
    assert {"trainLossText": 2.5, "trainLossSupervised": 1.5}.items() <= entry.to_dict().items()
    state.validation = ValidationScores(loss=2.2, loss_text=2.6, loss_supervised=1.6)
    record = progress_record(state, "Training", 10, 100)
    assert (record.train_loss_text, record.train_loss_supervised) == (2.5, 1.5)
    again = TrainingProgress.model_validate_json(record.to_json())
    status = TrainingRunStatus()
    apply_progress(status, again, "pvc://c/p", datetime.datetime.now(datetime.UTC))
    assert status.metrics is not None
    metrics = status.metrics.to_dict()
    assert metrics["trainLossText"] == 2.5 and metrics["trainLossSupervised"] == 1.5
    assert metrics["validationLossText"] == 2.6 and metrics["validationLossSupervised"] == 1.6
