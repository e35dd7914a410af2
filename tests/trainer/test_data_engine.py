"""The whole engine on a few MB, as the Jobs run it: slice pods, dedup pods, then the merge,
as processes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from llmops_trainer.shards import open_tokens, read_manifest, verify

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from data_corpus import document, near_copy

SLICES = 3


def test_engine_end_to_end(tmp_path: Path) -> None:
    rng = random.Random(42)
    unique = [document(rng, rng.randint(20, 60)) for _ in range(2500)]
    planted_near = [near_copy(unique[i], rng, 2) for i in range(0, 300, 3)]
    planted_exact = unique[300:400]
    junk = ["Buy now!!! $$$ ### ### ###"] * 3 + ["ok"] * 5 + ["\n".join(["- item"] * 30)]
    everything = unique + planted_near + planted_exact + junk
    rng.shuffle(everything)
    source = tmp_path / "corpus"
    source.mkdir()
    for i in range(6):
        (source / f"part-{i}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in everything[i::6])
        )
    assert sum(f.stat().st_size for f in source.iterdir()) > 2_000_000
    config = tmp_path / "dataset.json"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "llmops.dev/v1alpha1",
                "kind": "Dataset",
                "metadata": {"name": "engine"},
                "spec": {
                    "sources": [{"name": "web", "path": str(source), "format": "jsonl"}],
                    "processing": {"filters": {"minWords": 50}},
                    "tokenizer": {"train": {"vocabSize": 2000}},
                    "sharding": {"tokensPerShard": 200_000},
                    "parallelism": SLICES,
                },
            }
        )
    )
    output = tmp_path / "out"
    env = {
        **os.environ,
        "LLMOPS_OUTPUT_DIR": str(output),
        "LLMOPS_NUM_SLICES": str(SLICES),
        "LLMOPS_SLICE_BYTES": str(64 * 1024),  # each file in pieces, as a big one would be
    }
    command = [sys.executable, "-m", "llmops_trainer.data", "--config", str(config)]
    for index in range(SLICES):
        subprocess.run(
            [*command, "--stage", "slice"],
            check=True,
            timeout=600,
            env={**env, "JOB_COMPLETION_INDEX": str(index)},
        )
    for group in range(SLICES):  # the dedup Job: one pod per group of bands, min(3, 16)
        subprocess.run(
            [*command, "--stage", "dedup"],
            check=True,
            timeout=600,
            env={**env, "JOB_COMPLETION_INDEX": str(group)},
        )
    subprocess.run([*command, "--stage", "prepare"], check=True, timeout=600, env=env)
    for pod in range(SLICES):  # the tokenize Job: one pod per slice, units spread over them
        subprocess.run(
            [*command, "--stage", "tokenize"],
            check=True,
            timeout=600,
            env={**env, "JOB_COMPLETION_INDEX": str(pod)},
        )
    subprocess.run([*command, "--stage", "finalize"], check=True, timeout=600, env=env)

    manifest = read_manifest(output)
    assert verify(output, manifest) == []
    stats = manifest.stats
    steps = {s["name"]: s for s in stats["steps"]}
    assert steps["normalize"]["documentsIn"] == len(everything)
    assert steps["dedup-exact"]["dropped"]["exact-duplicate"] >= 100 + 2 + 4
    near_dropped = steps["dedup-near"]["dropped"].get("near-duplicate", 0)
    assert 95 <= near_dropped <= 110  # the 100 planted copies, give or take a chance pair
    # Clean documents survive: all but the near-duplicated ones and a few unlucky.
    assert stats["documents"] >= 2500 - 10
    assert stats["languages"]["en"] > 0.99
    # A small synthetic vocabulary runs out of merges before 2000 tokens.
    assert manifest.dtype == "uint16" and 256 < manifest.vocab_size <= 2000
    split_tokens = {name: split.tokens for name, split in manifest.splits.items()}
    assert split_tokens == stats["tokens"] and min(split_tokens.values()) > 0
    # About 800 KB of text per tokenize unit: the training split comes from several units.
    units = {shard.path.split("-")[1] for shard in manifest.splits["train"].shards}
    assert len(units) > 1
    tokenizer = Tokenizer.from_file(str(output / manifest.tokenizer))
    first = open_tokens(output, manifest, manifest.splits["train"].shards[0])
    end = int(np.flatnonzero(np.asarray(first) == manifest.eos_token_id)[0])
    decoded = tokenizer.decode(np.asarray(first[:end]).tolist())
    assert decoded in {t.strip() for t in everything}
    assert "# Dataset card: engine" in (output / "README.md").read_text()
    pieces = [
        piece
        for index in range(SLICES)
        for piece in json.loads(
            (output / ".work" / f"slice-{index:05d}" / "stats.json").read_text()
        )["inputs"]
    ]
    assert len(pieces) > 6 and stats["inputs"]["files"] == 6  # the files were read in pieces
