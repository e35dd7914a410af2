"""Chats: validate `{role, content}` message lists, render them with a model's chat template
and mark the tokens the loss covers (the assistant's).

A chat is rendered once with its real contents and once with a placeholder in place of
every content. The placeholder rendering is the template's layout (role headers, turn
separators, where each message lands, including templates that move the system prompt into
a user turn); aligning it with the real rendering gives the exact character span of every
assistant content, whatever text the template puts around it and whether or not it trims
contents. Those spans become tokens through the tokenizer's offsets: a token is trained on
(mask 1) when it overlaps an assistant content, and so is the special token that ends the
turn right after it (`<|im_end|>`, `<|eot_id|>`, `</s>`; whitespace between them too), so
the model learns to stop. System, user and tool text and all the template's own text stay 0.

This needs no `{% generation %}` markers in the template (most models' templates have none)
and, unlike rendering growing prefixes of the chat, still works with templates that render
earlier turns differently once a later turn follows (reasoning models drop old reasoning).
A template whose rendering cannot be aligned (one that rewrites contents beyond trimming)
raises ChatTemplateError naming the model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

ROLES = frozenset({"system", "user", "assistant", "tool"})
ASSISTANT = "assistant"
# Private-use code points: no template emits them, no tokenizer normalizer folds them.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")

Message = tuple[str, str]  # (role, content)


class ChatTemplateError(ValueError):
    """The model's chat template renders a chat in a way the loss mask cannot follow."""


def parse_messages(value: Any) -> list[Message] | None:
    """A chat as the Hugging Face datasets library exports it: a non-empty list of objects
    with a string `role` (system, user, assistant, tool) and a string `content`; other keys
    are ignored. None when the value is anything else."""
    if not isinstance(value, list) or not value:
        return None
    messages: list[Message] = []
    for item in value:
        if not isinstance(item, dict):
            return None
        role, content = item.get("role"), item.get("content")
        if not isinstance(role, str) or role not in ROLES or not isinstance(content, str):
            return None
        messages.append((role, content))
    return messages


def contents(messages: Sequence[Message]) -> str:
    """The text of a chat as the quality filters and near-duplicate detection see it."""
    return "\n".join(content for _, content in messages)


def _variants(content: str) -> list[str]:
    """What a template may make of a content: itself, or trimmed (`| trim`, `.strip()`)."""
    out: list[str] = []
    for variant in (
        content,
        content.strip(),
        content.strip("\n"),
        content.lstrip(),
        content.rstrip(),
        content.lstrip("\n"),
        content.rstrip("\n"),
    ):
        if variant not in out:
            out.append(variant)
    return out


def align(layout: str, rendered: str, messages: Sequence[Message]) -> dict[int, tuple[int, int]]:
    """Character span in `rendered` of every message content the template placed, by
    message index, from the `layout` rendered with placeholders. Raises ChatTemplateError
    when the two renderings do not line up."""
    pieces = _PLACEHOLDER.split(layout)  # literal, index, literal, index, ..., literal
    literals, indices = pieces[0::2], [int(i) for i in pieces[1::2]]
    if len(set(indices)) != len(indices) or any(i >= len(messages) for i in indices):
        raise ChatTemplateError("the template renders a message more than once")
    if not rendered.startswith(literals[0]):
        raise ChatTemplateError("the template renders this chat with a different layout")
    spans: dict[int, tuple[int, int]] = {}
    cursor = len(literals[0])
    for number, index in enumerate(indices):
        following = literals[number + 1]
        last = number == len(indices) - 1
        for variant in _variants(messages[index][1]):
            end = cursor + len(variant)
            if not rendered.startswith(variant, cursor):
                continue
            if (rendered[end:] == following) if last else rendered.startswith(following, end):
                spans[index] = (cursor, end)
                cursor = end + len(following)
                break
        else:
            raise ChatTemplateError(
                f"the template changes the content of message {index} "
                f"({messages[index][0]}) beyond trimming it"
            )
    return spans


class ChatEncoder:
    """Renders chats with a model's chat template (transformers) and tokenizes them with
    the model's `tokenizer.json` (the tokenizer the shards, the trainer and the server
    use), with an assistant-only loss mask."""

    def __init__(self, folder: Path, tokenizer: Tokenizer, eos_id: int) -> None:
        from transformers import AutoTokenizer

        self.folder = folder
        self.tokenizer = tokenizer
        self.template = AutoTokenizer.from_pretrained(str(folder))
        self.stops = {eos_id} | {
            token_id
            for token_id, added in tokenizer.get_added_tokens_decoder().items()
            if added.special
        }

    def render(self, messages: Sequence[Message]) -> str:
        """The chat as the template renders it (no generation prompt: it ends with the
        last message)."""
        chat = [{"role": role, "content": content} for role, content in messages]
        text = self.template.apply_chat_template(chat, tokenize=False)
        if not isinstance(text, str):
            raise ChatTemplateError(f"the chat template of {self.folder} did not render text")
        return text

    def spans(self, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered chat and the character spans of its assistant contents."""
        rendered = self.render(messages)
        layout = self.render(
            [(role, f"{_OPEN}{i}{_CLOSE}") for i, (role, _) in enumerate(messages)]
        )
        try:
            placed = align(layout, rendered, messages)
        except ChatTemplateError as error:
            raise ChatTemplateError(
                f"chat template of the model in {self.folder}: {error}; the assistant-only "
                "loss mask cannot be computed for this chat"
            ) from None
        assistant = [
            placed[i] for i, (role, _) in enumerate(messages) if role == ASSISTANT and i in placed
        ]
        return rendered, assistant

    def encode(
        self, chats: Sequence[Sequence[Message]]
    ) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]]:
        """Token ids of every rendered chat and its loss mask (1: assistant content and the
        end of its turn)."""
        rendered = [self.spans(messages) for messages in chats]
        encodings = self.tokenizer.encode_batch(
            [text for text, _ in rendered], add_special_tokens=False
        )
        out = []
        for (text, spans), encoding in zip(rendered, encodings, strict=True):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            out.append((ids, self._mask(text, encoding.ids, encoding.offsets, spans)))
        return out

    def _mask(
        self,
        text: str,
        ids: list[int],
        offsets: list[tuple[int, int]],
        spans: list[tuple[int, int]],
    ) -> npt.NDArray[np.uint8]:
        mask = np.zeros(len(ids), dtype=np.uint8)
        if not ids:
            return mask
        starts = np.fromiter((s for s, _ in offsets), np.int64, len(offsets))
        ends = np.fromiter((e for _, e in offsets), np.int64, len(offsets))
        for begin, end in spans:
            # Tokens overlapping the content (an empty-width token counts where it starts).
            inside = (starts < end) & ((ends > begin) | ((starts == ends) & (starts >= begin)))
            mask[inside] = 1
            # The end of the turn: the first special token after the content, with only
            # whitespace between them.
            after = int(np.searchsorted(starts, end, side="left"))
            pending: list[int] = []
            while after < len(ids):
                if ids[after] in self.stops:
                    mask[pending] = 1
                    mask[after] = 1
                    break
                if text[starts[after] : ends[after]].strip():
                    break
                pending.append(after)
                after += 1
        return mask
