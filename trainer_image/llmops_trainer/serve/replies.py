"""Response bodies from the engine's events: whole completions and chat completions, their
streamed chunks, and the log-probabilities in OpenAI's two shapes (the legacy completions
object with `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`; chat's `content` list).
No HTTP here."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmops_trainer.serve.engine import Delta, Done, Event, PromptLogprobs
from llmops_trainer.serve.sampling import TokenLogprob
from llmops_trainer.serve.text import TextTokenizer


class TokenNames:
    """How tokens are named in log-probabilities: their text, or vLLM's `token_id:<id>`."""

    def __init__(self, tokenizer: TextTokenizer, as_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self._cache: dict[int, str] = {}

    def name(self, token: int) -> str:
        if self.as_ids:
            return f"token_id:{token}"
        found = self._cache.get(token)
        if found is None:
            found = self._cache[token] = self.tokenizer.token_text(token)
        return found

    def completion(
        self, ids: Sequence[int], entries: Sequence[TokenLogprob | None], offset: int
    ) -> tuple[dict[str, list[Any]], int]:
        """The legacy logprobs object of tokens `ids` (entries aligned with them; None where
        a token has no log-probability), their text starting at character `offset`; and the
        offset after them. Each position's top_logprobs includes the chosen token (as vLLM's)."""
        body: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for token, entry in zip(ids, entries, strict=True):
            name = self.name(token)
            body["tokens"].append(name)
            body["text_offset"].append(offset)
            offset += len(self.tokenizer.token_text(token))
            if entry is None:
                body["token_logprobs"].append(None)
                body["top_logprobs"].append(None)
                continue
            top = {self.name(t): lp for t, lp in entry.top}
            top.setdefault(name, entry.logprob)
            body["token_logprobs"].append(entry.logprob)
            body["top_logprobs"].append(top)
        return body, offset

    def chat(self, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        """Chat's `logprobs.content` entries."""
        return [
            {
                **self._one(entry.token, entry.logprob),
                "top_logprobs": [self._one(t, lp) for t, lp in entry.top],
            }
            for entry in entries
        ]

    def _one(self, token: int, logprob: float) -> dict[str, Any]:
        return {
            "token": self.name(token),
            "logprob": logprob,
            "bytes": list(self.tokenizer.token_bytes(token)),
        }


@dataclass
class Choice:
    """One generated sequence's events, as they arrive."""

    prompt: int  # index of its prompt in the request
    prompt_ids: list[int]
    text: list[str] = field(default_factory=list)
    entries: list[TokenLogprob] = field(default_factory=list)
    prompt_entries: tuple[TokenLogprob | None, ...] | None = None
    done: Done | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, Delta):
            self.text.append(event.text)
            self.entries.extend(event.logprobs)
        elif isinstance(event, PromptLogprobs):
            self.prompt_entries = event.entries
        else:
            self.done = event

    @property
    def score(self) -> float:
        """Cumulative log-probability of the generated tokens (best_of ranks by it)."""
        if self.done is None or self.done.cumulative_logprob is None:
            return 0.0
        return self.done.cumulative_logprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse_event(payload: Any) -> str:
    """One server-sent event carrying `payload` as compact JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class Reply:
    """The bodies of one request, in the completion or the chat shape."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._templates: dict[int, tuple[str, str]] = {}  # text_event's, by choice index

    def head(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, choices: list[dict[str, Any]], counts: dict[str, int]) -> dict[str, Any]:
        return {**self.head(chunk=False), "choices": choices, "usage": counts}

    def chunk(
        self,
        index: int,
        content: str | None,
        finish: str | None,
        logprobs: Any = None,
        role: bool = False,
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if content:
                delta["content"] = content
            elif role:
                delta["content"] = ""
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": content or "", "logprobs": logprobs}
        choice["finish_reason"] = finish
        return {**self.head(chunk=True), "choices": [choice]}

    def text_event(self, index: int, text: str) -> str:
        """The server-sent event of `chunk(index, text, None)` (text without log-probabilities:
        one per token of a stream), from a template of the rest, which never changes: the
        event loop encodes only the text."""
        template = self._templates.get(index)
        if template is None:
            marker = uuid.uuid4().hex
            rendered = sse_event(self.chunk(index, marker, None))
            before, after = rendered.split(json.dumps(marker), 1)
            template = self._templates[index] = (before, after)
        return f"{template[0]}{json.dumps(text)}{template[1]}"

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        return {**self.head(chunk=True), "choices": [], "usage": counts}
