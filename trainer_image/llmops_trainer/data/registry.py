"""Registry of the document steps: what configures each, how it judges a document, and the
drop reasons and counters it reports. The slice runs the steps in order; the statistics
attribute every drop reason to the one step that declares it."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.api.dataset import DatasetSpec
from llmops_trainer.data.chat import Message, contents
from llmops_trainer.data.filters import QualityRules
from llmops_trainer.data.language import UNKNOWN, detect

KEPT = "kept"  # the reason code 0 of every slice: not a drop


@dataclass(slots=True)
class Document:
    """A normalized document on its way through the steps; a step may rewrite its text (and
    the contents of a chat's messages)."""

    text: str  # a chat: the contents of its messages, one after the other
    response: str | None  # set for prompt/response pairs
    supervised: bool  # from a source of prompt/response pairs or chats
    digest: bytes  # content hash of the normalized text and response (a chat: all of it)
    normalized: str  # text and response as normalized, before any step rewrote them
    detect_language: bool = True  # False: every document's language is unknown
    messages: list[Message] | None = None  # set for chats: (role, content) in order
    unreadable: str | None = None  # why the record gave no document: the normalize step drops it
    _language: tuple[str, float] | None = None

    @property
    def combined(self) -> str:
        if self.messages is not None:
            return contents(self.messages)
        return self.text if self.response is None else f"{self.text}\n{self.response}"

    @property
    def language(self) -> str:
        return self._detected()[0]

    @property
    def confidence(self) -> float:
        return self._detected()[1]

    def _detected(self) -> tuple[str, float]:
        # Once, on first use (documents dropped early never need it), from the text as
        # normalized, so a step that rewrites lines does not change the verdict.
        if self._language is None:
            self._language = detect(self.normalized) if self.detect_language else (UNKNOWN, 0.0)
        return self._language


# A step built for one slice: None keeps the document, a string drops it for that reason.
Check = Callable[[Document], str | None]


@dataclass
class Options:
    """Engine settings the Dataset spec does not carry (the benchmark and tests set them)."""

    rules: QualityRules | None = None  # None: from spec.processing.filters
    detect_language: bool = True
    steps: Registry | None = None  # None: the standard pipeline (data.steps.PIPELINE)
    llm_cache: Path | None = None  # answers of language models; None: <work>/llm-cache
    slice_bytes: int | None = None  # piece size (data.pieces); None: spec.sliceBytes
    unit_bytes: int | None = None  # text per tokenize unit (data.prepare_stage)
    tokenizer_sample_bytes: int | None = None  # the tokenizer's training sample budget


# (the step's spec field, the options, the step's counters) -> its check; None: switched off.
Build = Callable[[Any, Options, Counter[str]], Check | None]


@dataclass(frozen=True)
class Counters:
    """Counters a step keeps (e.g. replacements), summed over slices: their key in a slice's
    stats.json and in the step's entry of the merged statistics."""

    slice_key: str
    report_key: str


@dataclass(frozen=True)
class Step:
    """One step of the pipeline: its name in the statistics, its configuration and checks."""

    name: str
    field: str  # the DatasetSpec attribute that configures the step, e.g. processing.filters
    reasons: frozenset[str]  # every reason the step may drop a document for
    # None: no check per document in the slice's loop (the dedup stage's near-duplicate search,
    # the slice's language-model stage, data.synthetic)
    build: Build | None = None
    counters: Counters | None = None

    def config(self, spec: DatasetSpec) -> Any:
        return operator.attrgetter(self.field)(spec)


class Registry:
    """The document steps in pipeline order."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.steps = tuple(steps)
        owners: dict[str, str] = {}
        for step in self.steps:
            if any(s.name == step.name for s in self.steps if s is not step):
                raise ValueError(f"two steps are named {step.name!r}")
            for reason in step.reasons:
                owner = owners.setdefault(reason, step.name)
                if reason == KEPT or owner != step.name:
                    raise ValueError(f"step {step.name!r}: drop reason {reason!r} is taken")
        self._owners = owners

    def step_of(self, reason: str) -> str:
        try:
            return self._owners[reason]
        except KeyError:
            raise ValueError(f"drop reason {reason!r} belongs to no step") from None

    def with_step(self, step: Step, before: str | None = None) -> Registry:
        """A registry with `step` added before the step named `before` (last when None)."""
        names = [s.name for s in self.steps]
        at = len(names) if before is None else names.index(before)
        return Registry((*self.steps[:at], step, *self.steps[at:]))

    def build(self, spec: DatasetSpec, options: Options) -> Checks:
        return Checks(self, spec, options)


class Checks:
    """The steps built for one slice: judges documents in order, keeps every step's counters."""

    def __init__(self, registry: Registry, spec: DatasetSpec, options: Options) -> None:
        self._steps = registry.steps
        self._counters: dict[str, Counter[str]] = {s.name: Counter() for s in self._steps}
        self._checks: list[tuple[Step, Check]] = []
        for step in self._steps:
            if step.build is not None:
                check = step.build(step.config(spec), options, self._counters[step.name])
                if check is not None:
                    self._checks.append((step, check))

    def __call__(self, document: Document) -> str | None:
        """The drop reason of the first step that drops the document, else None."""
        for step, check in self._checks:
            reason = check(document)
            if reason is not None:
                # An undeclared reason could not be attributed to its step in the statistics.
                if reason not in step.reasons:
                    raise ValueError(f"step {step.name!r} gave undeclared reason {reason!r}")
                return reason
        return None

    def counter(self, step: str) -> Counter[str]:
        """The counters of the step named `step` (a step without a check keeps them too)."""
        return self._counters[step]

    def counters(self) -> dict[str, dict[str, int]]:
        """Every counting step's counters, under their stats.json key."""
        return {
            s.counters.slice_key: dict(self._counters[s.name])
            for s in self._steps
            if s.counters is not None
        }
