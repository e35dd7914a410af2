"""Every processing switch, turned on and off, changes the output exactly as the Dataset API
describes it. Documents go in as JSON lines, the engine runs in-process (`run_local`), and
the training split is decoded with a byte tokenizer, so the assertions read the shards."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from data_corpus import document, near_copy
from tokenizers import Tokenizer

from llmops.api.dataset import Dataset
from llmops_trainer.data import run_local
from llmops_trainer.shards import Manifest, open_tokens


def _run(tmp_path: Path, docs: list[str], **processing: Any) -> tuple[Manifest, list[str]]:
    """Every kept document, in input order, as the training split holds it."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    output = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    dataset = Dataset.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "t"},
            "spec": {
                "sources": [{"name": "s", "path": str(source), "format": "jsonl"}],
                "processing": processing,
                "tokenizer": {"byte": {}},
                "split": {"mode": "contiguous", "train": 1.0, "validation": 0, "test": 0},
            },
        }
    )
    manifest = run_local(dataset, output, 1)
    return manifest, _decoded(output, manifest)


def _decoded(output: Path, manifest: Manifest, split: str = "train") -> list[str]:
    shards = manifest.splits[split].shards
    if not shards:
        return []
    tokenizer = Tokenizer.from_file(str(output / manifest.tokenizer))
    ids = np.concatenate([open_tokens(output, manifest, shard) for shard in shards])
    parts = np.split(ids, np.flatnonzero(ids == manifest.eos_token_id) + 1)[:-1]
    return [tokenizer.decode(part[:-1].tolist()) for part in parts]


def _dropped(manifest: Manifest, step: str) -> dict[str, int]:
    steps = {s["name"]: s for s in manifest.stats["steps"]}
    return dict(steps[step].get("dropped") or {})


@pytest.fixture
def prose() -> list[str]:
    """English-like documents every filter keeps."""
    rng = random.Random(11)
    return [document(rng, 6) + " The end of the story." for _ in range(4)]


# -- normalization ------------------------------------------------------------------------

UNICODE = " The \ufb01sh of the \uff21\uff22 caf\u0065\u0301 and the caf\u00e9."


@pytest.mark.parametrize("form", ["NFKC", "NFC", "none"])
def test_unicode_normalization_form(tmp_path: Path, prose: list[str], form: str) -> None:
    docs = [prose[0] + UNICODE, *prose[1:]]
    _, out = _run(tmp_path, docs, normalization={"unicode": form})
    expected = docs[0] if form == "none" else unicodedata.normalize(form, docs[0])
    assert out == [expected, *prose[1:]]
    ending = {
        "NFKC": " The fish of the AB caf\u00e9 and the caf\u00e9.",  # ligature, full width folded
        "NFC": " The \ufb01sh of the \uff21\uff22 caf\u00e9 and the caf\u00e9.",  # composed only
        "none": UNICODE,  # code points as read
    }
    assert out[0].endswith(ending[form])


def test_lowercase(tmp_path: Path, prose: list[str]) -> None:
    _, kept_case = _run(tmp_path, prose)  # off by default
    _, lowered = _run(tmp_path, prose, normalization={"lowercase": True})
    assert kept_case == prose
    assert lowered == [d.lower() for d in prose]


def test_collapse_whitespace(tmp_path: Path, prose: list[str]) -> None:
    a, b, c, d = prose[0].split(". ", 3)
    messy = f"  {a}.  \t {b}. \n  {c}.\u00a0\u2003Again.\r\n\n\n\n\t{d}\t\n"
    docs = [messy, *prose[1:]]
    _, collapsed = _run(tmp_path, docs)  # on by default
    _, kept = _run(tmp_path, docs, normalization={"collapseWhitespace": False})
    # Runs of spaces and tabs (Unicode spaces too) become one space, a space at a line's
    # edge goes, and runs of blank lines shrink to one.
    assert collapsed[0] == f"{a}. {b}.\n{c}. Again.\n\n{d}"
    # Off: whitespace as read, except CRLF -> LF and the document's own ends stripped (and
    # NFKC, on by default, still folds the no-break and em spaces to plain ones).
    assert kept[0] == unicodedata.normalize("NFKC", messy.replace("\r\n", "\n")).strip()
    assert "  \t " in kept[0] and "\n\n\n\n\t" in kept[0]
    assert collapsed[1:] == kept[1:] == prose[1:]


# -- deduplication -------------------------------------------------------------------------


@pytest.fixture
def copies() -> list[str]:
    rng = random.Random(9)
    a, b = document(rng, 8), document(rng, 8)
    return [a, b, near_copy(a, rng, 1), b]  # a, b, a near copy of a, an exact copy of b


def test_near_deduplication_off_keeps_near_copies_only(tmp_path: Path, copies: list[str]) -> None:
    on, both = _run(tmp_path, copies)
    off, near_kept = _run(tmp_path, copies, deduplication={"near": {"enabled": False}})
    assert both == copies[:2]
    assert _dropped(on, "dedup-near") == {"near-duplicate": 1}
    assert near_kept == copies[:3]  # the near copy stays; the exact copy still goes
    assert _dropped(off, "dedup-near") == {}
    assert _dropped(off, "dedup-exact") == {"exact-duplicate": 1}


def test_exact_deduplication_off_leaves_identical_copies_to_near_deduplication(
    tmp_path: Path, copies: list[str]
) -> None:
    manifest, out = _run(tmp_path, copies, deduplication={"exact": False})
    assert out == copies[:2]  # an identical copy is also a near duplicate (similarity 1)
    assert _dropped(manifest, "dedup-exact") == {}
    assert _dropped(manifest, "dedup-near") == {"near-duplicate": 2}
    _, everything = _run(
        tmp_path, copies, deduplication={"exact": False, "near": {"enabled": False}}
    )
    assert everything == copies


# -- filters -------------------------------------------------------------------------------


def test_quality_filters_off_keep_what_they_drop(tmp_path: Path, prose: list[str]) -> None:
    short = "Too short."
    symbols = "The #### of ### and the #### to ### with #### that ### have ####."
    docs = [prose[0], short, symbols, prose[1]]
    # The repetition rules (short texts repeat their n-grams) stay off in both runs.
    on, kept = _run(tmp_path, docs, filters={"repetition": False})
    off, everything = _run(tmp_path, docs, filters={"quality": False, "repetition": False})
    assert kept == [prose[0], prose[1]]
    assert _dropped(on, "filter-quality") == {"gopher_short_doc": 1, "gopher_too_many_hashes": 1}
    assert everything == docs
    assert _dropped(off, "filter-quality") == {}


def test_stop_word_rule_off_at_zero(tmp_path: Path, prose: list[str]) -> None:
    listing = "Copper timber stone paper. Lantern candle kitchen orchard. Valley island shore."
    docs = [prose[0], listing]
    manifest, kept = _run(tmp_path, docs, filters={"repetition": False})
    assert kept == [prose[0]]
    assert _dropped(manifest, "filter-quality") == {"gopher_enough_stop_words": 1}
    _, everything = _run(tmp_path, docs, filters={"minStopWords": 0, "repetition": False})
    assert everything == docs


def test_repetition_filters_off_keep_repeated_lines(tmp_path: Path, prose: list[str]) -> None:
    repeated = "\n".join([prose[2]] * 3)  # the same line three times
    docs = [prose[0], repeated, prose[1]]
    on, kept = _run(tmp_path, docs)
    assert kept == [prose[0], prose[1]]
    assert sum(_dropped(on, "filter-repetition").values()) == 1
    assert _dropped(on, "filter-quality") == {}  # the quality rules alone would keep it
    off, everything = _run(tmp_path, docs, filters={"repetition": False})
    assert everything == docs
    assert _dropped(off, "filter-repetition") == {}


# -- languages, PII, augmentation ----------------------------------------------------------

FRENCH = (
    "Le gardien du phare montait chaque matin les marches de la tour et notait le temps dans "
    "un petit carnet vert avec beaucoup de soin et de patience."
)


def test_language_allow_list_empty_keeps_every_language(tmp_path: Path, prose: list[str]) -> None:
    docs = [prose[0], FRENCH, prose[1]]
    manifest, english = _run(tmp_path, docs, languages={"allow": ["en"]}, filters={"minWords": 3})
    assert english == [prose[0], prose[1]]
    assert _dropped(manifest, "language") == {"language": 1}
    manifest, every = _run(tmp_path, docs, filters={"minWords": 3})  # allow: [] by default
    assert every == docs
    assert set(manifest.stats["languages"]) == {"en", "fr"}


def test_pii_scrubbing_off_keeps_personal_data(tmp_path: Path, prose: list[str]) -> None:
    contact = " Write to ann@example.org or call +1 415-555-0199 from 10.0.0.7 today."
    docs = [prose[0] + contact, prose[1]]
    manifest, scrubbed = _run(tmp_path, docs)
    assert scrubbed[0] == prose[0] + " Write to <EMAIL> or call <PHONE> from <IP_ADDRESS> today."
    steps = {s["name"]: s for s in manifest.stats["steps"]}
    assert steps["pii"]["replaced"] == {"email": 1, "phone": 1, "ip-address": 1}
    _, only_email = _run(tmp_path, docs, pii={"kinds": ["email"]})
    assert only_email[0] == prose[0] + contact.replace("ann@example.org", "<EMAIL>")
    _, kept = _run(tmp_path, docs, pii={"enabled": False})
    assert kept == docs


def test_augmentation_off_adds_no_copies(tmp_path: Path, prose: list[str]) -> None:
    manifest, plain = _run(tmp_path, prose)  # off by default
    assert plain == prose
    assert manifest.stats["documentsPerSplit"]["train"] == len(prose)
    manifest, grown = _run(
        tmp_path,
        prose,
        augmentation={"enabled": True, "methods": ["word-swap"], "copies": 2, "probability": 0.5},
    )
    assert manifest.stats["documentsPerSplit"]["train"] == 3 * len(prose)
    assert grown[0::3] == prose  # each original, followed by its noisy copies
    for i, original in enumerate(prose):
        for noisy in grown[3 * i + 1 : 3 * i + 3]:
            assert noisy != original and sorted(noisy.split(" ")) == sorted(original.split(" "))
