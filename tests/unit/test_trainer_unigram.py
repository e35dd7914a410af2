from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("torch")

from llmops_trainer.evaluate import unigram_perplexity
from llmops_trainer.shards import Manifest, ShardWriter


def test_unigram_baseline_matches_hand_computed_frequencies(tmp_path: Path):
    splits = {}
    for split, docs in (("train", [[1, 1, 1, 2]]), ("test", [[1, 2]])):
        writer = ShardWriter(tmp_path, split, "uint16", eos_token_id=0, tokens_per_shard=100)
        for doc in docs:
            writer.add(doc)
        splits[split] = writer.close()
    manifest = Manifest("f", "uint16", vocab_size=4, eos_token_id=0, splits=splits)
    # train counts (with eos): 0:1 1:3 2:1 3:0; add-one over 4 ids -> total 9
    p = {0: 2 / 9, 1: 4 / 9, 2: 2 / 9}
    expected = math.exp(-(math.log(p[1]) + math.log(p[2]) + math.log(p[0])) / 3)
    assert unigram_perplexity(tmp_path, manifest, "train", "test") == pytest.approx(expected)
