"""Splits: by hash (the default) or by position in the stream (contiguous), and sources held
out whole (sources[].split), with the admission rules for their combinations."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from data_corpus import document
from pydantic import ValidationError
from tokenizers import Tokenizer

from llmops.api.dataset import Dataset, DatasetSpec
from llmops_trainer.data import run_local
from llmops_trainer.data.prepare_stage import _contiguous_split
from llmops_trainer.shards import Manifest, open_tokens


def _dataset(sources: list[dict[str, Any]], **spec: Any) -> Dataset:
    return Dataset.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "t"},
            # Bytes as tokens: the shards decode back to the documents exactly; every
            # synthetic document is kept (some have too few stop words for the default).
            "spec": {
                "sources": sources,
                "tokenizer": {"byte": {}},
                "processing": {"filters": {"minStopWords": 0}},
                **spec,
            },
        }
    )


def _decoded(output: Path, manifest: Manifest, split: str) -> list[str]:
    """The documents of a split, in shard order, decoded with the dataset's tokenizer."""
    shards = manifest.splits[split].shards
    if not shards:
        return []
    tokenizer = Tokenizer.from_file(str(output / manifest.tokenizer))
    ids = np.concatenate([open_tokens(output, manifest, shard) for shard in shards])
    ends = np.flatnonzero(ids == manifest.eos_token_id)
    starts = [0, *(ends[:-1] + 1).tolist()]
    return [tokenizer.decode(ids[a:b].tolist()) for a, b in zip(starts, ends.tolist(), strict=True)]


def _write(folder: Path, name: str, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Path, list[str]]:
    """Three files of distinct documents; the stream order is file order, then position."""
    rng = random.Random(5)
    docs = [document(rng, 8) for _ in range(30)]
    for i in range(3):
        _write(tmp_path / "in", f"part{i}.txt", docs[10 * i : 10 * i + 10])
    return tmp_path / "in", docs


def test_contiguous_split_cuts_the_stream_in_order_for_any_slice_count(
    parts: tuple[Path, list[str]], tmp_path: Path
) -> None:
    folder, docs = parts
    dataset = _dataset(
        [{"name": "s", "path": str(folder)}],
        split={"mode": "contiguous", "train": 0.8, "validation": 0.1, "test": 0.1},
    )
    one = run_local(dataset, tmp_path / "one", 1)
    three = run_local(dataset, tmp_path / "three", 3)
    assert one.stats["documents"] == 30
    assert one.fingerprint == three.fingerprint and one.splits == three.splits
    for output, manifest in ((tmp_path / "one", one), (tmp_path / "three", three)):
        assert _decoded(output, manifest, "train") == docs[:24]
        assert _decoded(output, manifest, "validation") == docs[24:27]
        assert _decoded(output, manifest, "test") == docs[27:]


def test_hash_split_is_the_default_and_mixes_the_stream(
    parts: tuple[Path, list[str]], tmp_path: Path
) -> None:
    folder, docs = parts
    split = {"train": 0.6, "validation": 0.2, "test": 0.2}
    hashed = _dataset([{"name": "s", "path": str(folder)}], split=split)
    assert hashed.spec.split.mode == "hash"
    manifest = run_local(hashed, tmp_path / "h", 1)
    train = _decoded(tmp_path / "h", manifest, "train")
    held = _decoded(tmp_path / "h", manifest, "validation") + _decoded(
        tmp_path / "h", manifest, "test"
    )
    assert sorted(train + held) == sorted(docs)
    assert train != docs[: len(train)]  # not a prefix of the stream
    contiguous = _dataset(
        [{"name": "s", "path": str(folder)}], split={**split, "mode": "contiguous"}
    )
    assert run_local(contiguous, tmp_path / "c", 1).fingerprint != manifest.fingerprint


@pytest.mark.parametrize(
    ("count", "ratios", "sizes"),
    [
        (10, (0.8, 0.1, 0.1), [8, 1, 1]),
        (10, (0.9, 0.1, 0.0), [9, 1, 0]),
        (7, (0.5, 0.25, 0.25), [4, 1, 2]),  # round(3.5), round(5.25) - 4, the rest
        (3, (0.98, 0.01, 0.01), [1, 1, 1]),  # each split with a share gets a document
        (2, (0.98, 0.01, 0.01), [1, 1, 0]),  # ... while training keeps one
        (1, (0.98, 0.01, 0.01), [1, 0, 0]),
        (0, (0.98, 0.01, 0.01), [0, 0, 0]),
    ],
)
def test_contiguous_split_sizes(count: int, ratios: tuple[float, ...], sizes: list[int]) -> None:
    train, validation, test = ratios
    spec = DatasetSpec.model_validate(
        {
            "sources": [{"name": "s", "path": "x"}],
            "tokenizer": {"byte": {}},
            "split": {"mode": "contiguous", "train": train, "validation": validation, "test": test},
        }
    )
    out = _contiguous_split(count, spec)
    assert np.bincount(out, minlength=3).tolist() == sizes
    assert (np.diff(out) >= 0).all()  # train, then validation, then test


@pytest.mark.parametrize("mode", ["hash", "contiguous"])
def test_a_held_out_source_is_the_whole_test_split(tmp_path: Path, mode: str) -> None:
    rng = random.Random(8)
    main = [document(rng, 8) for _ in range(20)]
    held = [document(rng, 8) for _ in range(6)]
    dataset = _dataset(
        [
            {"name": "main", "path": str(_write(tmp_path / "in", "main.txt", main))},
            {
                "name": "held",
                "path": str(_write(tmp_path / "in", "held.txt", held)),
                "split": "test",
            },
        ],
        split={"mode": mode, "train": 0.9, "validation": 0.1, "test": 0},
    )
    manifest = run_local(dataset, tmp_path / "o", 3)
    output = tmp_path / "o"
    assert _decoded(output, manifest, "test") == held  # all of it, in source order
    train, validation = (
        _decoded(output, manifest, "train"),
        _decoded(output, manifest, "validation"),
    )
    assert sorted(train + validation) == sorted(main)
    assert len(validation) == 2
    assert manifest.stats["sources"]["held"]["documents"] == 6
    card = (output / "README.md").read_text()
    assert "whole sources: held to test" in card


def test_sources_can_be_pinned_to_train_and_validation(tmp_path: Path) -> None:
    rng = random.Random(4)
    docs = {name: [document(rng, 8) for _ in range(8)] for name in ("a", "b", "c")}
    dataset = _dataset(
        [
            {"name": "a", "path": str(_write(tmp_path, "a.txt", docs["a"])), "split": "train"},
            {"name": "b", "path": str(_write(tmp_path, "b.txt", docs["b"]))},
            {"name": "c", "path": str(_write(tmp_path, "c.txt", docs["c"])), "split": "validation"},
        ],
        split={"mode": "contiguous", "train": 0.75, "validation": 0, "test": 0.25},
    )
    manifest = run_local(dataset, tmp_path / "o", 2)
    output = tmp_path / "o"
    assert _decoded(output, manifest, "train") == docs["a"] + docs["b"][:6]
    assert _decoded(output, manifest, "validation") == docs["c"]
    assert _decoded(output, manifest, "test") == docs["b"][6:]


def _spec(sources: list[dict[str, Any]], **split: Any) -> dict[str, Any]:
    return {"sources": sources, "tokenizer": {"byte": {}}, "split": split}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            _spec([{"name": "a", "path": "a", "split": "test"}], train=1.0, validation=0, test=0),
            "sources: at least one source must feed the training split",
        ),
        (
            _spec(
                [{"name": "a", "path": "a"}, {"name": "b", "path": "b", "split": "test"}],
                train=0.9,
                validation=0.05,
                test=0.05,
            ),
            "split.test: a source held out as the test set",
        ),
        (
            _spec([{"name": "a", "path": "a"}, {"name": "b", "path": "b", "split": "validation"}]),
            "split.validation: a source held out as the validation set",
        ),
        (_spec([{"name": "a", "path": "a"}], mode="random"), "mode"),
        (_spec([{"name": "a", "path": "a", "split": "holdout"}]), "sources.0.split"),
    ],
)
def test_split_combinations_are_refused_naming_the_field(
    spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message.replace("[", r"\[")):
        DatasetSpec.model_validate(spec)


def test_valid_held_out_combinations() -> None:
    spec = DatasetSpec.model_validate(
        _spec(
            [
                {"name": "a", "path": "a"},
                {"name": "b", "path": "b", "split": "test"},
                {"name": "c", "path": "c", "split": "validation"},
            ],
            mode="contiguous",
            train=1.0,
            validation=0,
            test=0,
        )
    )
    assert [s.split for s in spec.sources] == [None, "test", "validation"]
    # Every source pinned: the ratios divide nothing, which is allowed.
    pinned = _spec(
        [{"name": "a", "path": "a", "split": "train"}, {"name": "b", "path": "b", "split": "test"}],
        train=0.99,
        validation=0.01,
        test=0,
    )
    assert DatasetSpec.model_validate(pinned).sources[0].split == "train"
