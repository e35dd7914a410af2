"""Language identification with CLD2 (pycld2): its model is compiled into the wheel, so
nothing is downloaded, and it takes tens of microseconds per document."""

from __future__ import annotations

import re

import pycld2

UNKNOWN = "unknown"
_MAX_CHARS = 20_000  # a prefix decides the language; long books need not be read whole
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def detect(text: str) -> tuple[str, float]:
    """ISO 639-1 (or -3) code and a confidence in [0, 1]; (`unknown`, 0) when undecided."""
    sample = text[:_MAX_CHARS]
    try:
        reliable, _, details = pycld2.detect(sample)
    except (pycld2.error, ValueError):  # invalid UTF-8 (lone surrogates) among them
        try:
            reliable, _, details = pycld2.detect(_UNPRINTABLE.sub(" ", sample))
        except (pycld2.error, ValueError):
            return UNKNOWN, 0.0
    _, code, percent, _ = details[0]
    if code in ("un", "xx", "xxx"):
        return UNKNOWN, 0.0
    confidence = percent / 100 * (1.0 if reliable else 0.5)
    return code.split("-")[0].lower(), confidence
