from __future__ import annotations

import pytest

from llmops_trainer.data.pii import PiiScrubber


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail jane.doe+x@example.co.uk now", "mail <EMAIL> now"),
        ("call +1 415-555-0134 today", "call <PHONE> today"),
        ("call (415) 555-0134", "call <PHONE>"),
        ("host 192.168.10.254 up", "host <IP_ADDRESS> up"),
        ("v6 2001:db8:85a3::8a2e:370:7334 up", "v6 <IP_ADDRESS> up"),
        ("card 4111 1111 1111 1111 ok", "card <CREDIT_CARD> ok"),
    ],
)
def test_scrubs(text: str, expected: str) -> None:
    scrub = PiiScrubber(["email", "phone", "ip-address", "credit-card"])
    assert scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Genesis 1:1 and 3:16 in the year 1611, page 1234, version 3.11.2.",
        "card-like 4111111111111112 fails the Luhn check",
        "999.1.1.1 is no address",
    ],
)
def test_leaves_ordinary_numbers(text: str) -> None:
    scrub = PiiScrubber(["email", "phone", "ip-address", "credit-card"])
    assert scrub(text) == text


def test_only_selected_kinds_and_counts() -> None:
    scrub = PiiScrubber(["email"])
    assert scrub("a@b.org 10.0.0.1") == "<EMAIL> 10.0.0.1"
    assert scrub.counts["email"] == 1
