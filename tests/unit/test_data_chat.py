"""Chats: message validation, rendering with a model's chat template and the assistant-only
loss mask, checked token by token against transformers' own rendering and tokenization."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from tokenizers import Tokenizer

from llmops.api.dataset import Dataset, DatasetSpec
from llmops_trainer.data import run_local
from llmops_trainer.data.chat import ChatEncoder, ChatTemplateError, Message, parse_messages
from llmops_trainer.data.collect import MALFORMED_CHAT, UNREADABLE, read_documents
from llmops_trainer.data.dedup import chat_hash
from llmops_trainer.data.registry import Document, Options
from llmops_trainer.data.steps import CHAT_TEMPLATE, NO_ASSISTANT, PIPELINE
from llmops_trainer.data.tokenize import load_model
from llmops_trainer.shards import open_mask, open_tokens

END = "<|im_end|>"
CHAT: list[Message] = [
    ("system", "You are a helpful assistant."),
    ("user", "what is the capital of france?"),
    ("assistant", "the capital of france is paris."),
    ("user", "count with me: one two three"),
    ("assistant", " four five six "),  # spaces the template keeps (or trims)
    ("user", "thanks"),
    ("assistant", "you are welcome"),
]

# Templates as real models write them, none with `{% generation %}` markers.
TRIMMING = (  # Llama 3: BOS first, contents trimmed, the end token right after
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n\\n' + m['content'] | trim + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n\\n' }}{% endif %}"
)
SYSTEM_IN_FIRST_TURN = (  # Gemma: no system role, roles must alternate, `model` turns
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{{ (first if loop.first else '') + m['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}"
)
SPACE_BEFORE_EOS = (  # Llama 2 / Mistral: `[INST]` blocks, a space and EOS after answers
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '<|im_start|>[INST] ' + m['content'] + ' [/INST]\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
REASONING = (  # Qwen3: the last answer gets an (empty) thinking block, earlier ones not
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
)
REWRITING = (  # changes contents: no mask can follow it
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | upper"
    " + '<|im_end|>\\n' }}{% endfor %}"
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures.tiny_llama import build

    return build(tmp_path_factory.mktemp("tiny-llama"))


def _with_template(model: Path, folder: Path, template: str) -> Path:
    """The fixture's tokenizer with another chat template."""
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(model / name, folder / name)
    (folder / "chat_template.jinja").write_text(template)
    return folder


def _encoder(folder: Path) -> ChatEncoder:
    loaded = load_model(folder)
    return ChatEncoder(loaded.folder, loaded.tokenizer, loaded.eos_id)


def _runs(tokenizer: Tokenizer, ids: npt.NDArray[Any], mask: npt.NDArray[Any]) -> list[str]:
    """The text of every run of consecutive trained tokens."""
    runs, current = [], []
    for token, bit in zip(ids.tolist(), mask.tolist(), strict=True):
        if bit:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    if current:
        runs.append(tokenizer.decode(current, skip_special_tokens=False))
    return runs


def test_multi_turn_mask_matches_transformers_token_by_token(model: Path) -> None:
    encoder = _encoder(model)
    ((ids, mask),) = encoder.encode([CHAT])
    chat = [{"role": role, "content": content} for role, content in CHAT]
    reference = encoder.template.apply_chat_template(
        chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    # The same tokens as transformers renders and tokenizes the chat...
    assert ids.tolist() == list(reference["input_ids"])
    # ...and loss exactly where the template's {% generation %} blocks put the assistant's
    # turns (an oracle this fixture has and the engine does not use).
    assert mask.tolist() == list(reference["assistant_masks"])
    assert mask.dtype == np.uint8 and mask.sum() > 0
    # Which is: each answer and the end of its turn; system, user and headers are 0.
    answers = [content + END for role, content in CHAT if role == "assistant"]
    assert _runs(encoder.tokenizer, ids, mask) == answers
    assert encoder.tokenizer.decode(ids.tolist(), skip_special_tokens=False) == (
        encoder.render(CHAT)
    )


@pytest.mark.parametrize(
    ("template", "answer"),
    [
        (TRIMMING, lambda content: content.strip() + END),
        (SPACE_BEFORE_EOS, lambda content: content + " " + END),
        (REASONING, lambda content: content + END),
    ],
    ids=["trimming", "space-before-eos", "reasoning"],
)
def test_templates_without_generation_markers(
    model: Path, tmp_path: Path, template: str, answer: Any
) -> None:
    encoder = _encoder(_with_template(model, tmp_path / "model", template))
    ((ids, mask),) = encoder.encode([CHAT])
    chat = [{"role": role, "content": content} for role, content in CHAT]
    reference = encoder.template.apply_chat_template(chat, tokenize=True, return_dict=True)
    assert ids.tolist() == list(reference["input_ids"])
    expected = [answer(content) for role, content in CHAT if role == "assistant"]
    assert _runs(encoder.tokenizer, ids, mask) == expected


def test_system_prompt_moved_into_the_first_turn(model: Path, tmp_path: Path) -> None:
    encoder = _encoder(_with_template(model, tmp_path / "model", SYSTEM_IN_FIRST_TURN))
    ((ids, mask),) = encoder.encode([CHAT])
    text = encoder.render(CHAT)
    assert text.startswith("<|im_start|>user\nYou are a helpful assistant.\n\nwhat is")
    expected = [content.strip() + END for role, content in CHAT if role == "assistant"]
    assert _runs(encoder.tokenizer, ids, mask) == expected


def test_a_template_that_rewrites_contents_is_refused(model: Path, tmp_path: Path) -> None:
    encoder = _encoder(_with_template(model, tmp_path / "model", REWRITING))
    with pytest.raises(ChatTemplateError, match=r"message 0 \(system\) beyond trimming"):
        encoder.encode([CHAT])


def test_chat_template_step_drops_chats_the_template_refuses(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _with_template(model, tmp_path / "model", SYSTEM_IN_FIRST_TURN)
    monkeypatch.delenv("LLMOPS_PRETRAINED_DIR", raising=False)  # the absolute uri is used
    spec = DatasetSpec.model_validate(
        {
            "sources": [{"name": "c", "path": "x", "format": "jsonl", "messagesField": "m"}],
            "processing": {"filters": {"quality": False, "repetition": False}},
            "tokenizer": {"fromModel": {"uri": str(folder)}},
        }
    )
    checks = PIPELINE.build(spec, Options(detect_language=False))

    def judge(messages: list[Message]) -> str | None:
        text = "\n".join(content for _, content in messages)
        digest = chat_hash(messages)
        document = Document(text, None, True, digest, text, False, messages=messages)
        return checks(document)

    assert judge(CHAT) is None
    # Two user turns in a row: the template raises; the chat is dropped, not the Dataset.
    assert judge([("user", "hello there"), ("user", "anyone?"), ("assistant", "yes")]) == (
        CHAT_TEMPLATE
    )
    assert judge([("system", "be brief"), ("user", "hello there")]) == NO_ASSISTANT


def test_a_dataset_of_chats_and_prompt_response_pairs(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLMOPS_PRETRAINED_DIR", raising=False)  # the absolute uri is used
    chats = [
        [("user", f"question number {i} about rivers"), ("assistant", f"answer {i} is a river")]
        for i in range(12)
    ]
    chats[0] = CHAT
    pairs = [(f"prompt number {i} about bridges", f"response {i} is a bridge") for i in range(12)]
    (tmp_path / "chats.jsonl").write_text(
        "".join(
            json.dumps({"messages": [{"role": r, "content": c} for r, c in chat]}) + "\n"
            for chat in chats
        )
    )
    (tmp_path / "pairs.jsonl").write_text(
        "".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in pairs)
    )
    dataset = Dataset.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "mixed"},
            "spec": {
                "sources": [
                    {
                        "name": "chats",
                        "path": str(tmp_path / "chats.jsonl"),
                        "format": "jsonl",
                        "messagesField": "messages",
                    },
                    {
                        "name": "pairs",
                        "path": str(tmp_path / "pairs.jsonl"),
                        "format": "jsonl",
                        "promptField": "q",
                        "responseField": "a",
                    },
                ],
                "processing": {
                    "filters": {"minWords": 1, "quality": False, "repetition": False},
                    "deduplication": {"near": {"enabled": False}},
                },
                "tokenizer": {"fromModel": {"uri": str(model)}},
                "split": {"train": 0.8, "validation": 0.1, "test": 0.1},
            },
        }
    )
    output = tmp_path / "out"
    manifest = run_local(dataset, output, 2)
    assert manifest.supervised and manifest.stats["documents"] == 24
    tokenizer = Tokenizer.from_file(str(output / "tokenizer.json"))
    runs: Counter[str] = Counter()
    for split in manifest.splits.values():
        for shard in split.shards:
            tokens = np.asarray(open_tokens(output, manifest, shard))
            mask = open_mask(output, shard)
            assert mask is not None
            runs.update(_runs(tokenizer, tokens, np.asarray(mask)))
    # Answers (normalized: stripped) with the end of their turn, the end-of-sequence token
    # after each chat (after the template's closing newline), responses of pairs with the
    # end-of-sequence token.
    expected: Counter[str] = Counter()
    for chat in chats:
        expected.update(content.strip() + END for role, content in chat if role == "assistant")
        expected[END] += 1
    expected.update(response + END for _, response in pairs)
    assert runs == expected


def test_the_content_hash_covers_the_whole_conversation() -> None:
    chat = [("user", "what is two and two"), ("assistant", "four")]
    assert chat_hash(chat) == chat_hash(list(chat))
    assert chat_hash(chat) != chat_hash([("system", "what is two and two"), chat[1]])
    assert chat_hash(chat) != chat_hash([("user", "what is two and"), ("assistant", "two four")])
    assert chat_hash(chat) != chat_hash([*chat, ("user", "thanks")])
    assert chat_hash(chat) != chat_hash([chat[0]])


@pytest.mark.parametrize(
    "value",
    [
        None,
        "hello",
        [],
        {"role": "user", "content": "hi"},
        ["hi"],
        [{"role": "user"}],
        [{"content": "hi"}],
        [{"role": "bot", "content": "hi"}],
        [{"role": "USER", "content": "hi"}],
        [{"role": 1, "content": "hi"}],
        [{"role": "assistant", "content": None}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [{"role": "user", "content": "hi"}, "assistant: hello"],
    ],
)
def test_malformed_messages_are_rejected(value: Any) -> None:
    assert parse_messages(value) is None


def test_messages_keep_role_and_content_only() -> None:
    value = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": "hello", "tool_calls": None},
        {"role": "tool", "content": "42"},
    ]
    assert parse_messages(value) == [
        ("system", "be brief"),
        ("user", "hi"),
        ("assistant", "hello"),
        ("tool", "42"),
    ]


def test_unreadable_chat_records_are_counted_not_fatal() -> None:
    spec = DatasetSpec.model_validate(
        {
            "sources": [{"name": "c", "path": "x", "format": "jsonl", "messagesField": "chat"}],
            "tokenizer": {"fromModel": {"uri": "/models/m"}},
        }
    )
    good = {"chat": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    lines = [
        json.dumps(good),
        '{"chat": [{"role": "user", "content": "torn',
        json.dumps({"chat": [{"role": "narrator", "content": "once"}]}),
        json.dumps({"other": 1}),
        "",
        json.dumps(good),
    ]
    data = ("\n".join(lines) + "\n").encode()
    source = spec.sources[0]
    counted = list(read_documents(io.BytesIO(data), source, unreadable=True))
    assert [d.unreadable for d in counted] == [
        None,
        UNREADABLE,
        MALFORMED_CHAT,
        MALFORMED_CHAT,
        None,
    ]
    assert counted[0].messages == [("user", "hi"), ("assistant", "yo")]
    # Without `unreadable`, the reader yields documents only (as before).
    assert len(list(read_documents(io.BytesIO(data), source))) == 2
    checks = PIPELINE.build(spec, Options(detect_language=False))
    reasons = Counter(
        checks(Document("", None, True, b"", "", False, unreadable=d.unreadable))
        for d in counted[1:4]
    )
    assert reasons == {UNREADABLE: 1, MALFORMED_CHAT: 2}
