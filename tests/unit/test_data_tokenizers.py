"""The byte and character tokenizers (tokenizer.byte, tokenizer.char): exact round trips,
special tokens, vocabulary sizes and ids, and what the engine writes with them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from data_corpus import document
from pydantic import ValidationError
from tokenizers import Tokenizer

from llmops.api.dataset import ByteTokenizer, CharTokenizer, Dataset, DatasetSpec
from llmops_trainer.data import run_local
from llmops_trainer.data import tokenize as tok
from llmops_trainer.shards import open_tokens

TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
    "Tabs\tand  double spaces, CRLF\r\nline ends, trailing space ",
    "Accents: caf\u00e9, e\u0301, \u00fcber; CJK \u65e5\u672c\u8a9e; "
    "emoji \U0001f389\U0001f468\u200d\U0001f469",
    "Controls \x00\x07\x1b[0m and text that looks special but is not: <|endoftext| <|pad",
]


def _saved(tokenizer: Tokenizer, tmp_path: Path) -> Tokenizer:
    """What the trainer and the server get: the tokenizer.json, loaded with `tokenizers`."""
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return Tokenizer.from_file(str(path))


def _round_trip(tokenizer: Tokenizer, text: str) -> str:
    return str(tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids))


def test_byte_tokenizer_ids_are_the_utf8_bytes_and_round_trip_exactly(tmp_path: Path) -> None:
    tokenizer = _saved(tok.byte_level(ByteTokenizer()), tmp_path)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == list(text.encode("utf-8"))
        assert _round_trip(tokenizer, text) == text
    assert tok.vocab_size(tokenizer) == 258  # 256 bytes, <|endoftext|>, <|pad|>
    assert tokenizer.token_to_id("<|endoftext|>") == 256
    assert tokenizer.token_to_id("<|pad|>") == 257
    assert tok.eos_id(tokenizer, ["<|endoftext|>", "<|pad|>"]) == 256


def test_byte_tokenizer_special_tokens(tmp_path: Path) -> None:
    config = ByteTokenizer(special_tokens=["<eos>", "<sep>", "<mask>"])
    tokenizer = _saved(tok.byte_level(config), tmp_path)
    assert tok.vocab_size(tokenizer) == 259
    assert tok.eos_id(tokenizer, list(config.special_tokens)) == 256
    # A special token in the text is one token, dropped when decoding (as with trained BPE).
    ids = tokenizer.encode("a<sep>b", add_special_tokens=False).ids
    assert ids == [97, 257, 98]
    assert tokenizer.decode(ids) == "ab"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "a<sep>b"


SHAKESPEARE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
)


def test_char_tokenizer_numbers_characters_as_nanogpt_does(tmp_path: Path) -> None:
    tokenizer = _saved(tok.characters([SHAKESPEARE], CharTokenizer()), tmp_path)
    chars = sorted(set(SHAKESPEARE))  # nanoGPT's shakespeare_char/prepare.py
    stoi = {c: i for i, c in enumerate(chars)}
    assert tokenizer.encode(SHAKESPEARE, add_special_tokens=False).ids == [
        stoi[c] for c in SHAKESPEARE
    ]
    # The characters, then the fallback, then the special tokens.
    assert tokenizer.token_to_id(tok.UNKNOWN) == len(chars)
    assert tokenizer.token_to_id("<|endoftext|>") == len(chars) + 1
    assert tok.vocab_size(tokenizer) == len(chars) + 3
    assert _round_trip(tokenizer, SHAKESPEARE) == SHAKESPEARE


def test_char_tokenizer_unknown_token_fallback(tmp_path: Path) -> None:
    tokenizer = _saved(tok.characters(["abc ab"], CharTokenizer()), tmp_path)
    ids = tokenizer.encode("cab\u00e9 z", add_special_tokens=False).ids
    unknown = tokenizer.token_to_id(tok.UNKNOWN)
    assert ids == [3, 1, 2, unknown, 0, unknown]  # " " sorts before the letters
    assert tokenizer.decode(ids) == "cab<|unk|> <|unk|>"


def test_char_tokenizer_bytes_fallback_round_trips_unseen_characters(tmp_path: Path) -> None:
    config = CharTokenizer(fallback="bytes")
    tokenizer = _saved(tok.characters(["plain ascii text"], config), tmp_path)
    seen = len(set("plain ascii text"))
    assert tok.vocab_size(tokenizer) == seen + 256 + 2
    assert tokenizer.token_to_id("<0x00>") == seen
    assert tokenizer.token_to_id("<|endoftext|>") == seen + 256
    for text in TEXTS:
        assert _round_trip(tokenizer, text) == text
    ids = tokenizer.encode("t\u00e9", add_special_tokens=False).ids
    assert ids == [tokenizer.token_to_id("t"), seen + 0xC3, seen + 0xA9]


def test_char_tokenizer_min_frequency_and_special_tokens(tmp_path: Path) -> None:
    config = CharTokenizer(min_frequency=2, special_tokens=["<eos>", "x"])
    tokenizer = _saved(tok.characters(["aab", "xx"], config), tmp_path)
    assert tokenizer.get_vocab(with_added_tokens=False) == {"a": 0, tok.UNKNOWN: 1}
    assert tokenizer.token_to_id("<eos>") == 2 and tokenizer.token_to_id("x") == 3
    assert tokenizer.decode(tokenizer.encode("ab", add_special_tokens=False).ids) == "a<|unk|>"


def _dataset(path: Path, tokenizer: dict[str, Any], **spec: Any) -> Dataset:
    return Dataset.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "t"},
            "spec": {
                "sources": [{"name": "s", "path": str(path)}],
                "tokenizer": tokenizer,
                "processing": {"filters": {"minStopWords": 0}},
                "split": {"mode": "contiguous", "train": 0.75, "validation": 0.25, "test": 0},
                **spec,
            },
        }
    )


@pytest.mark.parametrize(
    ("tokenizer", "card"),
    [
        ({"byte": {}}, "bytes (256 tokens)"),
        ({"char": {}}, "other characters become `<|unk|>`"),
        ({"char": {"fallback": "bytes"}}, "other characters become their UTF-8 bytes"),
    ],
)
def test_the_engine_writes_a_tokenizer_the_shards_decode_with(
    tmp_path: Path, tokenizer: dict[str, Any], card: str
) -> None:
    rng = random.Random(3)
    docs = [document(rng, 6) for _ in range(8)]
    docs[6] += " Caf\u00e9 \u00fcber na\u00efve."  # characters only the validation split has
    (tmp_path / "in.txt").write_text("\n\n".join(docs))
    manifest = run_local(_dataset(tmp_path / "in.txt", tokenizer), tmp_path / "o", 1)
    loaded = Tokenizer.from_file(str(tmp_path / "o" / manifest.tokenizer))
    assert manifest.vocab_size == tok.vocab_size(loaded) == manifest.stats["vocabSize"]
    assert manifest.eos_token_id == loaded.token_to_id("<|endoftext|>")
    assert manifest.dtype == "uint16"
    if "char" in tokenizer:
        train_chars = set("".join(docs[:6]))
        fallback = 256 if tokenizer["char"].get("fallback") == "bytes" else 1
        assert manifest.vocab_size == len(train_chars) + fallback + 2
    else:
        assert manifest.vocab_size == 258
    decoded = {}
    for split in ("train", "validation"):
        ids = np.concatenate(
            [open_tokens(tmp_path / "o", manifest, s) for s in manifest.splits[split].shards]
        )
        parts = np.split(ids, np.flatnonzero(ids == manifest.eos_token_id) + 1)[:-1]
        decoded[split] = [loaded.decode(p[:-1].tolist()) for p in parts]
    assert decoded["train"] == docs[:6]
    if tokenizer == {"char": {}}:  # characters the training split lacks decode as <|unk|>
        seen = set("".join(docs[:6]))
        unk = ["".join(c if c in seen else tok.UNKNOWN for c in d) for d in docs[6:]]
        assert unk[0].endswith(" <|unk|>ber na<|unk|>ve.")
        assert decoded["validation"] == unk
    else:
        assert decoded["validation"] == docs[6:]
    assert card in (tmp_path / "o" / "README.md").read_text()


@pytest.mark.parametrize(
    ("tokenizer", "message"),
    [
        ({"byte": {}, "char": {}}, "exactly one of train, byte, char, path"),
        ({"byte": {}, "train": {}}, "exactly one of train, byte, char, path"),
        ({"byte": {"specialTokens": []}}, "tokenizer.byte.specialTokens"),
        ({"char": {"specialTokens": []}}, "tokenizer.char.specialTokens"),
        ({"char": {"fallback": "drop"}}, "tokenizer.char.fallback"),
        ({"char": {"minFrequency": 0}}, "tokenizer.char.minFrequency"),
        ({"byte": {"vocabSize": 256}}, "tokenizer.byte.vocabSize"),
    ],
)
def test_tokenizer_admission(tokenizer: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as raised:
        DatasetSpec.model_validate(
            {"sources": [{"name": "s", "path": "x"}], "tokenizer": tokenizer}
        )
    assert message in str(raised.value).replace("\n  ", ".").replace("\n", " ")


def test_byte_and_char_take_their_defaults_from_an_empty_object() -> None:
    spec = DatasetSpec.model_validate(
        {"sources": [{"name": "s", "path": "x"}], "tokenizer": {"char": {}}}
    )
    assert spec.tokenizer.char == CharTokenizer()
    assert spec.tokenizer.char.fallback == "unknown-token"
    assert spec.tokenizer.char.special_tokens == ["<|endoftext|>", "<|pad|>"]
    assert spec.to_dict()["tokenizer"] == {
        "char": {
            "specialTokens": ["<|endoftext|>", "<|pad|>"],
            "minFrequency": 1,
            "fallback": "unknown-token",
        }
    }
