"""The standard pipeline: one registry entry per document step, in the order they run.

A new filter is one entry here (with the Dataset API field that configures it). The slice
normalizes every document before the steps run, because content hashes and sizes are those
of the normalized text; the normalize step drops what normalization left empty.
"""

from __future__ import annotations

from collections import Counter

from llmops.api.dataset import LanguageFilter, Normalization, PiiScrubbing, QualityFilters
from llmops_trainer.data import filters
from llmops_trainer.data.language import UNKNOWN
from llmops_trainer.data.pii import PiiScrubber
from llmops_trainer.data.registry import Check, Counters, Document, Options, Registry, Step

EMPTY = "empty"
EXACT = "exact-duplicate"
NEAR = "near-duplicate"
LANGUAGE = "language"


def _not_empty(config: Normalization, options: Options, counts: Counter[str]) -> Check:
    def check(document: Document) -> str | None:
        return EMPTY if not document.text or document.response == "" else None

    return check


def _exact(enabled: bool, options: Options, counts: Counter[str]) -> Check | None:
    """Within the slice; the merge finds the copies that are in different slices."""
    if not enabled:
        return None
    seen: set[bytes] = set()

    def check(document: Document) -> str | None:
        if document.digest in seen:
            return EXACT
        seen.add(document.digest)
        return None

    return check


def _rules(config: QualityFilters, options: Options) -> filters.QualityRules:
    return options.rules if options.rules is not None else filters.QualityRules.from_spec(config)


def _quality(config: QualityFilters, options: Options, counts: Counter[str]) -> Check | None:
    rules = _rules(config, options)
    if not rules.quality:
        return None

    def check(document: Document) -> str | None:
        english = document.language in ("en", UNKNOWN)
        return filters.gopher_quality(document.combined, rules, english=english)

    return check


def _repetition(config: QualityFilters, options: Options, counts: Counter[str]) -> Check | None:
    rules = _rules(config, options)
    if not rules.repetition:
        return None

    def check(document: Document) -> str | None:
        return filters.gopher_repetition(document.combined, rules)

    return check


def _lines(config: QualityFilters, options: Options, counts: Counter[str]) -> Check | None:
    rules = _rules(config, options)
    if not rules.c4_lines:
        return None

    def check(document: Document) -> str | None:
        if document.supervised:
            return None  # prompts are not web pages: their lines need no boilerplate rules
        result = filters.c4_lines(document.text, rules)
        counts.update(result.detail)
        if result.reason is None:
            document.text = result.text
        return result.reason

    return check


def _language(config: LanguageFilter, options: Options, counts: Counter[str]) -> Check | None:
    allow = set(config.allow)
    if not allow:
        return None

    def check(document: Document) -> str | None:
        if document.language not in allow or document.confidence < config.min_confidence:
            return LANGUAGE
        return None

    return check


def _pii(config: PiiScrubbing, options: Options, counts: Counter[str]) -> Check | None:
    if not config.enabled:
        return None
    scrub = PiiScrubber(config.kinds)
    scrub.counts = counts  # replacements per kind are the step's counters

    def check(document: Document) -> str | None:
        document.text = scrub(document.text)
        if document.response is not None:
            document.response = scrub(document.response)
        return None

    return check


PIPELINE = Registry(
    (
        Step("normalize", "processing.normalization", frozenset({EMPTY}), _not_empty),
        Step("dedup-exact", "processing.deduplication.exact", frozenset({EXACT}), _exact),
        Step("filter-quality", "processing.filters", filters.QUALITY_REASONS, _quality),
        Step("filter-repetition", "processing.filters", filters.REPETITION_REASONS, _repetition),
        Step(
            "filter-lines",
            "processing.filters",
            filters.LINE_REASONS,
            _lines,
            Counters("c4LinesRemoved", "linesRemoved"),
        ),
        Step("language", "processing.languages", frozenset({LANGUAGE}), _language),
        Step("pii", "processing.pii", frozenset(), _pii, Counters("pii", "replaced")),
        # Near duplicates are found in the merge, over the signatures of every slice.
        Step("dedup-near", "processing.deduplication.near", frozenset({NEAR})),
    )
)
