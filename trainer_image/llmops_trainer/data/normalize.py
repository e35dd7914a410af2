"""Normalize: Unicode form, control characters, line ends and whitespace."""

from __future__ import annotations

import re
import unicodedata

from llmops.api.dataset import Normalization

# C0/C1 controls except tab and newline, plus zero-width and BOM characters that only
# break word boundaries; U+FFFD (decoding errors) goes too.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff\ufffd]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_LINE_EDGES = re.compile(r" ?\n ?")
_BLANK_RUNS = re.compile(r"\n{3,}")
# Common mojibake from UTF-8 bytes decoded as cp1252, fixed without a model.
_MOJIBAKE = {
    "\u00e2\u20ac\u2122": "\u2019",
    "\u00e2\u20ac\u0153": "\u201c",
    "\u00e2\u20ac\u009d": "\u201d",
    "\u00e2\u20ac\u201c": "\u2013",
    "\u00e2\u20ac\u201d": "\u2014",
    "\u00e2\u20ac\u00a6": "\u2026",
    "\u00c3\u00a9": "\u00e9",
    "\u00c3\u00a8": "\u00e8",
    "\u00c3\u00bc": "\u00fc",
    "\u00c3\u00b6": "\u00f6",
    "\u00c3\u00a4": "\u00e4",
}
_MOJIBAKE_RE = re.compile("|".join(map(re.escape, _MOJIBAKE)))


class Normalizer:
    def __init__(self, config: Normalization) -> None:
        self.form = None if config.unicode == "none" else config.unicode
        self.lowercase = config.lowercase
        self.collapse = config.collapse_whitespace

    def __call__(self, text: str) -> str:
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.isascii():
            if "\u00c3" in text or "\u00e2" in text:
                text = _MOJIBAKE_RE.sub(lambda m: _MOJIBAKE[m.group()], text)
            if self.form is not None:
                text = unicodedata.normalize(self.form, text)
        text = _CONTROL.sub("", text)
        if self.lowercase:
            text = text.lower()
        if self.collapse:
            text = _SPACES.sub(" ", text)
            text = _LINE_EDGES.sub("\n", text)
            text = _BLANK_RUNS.sub("\n\n", text)
        return text.strip()
