"""k-fold cross-validation in the trainer: the folds are contiguous, deterministic and
disjoint blocks of the training split, and a fold run's sample stream never yields one of
its held-out samples."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llmops_trainer.batches import (  # noqa: E402
    SampleOrder,
    Windows,
    cross_validation_split,
    eval_indices,
    fold_bounds,
    rank_positions,
)
from llmops_trainer.shards import Manifest, ShardWriter, read_manifest, write_manifest  # noqa: E402


def windows(root: Path, documents: int = 23) -> Windows:
    """A training split of several shards (window counts differ per shard)."""
    writer = ShardWriter(root, "train", "uint16", 0, tokens_per_shard=20, supervised=True)
    for start in range(1, 4 * documents, 4):
        writer.add(list(range(start, start + 4)), [0, 0, 1, 1])
    split = writer.close()
    write_manifest(root, Manifest("f", "uint16", 128, 0, supervised=True, splits={"train": split}))
    return Windows(root, read_manifest(root), "train", context=4)


@pytest.mark.parametrize("num_samples", [2, 7, 20, 101])
@pytest.mark.parametrize("folds", [2, 3, 5, 20])
def test_the_held_out_folds_partition_the_samples(num_samples: int, folds: int) -> None:
    if num_samples < folds:
        return
    blocks = [fold_bounds(num_samples, folds, fold) for fold in range(folds)]
    covered = [i for block in blocks for i in block]
    assert covered == list(range(num_samples))  # contiguous, in order, each sample once
    sizes = [len(block) for block in blocks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert blocks == [fold_bounds(num_samples, folds, f) for f in range(folds)]  # deterministic


def test_a_fold_run_trains_on_the_other_folds_only(tmp_path: Path) -> None:
    split = windows(tmp_path)
    total = len(split)
    held_out_union: list[int] = []
    for fold in range(3):
        train, held = cross_validation_split(split, 3, fold)
        held_ids = {held.source_index(i) for i in range(len(held))}
        train_ids = [train.source_index(i) for i in range(len(train))]
        assert held_ids.isdisjoint(train_ids)
        assert sorted([*held_ids, *train_ids]) == list(range(total))
        held_out_union += sorted(held_ids)
        # A whole epoch of the training stream, as the trainer consumes it (two ranks, a
        # global batch of 2): every training sample once, no held-out sample.
        order = SampleOrder(len(train), seed=1234)
        streamed = []
        for consumed in range(0, len(train) - len(train) % 2, 2):
            for rank in range(2):
                positions = rank_positions(consumed, 2, 2, rank)
                streamed += [train.source_index(order.index(p)) for p in positions]
        assert held_ids.isdisjoint(streamed)
        assert len(set(streamed)) == len(streamed) >= len(train) - 1
        assert set(streamed) <= set(train_ids)
        # Validation indices address the held-out fold.
        picked = eval_indices(len(held), 4, 1234, 1, 0)
        assert {held.source_index(i) for i in picked} <= held_ids
        tokens, mask = held.get(0)
        expected, expected_mask = split.get(min(held_ids))
        assert tokens.tolist() == expected.tolist() and mask is not None
        assert expected_mask is not None and mask.tolist() == expected_mask.tolist()
    assert held_out_union == list(range(total))  # the k held-out folds partition the split


def test_fewer_samples_than_folds_is_refused(tmp_path: Path) -> None:
    split = windows(tmp_path, documents=2)
    with pytest.raises(ValueError, match=r"crossValidation\.folds"):
        cross_validation_split(split, len(split) + 1, 0)
    with pytest.raises(ValueError, match="fold 3"):
        fold_bounds(10, 3, 3)
