"""Filter: Gopher quality and repetition rules, C4-style line rules.

The rules follow Gopher (Rae et al. 2021, table A1) as implemented by datatrove and NeMo
Curator. The Dataset API's QualityFilters set the thresholds it exposes (its defaults are the
only defaults); the ones it does not expose are the module constants below.
Words are the tokens of spaCy's rule-based English tokenizer, as datatrove's Gopher filters
count them, from a port without spaCy (data.words): `--`, `3.11` and `e.g.` are one token,
`don't` two. As in datatrove, the word-count and word-length rules count the tokens with a
character other than punctuation; the ratios divide by every token; a word is alphabetic
when it has a letter.
The repetition rules work on integer n-gram hashes in numpy, and the exact (sequential)
duplicated-n-gram scan only runs when a cheap upper bound says it could matter.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from llmops.api.dataset import QualityFilters
from llmops_trainer.data.words import PUNCTUATION, split_words

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_ALPHA = re.compile(r"[^\W\d_]")
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_BULLETS = ("\u2022", "-")
_ELLIPSES = ("...", "\u2026")
# Odd 64-bit multipliers that mix token ids into n-gram hashes (wrapping arithmetic).
_MIX = np.random.default_rng(0x5EED).integers(1, 2**63, size=16, dtype=np.uint64) * 2 + 1

# C4 (Raffel et al. 2020) line rules, datatrove's C4QualityFilter defaults.
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_TERMINAL = (".", "!", "?", '"', "\u201d", "'")
_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


# Thresholds the API does not expose: Gopher's published values, tuned for web prose.
MIN_AVG_WORD_LENGTH = 3
MAX_AVG_WORD_LENGTH = 10
MAX_BULLET_LINES_RATIO = 0.9
MAX_ELLIPSIS_LINES_RATIO = 0.3
DUP_PARA_FRAC = 0.3
DUP_LINE_CHAR_FRAC = 0.2
DUP_PARA_CHAR_FRAC = 0.2
TOP_N_GRAMS = ((2, 0.2), (3, 0.18), (4, 0.16))
DUP_N_GRAMS = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
# C4 line rules (spec.processing.filters.c4Lines) thresholds.
C4_MIN_SENTENCES = 5
C4_MIN_WORDS_PER_LINE = 3
C4_MAX_WORD_LENGTH = 1000

# Every reason each filter may drop a document for (the pipeline attributes them to steps).
QUALITY_REASONS = frozenset(
    {
        "gopher_short_doc",
        "gopher_long_doc",
        "gopher_below_avg_threshold",
        "gopher_above_avg_threshold",
        "gopher_too_many_hashes",
        "gopher_too_many_ellipsis",
        "gopher_too_many_bullets",
        "gopher_too_many_end_ellipsis",
        "gopher_below_alpha_threshold",
        "gopher_enough_stop_words",
    }
)
REPETITION_REASONS = frozenset(
    {
        "dup_para_frac",
        "dup_para_char_frac",
        "dup_line_frac",
        "dup_line_char_frac",
        *(f"top_{n}_gram" for n, _ in TOP_N_GRAMS),
        *(f"duplicated_{n}_n_grams" for n, _ in DUP_N_GRAMS),
    }
)
LINE_REASONS = frozenset({"c4_lorem_ipsum", "c4_curly_bracket", "c4_too_few_sentences"})


@dataclass(frozen=True)
class QualityRules:
    """Every threshold of the filters; None switches a rule off. Built from the API's
    QualityFilters (`from_spec`), so it has no defaults of its own."""

    min_words: int | None
    max_words: int | None
    min_avg_word_length: float | None
    max_avg_word_length: float | None
    max_symbol_word_ratio: float | None
    max_bullet_lines_ratio: float | None
    max_ellipsis_lines_ratio: float | None
    min_alpha_word_ratio: float | None
    min_stop_words: int | None
    dup_line_frac: float | None
    dup_para_frac: float | None
    dup_line_char_frac: float | None
    dup_para_char_frac: float | None
    top_n_grams: tuple[tuple[int, float], ...]
    dup_n_grams: tuple[tuple[int, float], ...]
    quality: bool
    repetition: bool
    c4_lines: bool
    c4_min_sentences: int
    c4_min_words_per_line: int
    c4_max_word_length: int

    @classmethod
    def from_spec(cls, spec: QualityFilters) -> QualityRules:
        return cls(
            min_words=spec.min_words or None,
            max_words=spec.max_words,
            min_avg_word_length=MIN_AVG_WORD_LENGTH,
            max_avg_word_length=MAX_AVG_WORD_LENGTH,
            max_symbol_word_ratio=spec.max_symbol_ratio,
            max_bullet_lines_ratio=MAX_BULLET_LINES_RATIO,
            max_ellipsis_lines_ratio=MAX_ELLIPSIS_LINES_RATIO,
            min_alpha_word_ratio=spec.min_alpha_word_ratio,
            min_stop_words=spec.min_stop_words or None,
            dup_line_frac=spec.max_duplicate_line_ratio,
            dup_para_frac=DUP_PARA_FRAC,
            dup_line_char_frac=DUP_LINE_CHAR_FRAC,
            dup_para_char_frac=DUP_PARA_CHAR_FRAC,
            top_n_grams=TOP_N_GRAMS,
            dup_n_grams=DUP_N_GRAMS,
            quality=spec.quality,
            repetition=spec.repetition,
            c4_lines=spec.c4_lines,
            c4_min_sentences=C4_MIN_SENTENCES,
            c4_min_words_per_line=C4_MIN_WORDS_PER_LINE,
            c4_max_word_length=C4_MAX_WORD_LENGTH,
        )


@dataclass
class FilterResult:
    """Why a document was dropped (None: kept) and its text after line-level removals."""

    reason: str | None
    text: str
    changed: bool = False
    detail: dict[str, int] = field(default_factory=dict)


@lru_cache(maxsize=4)
def _tokens(text: str) -> tuple[str, ...]:
    """The words of a document, split once for both Gopher filters."""
    return tuple(split_words(text))


def gopher_quality(text: str, rules: QualityRules, english: bool = True) -> str | None:
    tokens = _tokens(text)
    n_tokens = len(tokens)
    words = [t for t in tokens if not PUNCTUATION.issuperset(t)]
    n_words = len(words)
    if rules.min_words and n_words < rules.min_words:
        return "gopher_short_doc"
    if rules.max_words and n_words > rules.max_words:
        return "gopher_long_doc"
    if not n_words:
        return "gopher_short_doc"
    average = sum(map(len, words)) / n_words
    if rules.min_avg_word_length and average < rules.min_avg_word_length:
        return "gopher_below_avg_threshold"
    if rules.max_avg_word_length and average > rules.max_avg_word_length:
        return "gopher_above_avg_threshold"
    if rules.max_symbol_word_ratio:
        if text.count("#") / n_tokens > rules.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        ellipses = text.count("...") + text.count("\u2026")
        if ellipses / n_tokens > rules.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
    lines = text.splitlines() or [""]
    if rules.max_bullet_lines_ratio is not None:
        bullets = sum(1 for line in lines if line.lstrip().startswith(_BULLETS))
        if bullets / len(lines) > rules.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
    if rules.max_ellipsis_lines_ratio is not None:
        ending = sum(1 for line in lines if line.rstrip().endswith(_ELLIPSES))
        if ending / len(lines) > rules.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
    if rules.min_alpha_word_ratio:
        alpha = sum(1 for t in tokens if _ALPHA.search(t))
        if alpha / n_tokens < rules.min_alpha_word_ratio:
            return "gopher_below_alpha_threshold"
    # Stop words are English; a document detected as another language skips the rule.
    if (
        english
        and rules.min_stop_words
        and len(STOP_WORDS.intersection(tokens)) < (rules.min_stop_words)
    ):
        return "gopher_enough_stop_words"
    return None


def _duplicates(parts: list[str]) -> tuple[int, int]:
    counts = Counter(parts)
    elements = len(parts) - len(counts)
    chars = sum(len(part) * (n - 1) for part, n in counts.items() if n > 1)
    return elements, chars


def _ngram_hashes(ids: npt.NDArray[np.uint64], n: int) -> npt.NDArray[np.uint64]:
    m = len(ids) - n + 1
    out = ids[:m] * _MIX[0]
    for j in range(1, n):
        out = out ^ (ids[j : j + m] * _MIX[j])
        out = out * _MIX[15]
    return np.asarray(out, dtype=np.uint64)


def gopher_repetition(text: str, rules: QualityRules) -> str | None:
    if not text:
        return "empty"
    length = len(text)
    paragraphs = _PARAGRAPHS.split(text.strip())
    elements, chars = _duplicates(paragraphs)
    if rules.dup_para_frac is not None and elements / len(paragraphs) > rules.dup_para_frac:
        return "dup_para_frac"
    if rules.dup_para_char_frac is not None and chars / length > rules.dup_para_char_frac:
        return "dup_para_char_frac"
    lines = _LINES.split(text)
    elements, chars = _duplicates(lines)
    if rules.dup_line_frac is not None and elements / len(lines) > rules.dup_line_frac:
        return "dup_line_frac"
    if rules.dup_line_char_frac is not None and chars / length > rules.dup_line_char_frac:
        return "dup_line_char_frac"
    tokens = _tokens(text)
    if len(tokens) < 2:
        return None
    vocabulary: dict[str, int] = {}
    ids = np.fromiter(
        (vocabulary.setdefault(t, len(vocabulary)) for t in tokens), np.uint64, len(tokens)
    )
    lengths = np.fromiter(map(len, tokens), np.int64, len(tokens))
    cumulative = np.concatenate(([0], np.cumsum(lengths)))
    if len(vocabulary) == len(tokens):
        # No token repeats, so no n-gram does: the top n-gram is the first, counted once.
        for n, fraction in rules.top_n_grams:
            if len(tokens) >= n and (int(cumulative[n]) + n - 1) / length > fraction:
                return f"top_{n}_gram"
        return None
    for n, fraction in rules.top_n_grams:
        if len(tokens) < n:
            continue
        grams = _ngram_hashes(ids, n)
        _, first, counts = np.unique(grams, return_index=True, return_counts=True)
        top = counts.max()
        # Ties go to the n-gram seen first, as a stable most-common count does.
        i = int(first[counts == top].min())
        chars = int(cumulative[i + n] - cumulative[i]) + n - 1
        if chars * int(top) / length > fraction:
            return f"top_{n}_gram"
    for n, fraction in rules.dup_n_grams:
        if len(tokens) < n:
            continue
        grams = _ngram_hashes(ids, n)
        gram_chars = cumulative[n:] - cumulative[:-n]
        _, first = np.unique(grams, return_index=True)
        repeated = np.ones(len(grams), dtype=bool)
        repeated[first] = False
        # Every n-gram the scan counts repeats an earlier one: this bounds its total.
        if int(gram_chars[repeated].sum()) / length <= fraction:
            continue
        if _scan_duplicates(grams, gram_chars, n) / length > fraction:
            return f"duplicated_{n}_n_grams"
    return None


def _scan_duplicates(grams: npt.NDArray[np.uint64], chars: npt.NDArray[np.int64], n: int) -> int:
    """Characters in repeated n-grams, skipping past each repeat (Gopher's definition)."""
    seen: set[int] = set()
    values = grams.tolist()
    sizes = chars.tolist()
    total, i = 0, 0
    while i < len(values):
        if values[i] in seen:
            total += sizes[i]
            i += n
        else:
            seen.add(values[i])
            i += 1
    return total


def c4_lines(text: str, rules: QualityRules) -> FilterResult:
    """Drops lines without terminal punctuation, short lines, boilerplate; then the
    document if it is left with too few sentences (or looks like code or filler)."""
    lowered = text.lower()
    if "lorem ipsum" in lowered:
        return FilterResult("c4_lorem_ipsum", text)
    if "{" in text:
        return FilterResult("c4_curly_bracket", text)
    kept: list[str] = []
    removed: Counter[str] = Counter()
    for raw in text.split("\n"):
        line = _CITATION.sub("", raw).strip()
        if not line:
            continue
        low = line.lower()
        words = line.split()
        if not line.endswith(_TERMINAL):
            removed["no_terminal_punctuation"] += 1
        elif len(words) < rules.c4_min_words_per_line:
            removed["too_few_words"] += 1
        elif any(len(w) > rules.c4_max_word_length for w in words):
            removed["too_long_word"] += 1
        elif "javascript" in low:
            removed["javascript"] += 1
        elif any(p in low for p in _POLICY):
            removed["policy"] += 1
        else:
            kept.append(line)
    result = "\n".join(kept)
    if len(_SENTENCE_END.findall(result)) < rules.c4_min_sentences:
        return FilterResult("c4_too_few_sentences", result, bool(removed), dict(removed))
    return FilterResult(None, result, result != text, dict(removed))
