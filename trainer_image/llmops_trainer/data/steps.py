"""The standard pipeline: one registry entry per document step, in the order they run.

A new filter is one entry here (with the Dataset API field that configures it). The slice
normalizes every document before the steps run, because content hashes and sizes are those
of the normalized text; the normalize step drops the records that could not be read and
what normalization left empty.
"""

from __future__ import annotations

import logging
from collections import Counter

from jinja2 import TemplateError

from llmops.api.dataset import (
    LanguageFilter,
    Normalization,
    PiiScrubbing,
    QualityFilters,
    Tokenizer,
)
from llmops_trainer.data import filters, tokenize
from llmops_trainer.data.chat import ASSISTANT, ChatEncoder, ChatTemplateError, contents
from llmops_trainer.data.collect import MALFORMED_CHAT, UNREADABLE
from llmops_trainer.data.decontaminate import CONTAMINATED
from llmops_trainer.data.language import UNKNOWN
from llmops_trainer.data.pii import PiiScrubber
from llmops_trainer.data.registry import Check, Counters, Document, Options, Registry, Step
from llmops_trainer.data.synthetic import LOW_CONFIDENCE, NO_RESPONSE

log = logging.getLogger("llmops.data")
EMPTY = "empty"
NO_ASSISTANT = "no-assistant-turn"  # a chat with nothing to learn from
EXACT = "exact-duplicate"
NEAR = "near-duplicate"
LANGUAGE = "language"
CHAT_TEMPLATE = "chat-template"  # the model's chat template refused or rewrote the chat
# Records without content: never duplicates of each other.
CONTENTLESS = (EMPTY, UNREADABLE, MALFORMED_CHAT)
LOGGED_TEMPLATE_ERRORS = 5


def _not_empty(config: Normalization, options: Options, counts: Counter[str]) -> Check:
    def check(document: Document) -> str | None:
        if document.unreadable is not None:
            return document.unreadable
        if document.messages is not None:
            if not any(content for _, content in document.messages):
                return EMPTY
            if not any(role == ASSISTANT for role, _ in document.messages):
                return NO_ASSISTANT
            return None
        return EMPTY if not document.text or document.response == "" else None

    return check


def _exact(enabled: bool, options: Options, counts: Counter[str]) -> Check | None:
    """Within the slice; the dedup stage finds the copies that are in different slices."""
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
        if document.messages is not None:
            document.messages = [(role, scrub(content)) for role, content in document.messages]
            document.text = contents(document.messages)
            return None
        document.text = scrub(document.text)
        if document.response is not None:
            document.response = scrub(document.response)
        return None

    return check


def _chat_template(config: Tokenizer, options: Options, counts: Counter[str]) -> Check | None:
    """Chats the model's chat template cannot render (a template that raises, e.g. on roles
    that do not alternate) or renders with contents changed beyond trimming, so that the
    assistant-only loss mask cannot be computed, are dropped here rather than failing the
    merge. The template is loaded on the first chat."""
    if config.from_model is None:
        return None
    model = config.from_model
    encoder: list[ChatEncoder] = []

    def check(document: Document) -> str | None:
        if document.messages is None:
            return None
        if not encoder:
            loaded = tokenize.load_model(tokenize.model_folder(model))
            encoder.append(ChatEncoder(loaded.folder, loaded.tokenizer, loaded.eos_id))
        try:
            encoder[0].spans(document.messages)
        except (ChatTemplateError, TemplateError) as error:  # TemplateError: raise_exception()
            counts["errors"] += 1
            if counts["errors"] <= LOGGED_TEMPLATE_ERRORS:
                log.warning("chat dropped by the chat template: %s", error)
            return CHAT_TEMPLATE
        return None

    return check


PIPELINE = Registry(
    (
        Step(
            "normalize",
            "processing.normalization",
            frozenset({EMPTY, UNREADABLE, MALFORMED_CHAT, NO_ASSISTANT}),
            _not_empty,
        ),
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
        # Chats are rendered as they will be tokenized, with their contents final.
        Step("chat-template", "tokenizer", frozenset({CHAT_TEMPLATE}), _chat_template),
        # Prompts of sources[].pseudoLabel answered by a model (data.synthetic), after the
        # cleaning, in batches: the slice drops the answers the model was not confident of.
        Step(
            "pseudo-label",
            "sources",
            frozenset({LOW_CONFIDENCE, NO_RESPONSE}),
            None,
            Counters("pseudoLabel", "pseudoLabel"),
        ),
        # Near duplicates are found by the dedup stage, over the signatures of every slice.
        Step("dedup-near", "processing.deduplication.near", frozenset({NEAR})),
        # Training documents sharing an n-gram with evaluation text: the prepare stage indexes
        # the evaluation n-grams once the splits are known, the tokenize units drop them
        # (data.decontaminate).
        Step("decontaminate", "processing.decontamination", frozenset({CONTAMINATED})),
    )
)
