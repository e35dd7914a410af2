"""Text around the token stream: tokenizers, incremental detokenization, stop strings and the
chat template. No torch here, so all of it is unit-tested as plain functions."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from llmops_trainer.data.tokenize import byte_alphabet

# Chat messages are rendered as `role: content` lines and the model continues after
# `assistant:`; a model fine-tuned on this layout learns to stop before the next turn, and the
# server stops there anyway, so an untuned model cannot speak for the user.

CHAT_STOPS = ("\nuser:", "\nsystem:")


class TextTokenizer(Protocol):
    # No token spans more characters than this (None: unknown), so a text of more than
    # n * max_token_chars characters has more than n tokens; lets the server refuse an
    # oversized prompt after tokenizing a bounded prefix of it.
    max_token_chars: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (for log-probabilities)."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (part of a character, possibly)."""
        ...


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable character table of byte-level BPE."""
    return {char: b for b, char in enumerate(byte_alphabet())}


class HFTokenizer:
    """A `tokenizers` tokenizer.json, used the way the preprocessing engine used it."""

    def __init__(self, tokenizer: object) -> None:
        from tokenizers import Tokenizer

        assert isinstance(tokenizer, Tokenizer)
        self._tokenizer = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.max_token_chars: int | None = max((len(t) for t in vocab), default=1) or 1
        self._byte_level = "ByteLevel" in type(tokenizer.decoder).__name__ or str(
            tokenizer.decoder
        ).startswith("ByteLevel")
        self._bytes = _byte_decoder() if self._byte_level else {}

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_text(self, token_id: int) -> str:
        return str(self._tokenizer.decode([token_id], skip_special_tokens=False))

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.id_to_token(token_id)
        if self._byte_level and piece is not None and all(c in self._bytes for c in piece):
            return bytes(self._bytes[c] for c in piece)
        return self.token_text(token_id).encode("utf-8")


class NumericTokenizer:
    """Token ids written as space-separated numbers: what a model without a tokenizer.json (a
    dataset tokenized elsewhere) can still be served with."""

    max_token_chars: int | None = None  # any amount of whitespace between ids

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if not word.isdecimal() or int(word) >= self.vocab_size:
                raise ValueError(
                    f"this model has no tokenizer: the prompt must be token ids below "
                    f"{self.vocab_size} separated by spaces, got {word[:20]!r}"
                )
            ids.append(int(word))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(f" {i}" for i in ids)

    def token_text(self, token_id: int) -> str:
        return f" {token_id}"

    def token_bytes(self, token_id: int) -> bytes:
        return self.token_text(token_id).encode()


class IncrementalDecoder:
    """Text deltas of a growing token sequence.

    Decoding token by token breaks multi-byte characters and merges that depend on neighbours,
    so each step decodes a short window ending at the new token and emits only what the new
    token added, holding back while the window ends in an incomplete character (the same
    scheme as TGI's and vLLM's detokenizers).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the window
        self._read = 0  # tokens up to here have been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]


class StopMatcher:
    """Finds stop strings in streamed text. Text that may be the beginning of a stop string is
    held back until it is clear, so a client never receives part of a stop sequence."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        if not self._stops:
            return text, False
        buffer = self._pending + text
        # The stop string that is complete first wins (the one a token-by-token stream would
        # meet first), whatever the size of the pieces pushed.
        hits = [(i + len(s), i) for s in self._stops if (i := buffer.find(s)) >= 0]
        if hits:
            self._pending = ""
            return buffer[: min(hits)[1]], True
        hold = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), hold, -1):
                if buffer.endswith(stop[:size]):
                    hold = size
                    break
        self._pending = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text


class ChatTemplate:
    """A model's own chat template, rendered by `transformers` exactly as the Dataset rendered
    the chats it was fine-tuned on."""

    FILES = ("chat_template.jinja", "chat_template.json")

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def of(cls, folder: Path) -> ChatTemplate | None:
        config = folder / "tokenizer_config.json"
        declared = config.is_file() and "chat_template" in json.loads(config.read_text())
        if not declared and not any((folder / name).is_file() for name in cls.FILES):
            return None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(tokenizer) if getattr(tokenizer, "chat_template", None) else None

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt text, ending where the assistant's reply begins. A template that
        refuses the conversation (roles out of order, say) raises ValueError."""
        from jinja2 import TemplateError

        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            text = self._tokenizer.apply_chat_template(  # type: ignore[attr-defined]
                conversation, add_generation_prompt=True, tokenize=False
            )
        except TemplateError as error:
            raise ValueError(f"messages: {error}") from error
        return str(text)


def chat_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """The prompt for (role, content) messages."""
    lines = [f"{role}: {content}" for role, content in messages]
    return "\n".join([*lines, "assistant:"])
