"""Tokenize: train a byte-level BPE tokenizer with HF `tokenizers`, or load one, and encode
documents in batches (the Rust side spreads a batch over all cores)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmops.api.dataset import TokenizerTraining
from llmops.api.workload import Env

# A reused tokenizer (tokenizer.datasetRef) is mounted here by the controller.
REF_TOKENIZER_ENV = Env.REF_TOKENIZER
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
BATCH = 512


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
