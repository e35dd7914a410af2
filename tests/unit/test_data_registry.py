from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from data_corpus import document

from llmops.api.dataset import Dataset
from llmops_trainer.data import Options, report, run_local
from llmops_trainer.data.registry import Check, Counters, Document, Registry, Step
from llmops_trainer.data.steps import PIPELINE


def _dataset(path: Path) -> Dataset:
    return Dataset.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "t"},
            "spec": {
                "sources": [{"name": "s", "path": str(path)}],
                # Short synthetic documents lack stop words; only the step under test drops.
                "processing": {"filters": {"minStopWords": 0}},
                "tokenizer": {"train": {"vocabSize": 300}},
                "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
            },
        }
    )


def _digits(config: Any, options: Options, counts: Counter[str]) -> Check:
    def check(document: Document) -> str | None:
        counts["checked"] += 1
        return "has-digits" if any(c.isdigit() for c in document.text) else None

    return check


DIGITS = Step(
    "filter-digits",
    "processing.filters",
    frozenset({"has-digits"}),
    _digits,
    Counters("digitChecks", "seen"),
)


def test_every_reason_is_counted_under_its_step() -> None:
    dropped = [(reason, 1, 10) for step in PIPELINE.steps for reason in sorted(step.reasons)]
    steps = report.step_stats(PIPELINE, 1000, 10**6, dropped, 0, [])
    assert [s["name"] for s in steps] == [s.name for s in PIPELINE.steps]
    for step, stats in zip(PIPELINE.steps, steps, strict=True):
        assert stats["dropped"] == dict.fromkeys(sorted(step.reasons), 1)
        assert stats["documentsIn"] - stats["documentsOut"] == len(step.reasons)
    assert steps[-1]["documentsOut"] == 1000 - len(dropped)


def test_every_step_names_a_spec_field(tmp_path: Path) -> None:
    spec = _dataset(tmp_path).spec
    configs = {step.name: step.config(spec) for step in PIPELINE.steps}
    assert configs["filter-quality"] is spec.processing.filters
    assert configs["dedup-exact"] is True
    assert configs["dedup-near"] is spec.processing.deduplication.near


def test_a_reason_belongs_to_exactly_one_step() -> None:
    assert PIPELINE.step_of("gopher_short_doc") == "filter-quality"
    assert PIPELINE.step_of("top_2_gram") == "filter-repetition"
    assert PIPELINE.step_of("near-duplicate") == "dedup-near"
    with pytest.raises(ValueError, match="taken"):
        PIPELINE.with_step(Step("again", "processing.filters", frozenset({"gopher_short_doc"})))
    with pytest.raises(ValueError, match="named"):
        PIPELINE.with_step(Step("pii", "processing.pii", frozenset()))
    with pytest.raises(ValueError, match="no step"):
        PIPELINE.step_of("made-up")


def test_an_undeclared_reason_is_refused(tmp_path: Path) -> None:
    def build(config: Any, options: Options, counts: Counter[str]) -> Check:
        return lambda document: "undeclared"

    liar = Registry([Step("liar", "processing.filters", frozenset({"declared"}), build)])
    checks = liar.build(_dataset(tmp_path).spec, Options())
    with pytest.raises(ValueError, match="undeclared"):
        checks(Document("text", None, False, b"", "text"))


def test_a_registered_step_shows_up_in_the_statistics(tmp_path: Path) -> None:
    rng = random.Random(3)
    plain = [document(rng, 6) for _ in range(12)]
    priced = [document(rng, 6) + f" It cost {n} silver coins." for n in range(3)]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, part in enumerate((plain[:6] + priced[:1], plain[6:] + priced[1:])):
        (folder / f"part{i}.txt").write_text("\n\n".join(part) + "\n")
    steps = PIPELINE.with_step(DIGITS, before="language")
    manifest = run_local(_dataset(folder), tmp_path / "o", 2, options=Options(steps=steps))
    names = [s["name"] for s in manifest.stats["steps"]]
    assert names[names.index("filter-digits") + 1] == "language"
    digits = manifest.stats["steps"][names.index("filter-digits")]
    assert digits["dropped"] == {"has-digits": 3}
    assert digits["seen"] == {"checked": digits["documentsIn"]} == {"checked": 15}
    assert manifest.stats["documents"] == 12
