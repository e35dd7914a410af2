from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llmops_trainer.batches import (  # noqa: E402
    Objective,
    SampleOrder,
    Windows,
    eval_indices,
    make_batch,
    rank_positions,
)
from llmops_trainer.model import IGNORE_INDEX, mask_tokens  # noqa: E402
from llmops_trainer.shards import Manifest, ShardWriter, read_manifest, write_manifest  # noqa: E402


def dataset(root: Path, supervised: bool = False) -> Manifest:
    writer = ShardWriter(root, "train", "uint16", 0, tokens_per_shard=20, supervised=supervised)
    for start in range(1, 40, 4):
        tokens = list(range(start, start + 4))
        writer.add(tokens, [0, 0, 1, 1] if supervised else None)
    split = writer.close()
    write_manifest(
        root, Manifest("f", "uint16", 64, 0, supervised=supervised, splits={"train": split})
    )
    return read_manifest(root)


def test_windows_cover_each_shard_with_one_token_overlap(tmp_path: Path) -> None:
    manifest = dataset(tmp_path)
    windows = Windows(tmp_path, manifest, "train", context=4)
    shards = [s.tokens for s in manifest.splits["train"].shards]
    assert len(windows) == sum((n - 1) // 4 for n in shards)
    first, _ = windows.get(0)
    second, _ = windows.get(1)
    assert first.tolist() == [1, 2, 3, 4, 0] and second[0] == first[-1]
    with pytest.raises(IndexError):
        windows.get(len(windows))


def test_order_is_a_permutation_per_epoch_and_reproducible() -> None:
    order = SampleOrder(50, seed=3)
    epoch0 = [order.index(p) for p in range(50)]
    epoch1 = [order.index(p) for p in range(50, 100)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1
    assert [SampleOrder(50, seed=3).index(p) for p in range(50)] == epoch0


def test_resume_position_neither_repeats_nor_skips() -> None:
    order = SampleOrder(1000, seed=1)
    global_batch, world = 12, 3

    def steps(first: int, last: int) -> list[int]:
        return [
            order.index(p)
            for step in range(first, last)
            for rank in range(world)
            for p in rank_positions(step * global_batch, global_batch, world, rank)
        ]

    uninterrupted = steps(0, 40)
    resumed = steps(0, 17) + steps(17, 40)  # consumed = 17 * 12 after the restart
    assert resumed == uninterrupted
    assert len(set(uninterrupted)) == len(uninterrupted)


def test_a_steps_samples_do_not_depend_on_world_size() -> None:
    def step_samples(world: int) -> set[int]:
        return {p for r in range(world) for p in rank_positions(96, 24, world, r)}

    assert step_samples(1) == step_samples(2) == step_samples(4) == set(range(96, 120))


def test_eval_indices_give_every_rank_the_same_count() -> None:
    shares = [eval_indices(101, 64, seed=0, world_size=3, rank=r) for r in range(3)]
    assert {len(s) for s in shares} == {21}
    assert len({i for s in shares for i in s}) == 63


def test_causal_batch_shifts_targets(tmp_path: Path) -> None:
    manifest = dataset(tmp_path)
    windows = Windows(tmp_path, manifest, "train", context=4)
    inputs, labels = make_batch(windows, [0], Objective("causal-lm", 64, 0))
    assert inputs.tolist() == [[1, 2, 3, 4]] and labels.tolist() == [[2, 3, 4, 0]]


def test_sft_counts_only_response_tokens(tmp_path: Path) -> None:
    manifest = dataset(tmp_path, supervised=True)
    windows = Windows(tmp_path, manifest, "train", context=4)
    # document [1 2 3 4] eos, mask [0 0 1 1] 1: targets 2 (prompt) ignored, 3 4 eos learned
    _, labels = make_batch(windows, [0], Objective("sft", 64, 0))
    assert labels.tolist() == [[IGNORE_INDEX, 3, 4, 0]]
    with pytest.raises(ValueError, match="supervised"):
        make_batch(
            Windows(tmp_path, dataset(tmp_path / "plain"), "train", 4), [0], Objective("sft", 64, 0)
        )


def test_masking_follows_bert_proportions() -> None:
    tokens = torch.randint(1, 100, (200, 500))
    inputs, labels = mask_tokens(tokens, 100, 100, torch.Generator().manual_seed(0))
    targets = labels != IGNORE_INDEX
    assert targets.float().mean().item() == pytest.approx(0.15, abs=0.01)
    assert (labels[targets] == tokens[targets]).all()
    assert (inputs[~targets] == tokens[~targets]).all()
    masked = (inputs[targets] == 100).float().mean().item()
    unchanged = (inputs[targets] == tokens[targets]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.02)
    assert unchanged == pytest.approx(0.1 + 0.1 / 100, abs=0.02)  # kept, or drawn unchanged


def test_masked_lm_batches_are_identical_after_a_resume(tmp_path: Path) -> None:
    manifest = dataset(tmp_path)
    windows = Windows(tmp_path, manifest, "train", context=4)
    objective = Objective("masked-lm", 64, 5)
    assert objective.model_vocab_size == 65 and objective.mask_token_id == 64
    first = make_batch(windows, [0, 1, 2], objective)
    again = make_batch(windows, [0, 1, 2], objective)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
