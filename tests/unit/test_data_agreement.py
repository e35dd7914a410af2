"""Issue 19, part 2: the Gopher rules' word tokenizer (spaCy's English rules, no spaCy), the
C4 line filter's switch, and decontamination against the evaluation splits and files."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from data_corpus import document

from llmops.api.dataset import Dataset, Decontamination, QualityFilters
from llmops_trainer.data import decontaminate, filters, run_local
from llmops_trainer.data.pipeline import decisions as joined_decisions
from llmops_trainer.data.steps import PIPELINE
from llmops_trainer.data.words import split_words

# What spacy.blank("en") gives for each (spaCy 3.8), as datatrove's Gopher filters count.
SPACY = [
    ("--foo and -- dashes", ["--foo", "and", "--", "dashes"]),
    ("Python 3.11 uses sys.path.", ["Python", "3.11", "uses", "sys.path", "."]),
    ("I don't know, e.g. this.", ["I", "do", "n't", "know", ",", "e.g.", "this", "."]),
    (
        "a well-known (hello) U.S. word...",
        ["a", "well", "-", "known", "(", "hello", ")", "U.S.", "word", "..."],
    ),
    (
        "It's 6am: UTF-8 at https://example.com/x?y=1 ok",
        ["It", "'s", "6", "am", ":", "UTF-8", "at", "https://example.com/x?y=1", "ok"],
    ),
    ("cannot gonna", ["can", "not", "gon", "na"]),
]


@pytest.mark.parametrize(("text", "expected"), SPACY)
def test_words_split_as_spacy_english(text: str, expected: list[str]) -> None:
    assert split_words(text) == expected


def test_words_agree_with_spacy_when_installed() -> None:
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    text = (
        "The module's `open()` -- see PEP 8 -- returns 2.5 times (roughly) what you'd\n"
        'expect; i.e. "quoted" words, $10 and 5km, well-known facts... Mr. Smith\'s C++ '
        "isn't easy: 64-bit ints, a/b and/or x=y, [1] {brace} 'single' ok!"
    )
    theirs = [t.text.strip() for t in nlp(text) if t.text.strip()]
    assert split_words(text) == theirs


def test_alpha_ratio_counts_tokens_as_datatrove() -> None:
    """`--` and `3.11` are one non-alphabetic token each (not two and three), so version
    numbers and dashes no longer push prose under the 0.8 alphabetic-word ratio."""
    rules = filters.QualityRules.from_spec(
        QualityFilters(min_words=5, min_alpha_word_ratio=0.8, max_symbol_ratio=0.1)
    )
    text = (
        "Python 3.11 -- the release of this year -- runs the code of the project the same "
        "way as before and with less memory."
    )
    tokens = split_words(text)
    alpha = sum(1 for t in tokens if any(c.isalpha() for c in t))
    assert alpha / len(tokens) >= 0.8
    assert filters.gopher_quality(text, rules) is None


def test_ngrams_ignore_case_punctuation_and_spacing() -> None:
    a = decontaminate.ngram_hashes("The quick brown fox, jumps over the lazy dog!", 5)
    b = decontaminate.ngram_hashes("the QUICK brown  fox jumps\nover the lazy dog", 5)
    assert len(a) == 5 and np.array_equal(a, b)
    assert len(decontaminate.ngram_hashes("only four words here", 5)) == 0
    index = decontaminate.NgramIndex(5)
    index.add("jumps over the lazy dog")
    index.add("too short")
    assert index.texts == 2 and len(index) == 1
    hits = index.matches(
        ["A fox JUMPS over the lazy dog again.", "the lazy dog jumps over", "four words only here"]
    )
    assert hits.tolist() == [True, False, False]


def test_index_compacts_and_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decontaminate, "_COMPACT", 8)
    index = decontaminate.NgramIndex(5)
    rng = random.Random(4)
    texts = [document(rng, 3) for _ in range(20)]
    for text in texts:
        index.add(text)
    expected = {int(h) for t in texts for h in decontaminate.ngram_hashes(t, 5)}
    assert len(index) == len(expected)
    assert index.matches(texts).all()


def test_evaluation_files(tmp_path: Path) -> None:
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "qa.jsonl").write_text(
        json.dumps({"question": "Q one", "choices": ["a", "b"], "answer": {"text": "A"}, "n": 1})
        + "\n\n"
    )
    (folder / "passages.txt").write_text("first paragraph\nstill first\n\n\nsecond one\n")
    texts = list(decontaminate.file_texts([str(folder)]))
    assert texts == ["first paragraph\nstill first", "second one\n", "Q one", "a", "b", "A"]
    before = decontaminate.files_digest([str(folder)])
    (folder / "passages.txt").write_text("changed\n")
    assert decontaminate.files_digest([str(folder)]) != before
    with pytest.raises(FileNotFoundError, match=r"decontamination\.files"):
        list(decontaminate.file_texts([str(tmp_path / "missing.jsonl")]))


def test_decontamination_api() -> None:
    config = Decontamination()
    assert config.ngram == 13 and config.against == ["validation", "test"]
    with pytest.raises(ValueError, match="evaluation text"):
        Decontamination(against=[])
    with pytest.raises(ValueError):
        Decontamination.model_validate({"against": ["train"]})
    assert PIPELINE.step_of(decontaminate.CONTAMINATED) == "decontaminate"


def _dataset(sources: list[dict[str, Any]], **processing: Any) -> Dataset:
    return Dataset.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "t"},
            "spec": {
                "sources": sources,
                "processing": processing,
                "tokenizer": {"byte": {}},
                "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
            },
        }
    )


def test_engine_drops_training_documents_copied_into_evaluation(tmp_path: Path) -> None:
    rng = random.Random(11)
    train = [document(rng, 8) for _ in range(12)]
    # Validation quotes 20 words of train[2] inside other text (not a near duplicate), and an
    # evaluation file quotes 15 words of train[7] with other case and punctuation.
    quoted = " ".join(train[2].split(" ")[10:30])
    validation = [document(rng, 8) + " " + quoted + ". " + document(rng, 4), document(rng, 8)]
    question = " ".join(train[7].split(" ")[5:20]).upper().replace(" ", ", ")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "train.txt").write_text("\n\n".join(train) + "\n")
    (folder / "validation.txt").write_text("\n\n".join(validation) + "\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": question}) + "\n")
    sources = [
        {"name": "web", "path": str(folder / "train.txt")},
        {"name": "held", "path": str(folder / "validation.txt"), "split": "validation"},
    ]
    plain = run_local(_dataset(sources), tmp_path / "plain", 1)
    assert plain.stats["documentsPerSplit"] == {"train": 12, "validation": 2, "test": 0}
    config = {"ngram": 13, "against": ["validation"], "files": [str(tmp_path / "eval.jsonl")]}
    clean = run_local(_dataset(sources, decontamination=config), tmp_path / "clean", 2)
    assert clean.stats["documentsPerSplit"] == {"train": 10, "validation": 2, "test": 0}
    step = next(s for s in clean.stats["steps"] if s["name"] == "decontaminate")
    assert step["dropped"] == {"contaminated": 2}
    assert step["documentsIn"] - step["documentsOut"] == 2
    assert step["decontamination"]["splitTexts"] == 2
    assert step["decontamination"]["fileTexts"] == 1
    assert clean.stats["sources"]["web"]["contaminatedDocuments"] == 2
    assert clean.stats["sources"]["held"]["contaminatedDocuments"] == 0
    card = (tmp_path / "clean" / "README.md").read_text()
    assert "9. Decontamination: 13-grams of words shared with validation" in card
    assert "2 training documents dropped (web 2, held 0)" in card
    # Which documents: train[2] and train[7], by their positions in the input.
    decisions = joined_decisions(tmp_path / "clean" / ".work", 2)
    reasons = [str(r) for r in decisions["reasons"]]
    dropped = sorted(
        int(p)
        for p, c in zip(decisions["positions"], decisions["codes"], strict=True)
        if reasons[c] == "contaminated"
    )
    assert dropped == [2, 7]
    assert clean.fingerprint != plain.fingerprint
    # A shorter n-gram than the quote still matches; a longer one than the eval file's 15
    # words does not find that copy.
    longer = {"ngram": 16, "against": ["validation"], "files": [str(tmp_path / "eval.jsonl")]}
    only_split = run_local(_dataset(sources, decontamination=longer), tmp_path / "longer", 1)
    assert only_split.stats["documentsPerSplit"]["train"] == 11


def test_c4_lines_switch(tmp_path: Path) -> None:
    rng = random.Random(5)
    prose = [document(rng, 8) for _ in range(6)]
    menu = "Home\nAbout us\n" + prose[0] + "\nThis site uses cookies to improve things."
    code = prose[1] + "\nint main() { return 0; }"
    docs = [menu, code, *prose[2:]]
    path = tmp_path / "in.txt"
    path.write_text("\n\n\n".join(docs) + "\n")
    off = run_local(_dataset([{"name": "s", "path": str(path)}]), tmp_path / "off", 1)
    on_dataset = _dataset([{"name": "s", "path": str(path)}], filters={"c4Lines": True})
    assert filters.QualityRules.from_spec(on_dataset.spec.processing.filters).c4_lines
    on = run_local(on_dataset, tmp_path / "on", 1)
    steps_off = {s["name"]: s for s in off.stats["steps"]}
    steps_on = {s["name"]: s for s in on.stats["steps"]}
    assert steps_off["filter-lines"]["dropped"] == {}
    assert steps_off["filter-lines"]["linesRemoved"] == {}
    assert off.stats["documents"] == 6
    # On: the document with a curly bracket is dropped; the menu loses its three lines
    # (two without terminal punctuation, one about cookies) and keeps its prose.
    assert steps_on["filter-lines"]["dropped"] == {"c4_curly_bracket": 1}
    assert steps_on["filter-lines"]["linesRemoved"] == {
        "no_terminal_punctuation": 2,
        "policy": 1,
    }
    assert on.stats["documents"] == 5
    assert off.splits["train"].tokens - on.splits["train"].tokens > len(code)
    card = (tmp_path / "on" / "README.md").read_text()
    assert "C4 line rules on" in card
