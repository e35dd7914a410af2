from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter

import pytest
from data_corpus import document
from hypothesis import given, settings
from hypothesis import strategies as st

from llmops.api.dataset import QualityFilters
from llmops_trainer.data import filters

# Gopher's published thresholds, stricter than the API's defaults, so that the short
# synthetic documents below trip exactly one rule each.
RULES = filters.QualityRules.from_spec(
    QualityFilters(min_words=50, max_words=100_000, max_symbol_ratio=0.1, min_alpha_word_ratio=0.8)
)


def test_clean_documents_pass() -> None:
    rng = random.Random(4)
    for _ in range(20):
        text = document(rng, 15)
        assert filters.gopher_quality(text, RULES) is None
        assert filters.gopher_repetition(text, RULES) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("The river and the sea.", "gopher_short_doc"),
        ("the and of to with " * 30, "gopher_below_avg_threshold"),
        (" ".join(["internationalization"] * 60) + " the and", "gopher_above_avg_threshold"),
        ("#tag the river and stone " * 20, "gopher_too_many_hashes"),
        ("\n".join(["- the river and the stone went"] * 20), "gopher_too_many_bullets"),
        ("1234 5678 " * 40 + "the river and the sea", "gopher_below_alpha_threshold"),
        ("river mountain village keeper baker market " * 10, "gopher_enough_stop_words"),
    ],
)
def test_quality_rules(text: str, reason: str) -> None:
    assert filters.gopher_quality(text, RULES) == reason


def test_stop_word_rule_is_english_only() -> None:
    text = "river mountain village keeper baker market " * 10
    assert filters.gopher_quality(text, RULES, english=False) is None


def test_repetition_rules() -> None:
    rng = random.Random(5)
    line = document(rng, 1)
    assert filters.gopher_repetition("\n\n".join([line] * 5), RULES) == "dup_para_frac"
    body = document(rng, 10)
    lines = body.split(". ")
    assert filters.gopher_repetition("\n".join(lines + lines[:6]), RULES) == "dup_line_frac"
    assert filters.gopher_repetition(("spam and eggs " * 50).strip(), RULES) == "top_2_gram"


def test_api_defaults_are_the_only_defaults() -> None:
    api = QualityFilters()
    rules = filters.QualityRules.from_spec(api)
    assert (rules.min_words, rules.max_words, rules.min_stop_words) == (5, None, 2)
    assert (rules.max_symbol_word_ratio, rules.min_alpha_word_ratio) == (0.3, 0.6)
    assert rules.dup_line_frac == api.max_duplicate_line_ratio == 0.3
    assert rules.quality and rules.repetition and not rules.c4_lines
    with pytest.raises(TypeError):
        filters.QualityRules()  # type: ignore[call-arg]


def test_spec_thresholds_are_used() -> None:
    rules = filters.QualityRules.from_spec(
        QualityFilters(min_words=3, max_duplicate_line_ratio=0.5)
    )
    assert rules.min_words == 3 and rules.dup_line_frac == 0.5
    assert filters.gopher_quality("The river and the sea were calm.", rules) is None


def test_code_passes_with_prose_rules_switched_off() -> None:
    function = (
        "def parse_header(line):\n"
        "    name, value = line.split(':', 1)\n"
        "    return name.strip().lower(), value.strip()\n"
    )
    code = function + "\n" + function
    prose = filters.QualityRules.from_spec(QualityFilters())
    assert filters.gopher_quality(code, prose) is not None
    relaxed = filters.QualityRules.from_spec(
        QualityFilters(
            min_words=3,
            max_symbol_ratio=1,
            min_alpha_word_ratio=0,
            min_stop_words=0,
            repetition=False,
        )
    )
    assert relaxed.min_stop_words is None and not relaxed.repetition
    assert filters.gopher_quality(code, relaxed) is None
    assert not filters.QualityRules.from_spec(QualityFilters(quality=False)).quality


def test_c4_lines() -> None:
    rng = random.Random(6)
    good = [document(rng, 2) for _ in range(5)]
    text = "\n".join([*good, "Menu Home About", "Please enable javascript in your browser to see."])
    result = filters.c4_lines(text, RULES)
    assert result.reason is None
    assert result.text == "\n".join(good)
    assert filters.c4_lines("lorem ipsum dolor sit amet.", RULES).reason == "c4_lorem_ipsum"
    assert filters.c4_lines("def f() { return 1; }", RULES).reason == "c4_curly_bracket"


# Gopher's reference definitions, as published (datatrove's implementation), to check the
# vectorised versions against.
def _reference(words: list[str], text: str) -> str | None:
    for n, fraction in RULES.top_n_grams:
        grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        if grams:
            gram, count = Counter(grams).most_common(1)[0]
            if len(gram) * count / len(text) > fraction:
                return f"top_{n}_gram"
    for n, fraction in RULES.dup_n_grams:
        seen: set[str] = set()
        total, i = 0, 0
        while i < len(words) - n + 1:
            gram = "".join(words[i : i + n])
            if gram in seen:
                total += len(gram)
                i += n
            else:
                seen.add(gram)
                i += 1
        if total / len(text) > fraction:
            return f"duplicated_{n}_n_grams"
    return None


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(["ab", "cde", "fghi", "jk", "lmnop", "q"]), min_size=2, max_size=120)
)
def test_ngram_rules_match_reference(words: list[str]) -> None:
    text = " ".join(words)
    rules = dataclasses.replace(
        RULES,
        dup_line_frac=None,
        dup_para_frac=None,
        dup_line_char_frac=None,
        dup_para_char_frac=None,
    )
    tokens = re.findall(r"\w+", text)
    assert filters.gopher_repetition(text, rules) == _reference(tokens, text)
