from __future__ import annotations

from pathlib import Path

import pytest

np = pytest.importorskip("numpy")

from llmops_trainer.shards import (  # noqa: E402
    Manifest,
    ShardWriter,
    dtype_for_vocab,
    open_mask,
    open_tokens,
    read_manifest,
    verify,
    write_manifest,
)


def test_documents_round_trip_through_shards_and_manifest(tmp_path: Path):
    writer = ShardWriter(tmp_path, "train", "uint16", eos_token_id=0, tokens_per_shard=5)
    for doc in ([5, 6, 7], [8, 9], [10, 11, 12, 13]):
        writer.add(doc)
    split = writer.close()
    write_manifest(tmp_path, Manifest("abc", "uint16", 100, 0, splits={"train": split}))

    manifest = read_manifest(tmp_path)
    assert [s.tokens for s in manifest.splits["train"].shards] == [7, 5]
    stream = np.concatenate(
        [open_tokens(tmp_path, manifest, s) for s in manifest.splits["train"].shards]
    )
    assert stream.tolist() == [5, 6, 7, 0, 8, 9, 0, 10, 11, 12, 13, 0]
    assert manifest.splits["train"].documents == 3
    assert verify(tmp_path, manifest) == []


def test_supervised_shards_carry_a_loss_mask(tmp_path: Path):
    writer = ShardWriter(
        tmp_path, "train", "uint32", eos_token_id=1, tokens_per_shard=100, supervised=True
    )
    writer.add([70000, 3, 4], mask=[0, 1, 1])
    shard = writer.close().shards[0]
    assert open_mask(tmp_path, shard).tolist() == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="loss mask"):
        writer.add([3, 4])


def test_verify_reports_corruption(tmp_path: Path):
    writer = ShardWriter(tmp_path, "test", "uint16", eos_token_id=0, tokens_per_shard=10)
    writer.add([1, 2, 3])
    manifest = Manifest("f", "uint16", 10, 0, splits={"test": writer.close()})
    path = tmp_path / manifest.splits["test"].shards[0].path
    path.write_bytes(b"\x09\x00" * 4)
    assert verify(tmp_path, manifest) == ["test/shard-00000.bin: checksum mismatch"]
    path.unlink()
    assert verify(tmp_path, manifest) == ["test/shard-00000.bin: missing"]


def test_dtype_follows_vocab_size_and_out_of_range_ids_are_refused(tmp_path: Path):
    assert dtype_for_vocab(65536) == "uint16"
    assert dtype_for_vocab(65537) == "uint32"
    writer = ShardWriter(tmp_path, "train", "uint16", eos_token_id=0, tokens_per_shard=10)
    with pytest.raises(ValueError, match="out of range"):
        writer.add([70000])
