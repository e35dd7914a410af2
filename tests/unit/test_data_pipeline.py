from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from data_corpus import document, near_copy

from llmops.api.dataset import Dataset, DatasetStatus
from llmops_trainer.data import Options, run_local
from llmops_trainer.data.__main__ import main
from llmops_trainer.data.pipeline import decisions, run_tokenize
from llmops_trainer.data.prepare_stage import read_plan
from llmops_trainer.shards import open_mask, open_tokens, read_manifest, verify


def _dataset(sources: list[dict[str, Any]], **spec: Any) -> Dataset:
    return Dataset.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "t"},
            "spec": {
                "sources": sources,
                "tokenizer": {"train": {"vocabSize": 300}},
                "split": {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 3},
                "sharding": {"tokensPerShard": 2048},
                **spec,
            },
        }
    )


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rng = random.Random(9)
    docs = [document(rng, 8) for _ in range(40)]
    docs += [docs[0], near_copy(docs[1], rng, 1), "Too short."]
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.txt").write_text("\n\n".join(docs[i::3]) + "\n")
    return folder


def test_slices_do_not_change_the_output(corpus: Path, tmp_path: Path) -> None:
    dataset = _dataset([{"name": "s", "path": str(corpus)}])
    one = run_local(dataset, tmp_path / "one", 1)
    three = run_local(dataset, tmp_path / "three", 3)
    assert one.fingerprint == three.fingerprint
    assert one.splits == three.splits
    steps = {s["name"]: s for s in one.stats["steps"]}
    assert steps["dedup-exact"]["dropped"] == {"exact-duplicate": 1}
    assert steps["dedup-near"]["dropped"] == {"near-duplicate": 1}
    assert steps["filter-quality"]["dropped"] == {"gopher_short_doc": 1}
    assert one.stats["documents"] == 40
    assert all(one.splits[s].documents > 0 for s in ("train", "validation", "test"))
    assert verify(tmp_path / "one", one) == []
    status = DatasetStatus.model_validate(one.stats)  # the controller copies these fields
    assert status.tokens is not None and status.total_tokens == one.stats["totalTokens"]
    assert status.steps[0].name == "normalize"
    assert "# Dataset card: t" in (tmp_path / "one" / "README.md").read_text()


def test_rerun_skips_finished_work(corpus: Path, tmp_path: Path) -> None:
    dataset = _dataset([{"name": "s", "path": str(corpus)}])
    first = run_local(dataset, tmp_path / "o", 2)
    marker = tmp_path / "o" / ".work" / "slice-00000" / "DONE"
    stamp = marker.stat().st_mtime_ns
    again = run_local(dataset, tmp_path / "o", 2)
    assert marker.stat().st_mtime_ns == stamp
    assert again.fingerprint == first.fingerprint
    changed = _dataset([{"name": "s", "path": str(corpus)}], split={"seed": 4})
    assert run_local(changed, tmp_path / "o", 2).fingerprint != first.fingerprint


def test_supervised_pairs_get_a_loss_mask(tmp_path: Path) -> None:
    rng = random.Random(1)
    rows = [
        {"prompt": f"Question {i}: {document(rng, 1)}", "response": document(rng, 2)}
        for i in range(30)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = _dataset(
        [
            {
                "name": "qa",
                "path": str(path),
                "format": "jsonl",
                "promptField": "prompt",
                "responseField": "response",
            }
        ],
        processing={"filters": {"minWords": 3}},
    )
    manifest = run_local(dataset, tmp_path / "o", 1)
    assert manifest.supervised
    shard = manifest.splits["train"].shards[0]
    tokens = open_tokens(tmp_path / "o", manifest, shard)
    mask = open_mask(tmp_path / "o", shard)
    assert mask is not None and len(mask) == len(tokens)
    assert 0 < mask.mean() < 1
    assert mask[tokens == manifest.eos_token_id].all()


def test_weights_and_augmentation_grow_the_training_split(corpus: Path, tmp_path: Path) -> None:
    plain = run_local(_dataset([{"name": "s", "path": str(corpus)}]), tmp_path / "a", 1)
    heavy = run_local(
        _dataset(
            [{"name": "s", "path": str(corpus), "weight": 2}],
            processing={"augmentation": {"enabled": True, "methods": ["word-swap"]}},
        ),
        tmp_path / "b",
        1,
    )
    assert heavy.splits["train"].documents == 3 * plain.splits["train"].documents
    assert heavy.splits["validation"].documents == plain.splits["validation"].documents


def test_language_allow_list_and_pii(tmp_path: Path) -> None:
    rng = random.Random(2)
    english = [document(rng, 6) + " Write to ann@example.org today." for _ in range(5)]
    french = [
        "Le gardien du phare montait chaque matin les marches de la tour et notait "
        "le temps dans un petit carnet vert avec beaucoup de soin et de patience."
    ] * 1
    (tmp_path / "in.txt").write_text("\n\n".join(english + french))
    dataset = _dataset(
        [{"name": "s", "path": str(tmp_path / "in.txt")}],
        processing={"filters": {"minWords": 3}, "languages": {"allow": ["en"]}},
        split={"train": 1.0, "validation": 0.0, "test": 0.0},
    )
    manifest = run_local(dataset, tmp_path / "o", 1)
    steps = {s["name"]: s for s in manifest.stats["steps"]}
    assert steps["language"]["dropped"] == {"language": 1}
    assert manifest.stats["languages"] == {"en": 1.0}
    assert steps["pii"]["replaced"]["email"] == 5
    docs = (tmp_path / "o" / ".work" / "slice-00000" / "docs.jsonl").read_text()
    assert "ann@example.org" not in docs and "<EMAIL>" in docs


def test_cli_stages(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "dataset.json"
    config.write_text(json.dumps(_dataset([{"name": "s", "path": str(corpus)}]).to_dict()))
    monkeypatch.setenv("LLMOPS_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("LLMOPS_NUM_SLICES", "2")
    monkeypatch.setenv("LLMOPS_TERMINATION_LOG", str(tmp_path / "termination"))
    assert main(["--config", str(config), "--stage", "prepare"]) == 1  # slices not done yet
    assert json.loads((tmp_path / "termination").read_text())["stage"] == "prepare"
    for index in ("1", "0"):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", index)
        assert main(["--config", str(config), "--stage", "slice"]) == 0
    assert main(["--config", str(config), "--stage", "prepare"]) == 1  # dedup not done yet
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")  # one dedup pod (parallelism 1)
    assert main(["--config", str(config), "--stage", "dedup"]) == 1
    assert json.loads((tmp_path / "termination").read_text())["stage"] == "dedup"
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    assert main(["--config", str(config), "--stage", "dedup"]) == 0
    assert main(["--config", str(config), "--stage", "tokenize"]) == 1  # not prepared yet
    assert main(["--config", str(config), "--stage", "prepare"]) == 0
    assert main(["--config", str(config), "--stage", "tokenize"]) == 0  # pod 0 of 2
    assert main(["--config", str(config), "--stage", "finalize"]) == 1  # pod 1's units left
    assert json.loads((tmp_path / "termination").read_text())["stage"] == "finalize"
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert main(["--config", str(config), "--stage", "tokenize"]) == 0
    assert main(["--config", str(config), "--stage", "finalize"]) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest.stats["documents"] == 40
    tokens = np.concatenate(
        [open_tokens(tmp_path / "out", manifest, s) for s in manifest.splits["train"].shards]
    )
    assert (tokens == manifest.eos_token_id).sum() == manifest.splits["train"].documents
    # A finished finalize step leaves the statistics the Dataset status shows, within 4096 bytes.
    text = (tmp_path / "termination").read_text()
    report = json.loads(text)
    assert len(text.encode()) <= 4096
    assert (
        report["fingerprint"]
        == json.loads((tmp_path / "out" / "manifest.json").read_text())["fingerprint"]
    )
    from llmops.api.dataset import DatasetStatus

    status = DatasetStatus.model_validate(report)
    assert status.documents and status.total_tokens and status.steps


@pytest.mark.parametrize("slices", [1, 3])
def test_switching_deduplication_off_keeps_every_copy(
    corpus: Path, tmp_path: Path, slices: int
) -> None:
    """Off means off, also across slices (the copy of docs[0] sits in another file)."""
    on = _dataset([{"name": "s", "path": str(corpus)}])
    off = _dataset(
        [{"name": "s", "path": str(corpus)}],
        processing={"deduplication": {"exact": False, "near": {"enabled": False}}},
    )
    kept = run_local(on, tmp_path / "on", slices)
    everything = run_local(off, tmp_path / "off", slices)
    assert everything.stats["documents"] == kept.stats["documents"] + 2  # the copy, the near one
    steps = {s["name"]: s for s in everything.stats["steps"]}
    assert not steps["dedup-exact"].get("dropped") and not steps["dedup-near"].get("dropped")


def test_dedup_pods_do_not_change_the_output(corpus: Path, tmp_path: Path) -> None:
    """The dedup stage's band groups (and hash ranges) over any number of pods and slices
    make the same removal decisions, so the same shards, as one process."""
    dataset = _dataset([{"name": "s", "path": str(corpus)}])
    one = run_local(dataset, tmp_path / "one", 1, groups=1)
    many = run_local(dataset, tmp_path / "many", 3, groups=5)
    assert one.splits == many.splits  # shard checksums included
    assert one.stats["steps"] == many.stats["steps"]
    work = tmp_path / "many" / ".work" / "dedup"
    removed = [np.load(work / f"removed-{i:05d}.npz") for i in range(3)]
    assert sum(len(r["exact"]) for r in removed) == 1
    assert sum(len(r["near"]) for r in removed) == 1
    assert sorted(p.name for p in work.glob("group-*.done")) == [
        f"group-{g:05d}.done" for g in range(5)
    ]
    # A rerun skips every finished group and the cluster step.
    before = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    again = run_local(dataset, tmp_path / "many", 3, groups=5)
    assert again.fingerprint == many.fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir()} == before


def test_tokenize_units_do_not_depend_on_slices_or_pods(corpus: Path, tmp_path: Path) -> None:
    """Units of a few KiB of text: many units, tokenized by any number of pods over any
    number of slices, write the same shards, in the same order, as one pod over one slice;
    and the tokenizer trained on a small sample is the same sample's."""
    dataset = _dataset(
        [{"name": "s", "path": str(corpus)}],
        processing={"decontamination": {"ngram": 8}},
    )
    options = Options(unit_bytes=2048, tokenizer_sample_bytes=6000)
    one = run_local(dataset, tmp_path / "one", 1, options=options, pods=1)
    many = run_local(dataset, tmp_path / "many", 3, options=options, pods=2)
    assert one.splits == many.splits  # shard paths and checksums included
    assert one.stats["steps"] == many.stats["steps"]
    assert one.stats["tokenizerSample"] == many.stats["tokenizerSample"]
    assert 0 < one.stats["tokenizerSample"]["bytes"] < 8000  # a sample, not the whole split
    assert (tmp_path / "one" / "tokenizer.json").read_bytes() == (
        tmp_path / "many" / "tokenizer.json"
    ).read_bytes()
    units = read_plan(tmp_path / "many" / ".work")["units"]
    assert units > 3
    assert len({s.path.split("-")[1] for s in many.splits["train"].shards}) > 1
    assert verify(tmp_path / "many", many) == []
    # The documents of each split are those of a whole-corpus run without units.
    whole = run_local(dataset, tmp_path / "whole", 1, options=Options(tokenizer_sample_bytes=6000))
    assert {n: s.documents for n, s in whole.splits.items()} == {
        n: s.documents for n, s in many.splits.items()
    }
    assert sum(s.tokens for s in whole.splits["train"].shards) == many.splits["train"].tokens


def test_a_failed_unit_is_redone_alone(corpus: Path, tmp_path: Path) -> None:
    dataset = _dataset([{"name": "s", "path": str(corpus)}])
    options = Options(unit_bytes=2048)
    first = run_local(dataset, tmp_path / "o", 2, options=options)
    work = tmp_path / "o" / ".work" / "tokenize"
    lost = work / "unit-000001.done"
    lost.unlink()
    (tmp_path / "o" / "manifest.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in work.glob("unit-*.json")}
    again = run_local(dataset, tmp_path / "o", 2, options=options)
    after = {p.name: p.stat().st_mtime_ns for p in work.glob("unit-*.json")}
    assert [n for n in before if before[n] != after[n]] == ["unit-000001.json"]
    assert again.splits == first.splits
    assert run_tokenize_count(dataset, tmp_path / "o") == 0  # nothing left to do


def run_tokenize_count(dataset: Dataset, output: Path) -> int:
    return run_tokenize(dataset, output, output / ".work", 0, 1)


def test_contiguous_split_keeps_the_stream_order_across_slices(
    corpus: Path, tmp_path: Path
) -> None:
    dataset = _dataset(
        [{"name": "s", "path": str(corpus)}],
        split={"mode": "contiguous", "train": 0.7, "validation": 0.2, "test": 0.1},
    )
    one = run_local(dataset, tmp_path / "one", 1)
    three = run_local(dataset, tmp_path / "three", 3, options=Options(unit_bytes=4096), pods=2)
    assert {n: s.documents for n, s in one.splits.items()} == {
        n: s.documents for n, s in three.splits.items()
    }
    for name in ("train", "validation", "test"):
        a = np.concatenate([open_tokens(tmp_path / "one", one, s) for s in one.splits[name].shards])
        b = np.concatenate(
            [open_tokens(tmp_path / "three", three, s) for s in three.splits[name].shards]
        )
        assert (a == b).all()
    joined = [decisions(tmp_path / o / ".work", n) for o, n in (("one", 1), ("three", 3))]
    reasons = [d["reasons"][d["codes"]].tolist() for d in joined]
    assert reasons[0] == reasons[1]
    assert (joined[0]["positions"] == joined[1]["positions"]).all()
