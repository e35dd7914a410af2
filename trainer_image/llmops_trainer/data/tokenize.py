"""Tokenize: train a byte-level BPE tokenizer with HF `tokenizers`, build a byte or a
character tokenizer, or load one (a file, or an open-weights model's tokenizer folder), and
encode documents in batches (the Rust side spreads a batch over all cores).

The byte and character tokenizers are `tokenizers` BPE models without merges, so their
`tokenizer.json` loads wherever a trained one does (`Tokenizer.from_file`, the trainer, the
server), and decoding gives back the text exactly:

- byte: ids 0-255 are the bytes of the UTF-8 text (written as GPT-2's byte-level characters,
  with the byte-level decoder of a trained tokenizer), then the special tokens;
- char: the characters of the training split in code point order (nanoGPT's shakespeare_char
  numbering), then the fallback (`<|unk|>`, or `<0x00>`..`<0xFF>` for the UTF-8 bytes of an
  unseen character, as Llama's byte fallback), then the special tokens.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from llmops.api.common import PretrainedModel
from llmops.api.dataset import ByteTokenizer, CharTokenizer, DatasetSpec, TokenizerTraining
from llmops.api.workload import Env

# A reused tokenizer (tokenizer.datasetRef) is mounted here by the controller.
REF_TOKENIZER_ENV = Env.REF_TOKENIZER
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
BATCH = 512
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
CHAT_TEMPLATES_DIR = "additional_chat_templates"  # named templates (transformers >= 4.54)
# What a prepared dataset carries of a model's tokenizer, for the trainer and the server.
MODEL_TOKENIZER_FILES = (TOKENIZER_CONFIG, "special_tokens_map.json", *CHAT_TEMPLATE_FILES)
UNKNOWN = "<|unk|>"  # the character tokenizer's fallback token (fallback: unknown-token)


def train(texts: Iterable[str], config: TokenizerTraining) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(config.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_batches(texts), trainer=trainer)
    return tokenizer


def byte_level(config: ByteTokenizer) -> Tokenizer:
    """256 byte tokens (id = byte value), then the special tokens; nothing to train."""
    alphabet = byte_alphabet()
    tokenizer = Tokenizer(models.BPE({alphabet[b]: b for b in range(256)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(_specials(config.special_tokens))
    return tokenizer


def byte_alphabet() -> list[str]:
    """GPT-2's printable character for each byte (what byte-level BPE vocabularies hold)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1)]
    printable += range(ord("\u00ae"), ord("\u00ff") + 1)
    table = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return [table[b] for b in range(256)]


def characters(texts: Iterable[str], config: CharTokenizer) -> Tokenizer:
    """A token per character seen at least `min_frequency` times in `texts` (the training
    split), in code point order, then the fallback for the others, then the specials."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    specials = set(config.special_tokens)
    seen = sorted(c for c, n in counts.items() if n >= config.min_frequency and c not in specials)
    vocab = {c: i for i, c in enumerate(seen)}
    decoder: decoders.Decoder
    if config.fallback == "bytes":
        vocab.update({f"<0x{b:02X}>": len(seen) + b for b in range(256)})
        model = models.BPE(vocab, [], byte_fallback=True)
        decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    else:
        vocab[UNKNOWN] = len(seen)
        model = models.BPE(vocab, [], unk_token=UNKNOWN)
        decoder = decoders.Fuse()
    tokenizer = Tokenizer(model)
    tokenizer.decoder = decoder
    tokenizer.add_special_tokens(_specials(config.special_tokens))
    return tokenizer


def _specials(tokens: Iterable[str]) -> list[AddedToken]:
    return [AddedToken(token, special=True, normalized=False) for token in tokens]


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def load(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def eos_id(tokenizer: Tokenizer, special_tokens: list[str] | None = None) -> int:
    for token in [*(special_tokens or [])[:1], *EOS_CANDIDATES]:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has no end-of-text token (e.g. <|endoftext|>)")


def ref_tokenizer_path() -> Path:
    path = os.environ.get(REF_TOKENIZER_ENV)
    if not path:
        raise RuntimeError(f"tokenizer.datasetRef needs {REF_TOKENIZER_ENV} (a tokenizer.json)")
    return Path(path)


def encode(tokenizer: Tokenizer, texts: list[str]) -> list[npt.NDArray[np.int64]]:
    # The fast variant skips offset tracking, which shards do not need.
    fast = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    encodings = fast(texts, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int64) for e in encodings]


def encode_pairs(
    tokenizer: Tokenizer, prompts: list[str], responses: list[str]
) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]]:
    """Prompt then response tokens, with a loss mask of 1 on the response only."""
    out = []
    for p, r in zip(encode(tokenizer, prompts), encode(tokenizer, responses), strict=True):
        mask = np.concatenate([np.zeros(len(p), np.uint8), np.ones(len(r), np.uint8)])
        out.append((np.concatenate([p, r]), mask))
    return out


# -- an open-weights model's tokenizer (tokenizer.fromModel) ----------------------------------


@dataclass
class ModelTokenizer:
    """The tokenizer of an open-weights model, read from its folder."""

    folder: Path
    tokenizer: Tokenizer
    eos_id: int
    vocab_size: int  # token ids are below it
    chat_template: bool


def model_tokenizer(spec: DatasetSpec) -> ModelTokenizer:
    """The tokenizer of `spec.tokenizer.fromModel`, checked against the spec: its token ids
    fit `sharding.tokenDtype` and it has a chat template when a source holds chats. The
    slices check it too, so that a wrong model fails in minutes, not after the slicing."""
    model = spec.tokenizer.from_model
    if model is None:
        raise ValueError("the Dataset does not take its tokenizer from a model")
    loaded = load_model(model_folder(model))
    if spec.sharding.token_dtype == "uint16" and loaded.vocab_size > 2**16:
        raise ValueError(
            f"spec.sharding.tokenDtype: uint16 holds token ids up to 65535, but the tokenizer "
            f"of {model.uri} has {loaded.vocab_size} tokens; use uint32 or auto"
        )
    chats = [s.name for s in spec.sources if s.messages_field is not None]
    if chats and not loaded.chat_template:
        raise ValueError(
            f"the tokenizer of {model.uri} has no chat template, which chat sources "
            f"({', '.join(chats)}: messagesField) need"
        )
    return loaded


def model_folder(model: PretrainedModel) -> Path:
    """Where the model's tokenizer files are: Env.PRETRAINED_DIR, which the model
    initializer sets (and fills for a remote model); an absolute path in the image also
    works without it (the engine run in-process)."""
    folder = os.environ.get(Env.PRETRAINED_DIR)
    if folder:
        return Path(folder)
    if model.uri.startswith("/"):
        return Path(model.uri)
    raise RuntimeError(
        f"tokenizer.fromModel {model.uri!r} needs {Env.PRETRAINED_DIR}: the folder where the "
        "model initializer put its tokenizer files"
    )


def load_model(folder: Path) -> ModelTokenizer:
    """The tokenizer of the model in `folder`: its `tokenizer.json`, the end-of-sequence
    token of its tokenizer_config.json (or generation_config.json, config.json) and whether
    it has a chat template."""
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {TOKENIZER_FILE}: tokenizer.fromModel needs a model with a fast "
            "(Hugging Face tokenizers) tokenizer"
        )
    tokenizer = Tokenizer.from_file(str(path))
    return ModelTokenizer(
        folder=folder,
        tokenizer=tokenizer,
        eos_id=model_eos_id(folder, tokenizer),
        vocab_size=vocab_size(tokenizer),
        chat_template=has_chat_template(folder),
    )


def vocab_size(tokenizer: Tokenizer) -> int:
    """One more than the largest token id (added tokens may sit above the base vocabulary)."""
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    return max(int(tokenizer.get_vocab_size(with_added_tokens=True)), int(largest) + 1)


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def model_eos_id(folder: Path, tokenizer: Tokenizer) -> int:
    """The model's `eos_token` (tokenizer_config.json), else the first `eos_token_id` of
    generation_config.json or config.json, else a well-known end-of-text token."""
    token = _json(folder / TOKENIZER_CONFIG).get("eos_token")
    if isinstance(token, dict):  # an AddedToken as older transformers serialise it
        token = token.get("content")
    token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
    if token_id is not None:
        return int(token_id)
    for name in ("generation_config.json", "config.json"):
        ids = _json(folder / name).get("eos_token_id")
        first = ids[0] if isinstance(ids, list) and ids else ids
        if isinstance(first, int) and not isinstance(first, bool):
            return first
    try:
        return eos_id(tokenizer)
    except ValueError:
        raise ValueError(
            f"the tokenizer in {folder} names no end-of-sequence token (eos_token in "
            "tokenizer_config.json or eos_token_id in generation_config.json)"
        ) from None


def has_chat_template(folder: Path) -> bool:
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    templates = folder / CHAT_TEMPLATES_DIR
    if templates.is_dir() and any(templates.iterdir()):
        return True
    return bool(_json(folder / TOKENIZER_CONFIG).get("chat_template"))


def model_files(folder: Path) -> list[Path]:
    """The tokenizer files of the model, relative to its folder, that exist."""
    found = [Path(TOKENIZER_FILE)]
    found += [Path(name) for name in MODEL_TOKENIZER_FILES if (folder / name).is_file()]
    templates = folder / CHAT_TEMPLATES_DIR
    if templates.is_dir():
        found += sorted(p.relative_to(folder) for p in templates.rglob("*") if p.is_file())
    return found


def copy_model_files(folder: Path, output_dir: Path) -> list[Path]:
    """Copy the model's tokenizer files (tokenizer.json byte for byte, tokenizer_config.json,
    chat templates) next to the shards, where the trainer and the server load them."""
    copied = model_files(folder)
    for relative in copied:
        target = output_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / relative, target)
    return copied
