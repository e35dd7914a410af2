"""An open-weights model's tokenizer folder as the engine reads it (tokenizer.fromModel)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from llmops.api.dataset import DatasetSpec
from llmops_trainer.data import tokenize as tok


def _folder(
    tmp_path: Path, vocab: int = 10, specials: tuple[str, ...] = ("<eos>", "<|eot|>"), **files: Any
) -> Path:
    words = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in specials])
    folder = tmp_path / "model"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    for name, content in files.items():
        path = folder / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def _spec(folder: Path, **spec: Any) -> DatasetSpec:
    return DatasetSpec.model_validate(
        {
            "sources": [{"name": "c", "path": "x", "format": "jsonl", "messagesField": "m"}],
            "tokenizer": {"fromModel": {"uri": str(folder)}},
            **spec,
        }
    )


@pytest.mark.parametrize(
    ("files", "eos"),
    [
        ({"tokenizer_config.json": {"eos_token": "<|eot|>"}}, "<|eot|>"),
        # Older transformers write the token as an object.
        ({"tokenizer_config.json": {"eos_token": {"content": "<eos>", "special": True}}}, "<eos>"),
        ({"generation_config.json": {"eos_token_id": [11, 10]}}, "<|eot|>"),
        ({"tokenizer_config.json": {}, "config.json": {"eos_token_id": 10}}, "<eos>"),
    ],
)
def test_the_end_of_sequence_token_is_the_model_s(
    tmp_path: Path, files: dict[str, Any], eos: str
) -> None:
    loaded = tok.load_model(_folder(tmp_path, **files))
    assert loaded.eos_id == loaded.tokenizer.token_to_id(eos)


def test_a_model_without_an_end_of_sequence_token_is_refused(tmp_path: Path) -> None:
    # The named token is not in the vocabulary, and no well-known one is either.
    config = {"tokenizer_config.json": {"eos_token": "</s>"}}
    with pytest.raises(ValueError, match="names no end-of-sequence token"):
        tok.load_model(_folder(tmp_path, specials=("<|eot|>",), **config))


def test_the_vocabulary_counts_added_tokens(tmp_path: Path) -> None:
    loaded = tok.load_model(_folder(tmp_path, vocab=300, **{"config.json": {"eos_token_id": 1}}))
    assert loaded.vocab_size == 302  # ids 0..301: the two added tokens sit above the words


@pytest.mark.parametrize(
    "files",
    [
        {"chat_template.jinja": "{{ messages }}"},
        {"chat_template.json": {"chat_template": "{{ messages }}"}},
        {"tokenizer_config.json": {"eos_token": "<eos>", "chat_template": "{{ messages }}"}},
        {"additional_chat_templates__tool_use.jinja": "{{ messages }}"},
    ],
)
def test_chat_templates_are_found_and_travel_with_the_dataset(
    tmp_path: Path, files: dict[str, Any]
) -> None:
    folder = _folder(tmp_path, **{"tokenizer_config.json": {"eos_token": "<eos>"}, **files})
    assert tok.load_model(folder).chat_template
    output = tmp_path / "out"
    copied = tok.copy_model_files(folder, output)
    expected = {"tokenizer.json", "tokenizer_config.json", *(n.replace("__", "/") for n in files)}
    assert {p.as_posix() for p in copied} == expected
    for relative in expected:
        assert (output / relative).read_bytes() == (folder / relative).read_bytes()


def test_chat_sources_need_a_chat_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMOPS_PRETRAINED_DIR", raising=False)
    folder = _folder(tmp_path, **{"tokenizer_config.json": {"eos_token": "<eos>"}})
    with pytest.raises(ValueError, match=r"no chat template, which chat sources \(c"):
        tok.model_tokenizer(_spec(folder))


def test_forced_uint16_tokens_must_hold_the_vocabulary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(
        tmp_path,
        vocab=70_000,
        **{"tokenizer_config.json": {"eos_token": "<eos>"}, "chat_template.jinja": "x"},
    )
    monkeypatch.setenv("LLMOPS_PRETRAINED_DIR", str(folder))
    with pytest.raises(ValueError, match=r"spec.sharding.tokenDtype: .* 70002 tokens"):
        tok.model_tokenizer(_spec(Path("/elsewhere"), sharding={"tokenDtype": "uint16"}))
    assert tok.model_tokenizer(_spec(Path("/elsewhere"))).vocab_size == 70_002


def test_a_remote_model_needs_the_initializer_s_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMOPS_PRETRAINED_DIR", raising=False)
    spec = DatasetSpec.model_validate(
        {"sources": [{"name": "s", "path": "x"}], "tokenizer": {"fromModel": {"uri": "hf://o/m"}}}
    )
    assert spec.tokenizer.from_model is not None
    with pytest.raises(RuntimeError, match="LLMOPS_PRETRAINED_DIR"):
        tok.model_folder(spec.tokenizer.from_model)
