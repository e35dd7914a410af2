"""PII: replace e-mail addresses, phone numbers, IP addresses and card numbers with
placeholders. Each pattern runs only when a cheap character test says it could match."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ip-address": "<IP_ADDRESS>",
    "credit-card": "<CREDIT_CARD>",
}
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])"
)
_IPV6 = re.compile(
    r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"
    r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4}(?![\w:])"
)
# International (+CC ...) or North-American/European grouped numbers with separators:
# plain digit runs (years, verse numbers, counts) are left alone.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w])"
)
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")


def _luhn(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class PiiScrubber:
    def __init__(self, kinds: Iterable[str]) -> None:
        self.kinds = set(kinds)
        self.counts: Counter[str] = Counter()

    def __call__(self, text: str) -> str:
        kinds = self.kinds
        if "email" in kinds and "@" in text:
            text, n = _EMAIL.subn(PLACEHOLDERS["email"], text)
            self.counts["email"] += n
        if "ip-address" in kinds:
            if "." in text:
                text, n = _IPV4.subn(PLACEHOLDERS["ip-address"], text)
                self.counts["ip-address"] += n
            if "::" in text or text.count(":") >= 7:
                text, n = _IPV6.subn(PLACEHOLDERS["ip-address"], text)
                self.counts["ip-address"] += n
        if "credit-card" in kinds:
            text = _CARD.sub(self._card, text)
        if "phone" in kinds:
            text, n = _PHONE.subn(PLACEHOLDERS["phone"], text)
            self.counts["phone"] += n
        return text

    def _card(self, match: re.Match[str]) -> str:
        if _luhn(match.group()):
            self.counts["credit-card"] += 1
            return PLACEHOLDERS["credit-card"]
        return match.group()
