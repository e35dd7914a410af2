"""Incremental detokenization, stop strings, the chat template and the numeric tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmops_trainer.serve.text import (
    IncrementalDecoder,
    NumericTokenizer,
    StopMatcher,
    chat_prompt,
)


def byte_decode(ids: Sequence[int]) -> str:
    """A byte-level tokenizer: each id is one byte, as in byte-level BPE's base vocabulary."""
    return bytes(ids).decode("utf-8", errors="replace")


@given(st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_incremental_decoding_reassembles_multibyte_text(text: str) -> None:
    decoder = IncrementalDecoder(byte_decode)
    pieces = [decoder.push(b) for b in text.encode("utf-8")]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_incremental_decoding_holds_back_an_incomplete_character() -> None:
    decoder = IncrementalDecoder(byte_decode)
    euro = "€".encode()
    assert [decoder.push(b) for b in euro] == ["", "", "€"]


@given(
    st.text(alphabet="abc\n", max_size=30),
    st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), min_size=1, max_size=3),
    st.integers(min_value=1, max_value=5),
)
@settings(max_examples=300, deadline=None)
def test_stop_matching_equals_cutting_the_whole_text(
    text: str, stops: list[str], chunk: int
) -> None:
    """Streaming in chunks of any size gives exactly the text before the first stop string."""
    matcher = StopMatcher(stops)
    emitted, stopped = "", False
    for start in range(0, len(text), chunk):
        piece, stopped = matcher.push(text[start : start + chunk])
        emitted += piece
        if stopped:
            break
    if not stopped:
        emitted += matcher.flush()
    # The first stop string to be complete, reading the whole text left to right.
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    assert stopped == bool(hits)
    assert emitted == (text[: min(hits)[1]] if hits else text)


def test_stop_matcher_never_emits_part_of_a_stop_string() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("hello E") == ("hello ", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("D and more") == ("", True)


def test_empty_stop_strings_are_ignored() -> None:
    assert StopMatcher([""]).push("abc") == ("abc", False)


def test_chat_prompt_layout() -> None:
    prompt = chat_prompt([("system", "Be brief."), ("user", "Hi")])
    assert prompt == "system: Be brief.\nuser: Hi\nassistant:"


def test_numeric_tokenizer_round_trip_and_errors() -> None:
    tokenizer = NumericTokenizer(vocab_size=32)
    assert tokenizer.encode(" 1 2  31 ") == [1, 2, 31]
    assert tokenizer.decode([4, 5]) == " 4 5"
    for bad in ("1 32", "one", "-1"):
        with pytest.raises(ValueError, match="token ids below 32"):
            tokenizer.encode(bad)


def test_hf_tokenizer_token_bytes_and_width() -> None:
    from llmops.api.dataset import TokenizerTraining
    from llmops_trainer.data import tokenize
    from llmops_trainer.serve.text import HFTokenizer

    corpus = ["the euro € and the pound £ sign", "naïve café"] * 20
    tokenizer = HFTokenizer(tokenize.train(corpus, TokenizerTraining(vocab_size=300)))
    text = "the € café"
    ids = tokenizer.encode(text)
    # Byte-level pieces put back together are the text's bytes, even mid-character.
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode()
    assert "".join(tokenizer.token_text(i) for i in ids) == tokenizer.decode(ids)
    # No token is wider than max_token_chars: the server's cheap bound on a prompt's length.
    assert tokenizer.max_token_chars is not None
    assert len(text) <= tokenizer.max_token_chars * len(ids)
