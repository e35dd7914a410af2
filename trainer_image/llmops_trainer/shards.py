"""The on-disk format of a prepared dataset: token shards plus a JSON manifest.

Written by the preprocessing engine (llmops_trainer.data), read by the trainer; this module is
the only place either side touches the format.

    <root>/manifest.json
    <root>/tokenizer.json                  HF `tokenizers` file
    <root>/<split>/shard-000000-00000.bin  tokens, little-endian uint16 or uint32 (the
                                           engine's units write shard-<unit>-<k>; readers
                                           take the paths and order from the manifest)
    <root>/<split>/shard-000000-00000.mask supervised data only: one uint8 per token,
                                           0 (MASK_IGNORE) where the token is not learned
                                           (a prompt), 1 (MASK_RESPONSE) where it is (a
                                           response), 2 (MASK_TEXT) for the tokens of a
                                           plain-text document of a mixed dataset

Inside a shard, documents are concatenated, each followed by the end-of-sequence token, so
a shard is a plain token stream that `numpy.memmap` maps without reading it.

A mixed dataset (plain-text and supervised sources, `Manifest.mixed`) is written as
supervised shards: a plain-text document's tokens and its end-of-sequence token are all
MASK_TEXT, so one rule (learn every token whose mask is not 0) trains plain text on every
token and supervised records on their responses, and the mask still tells which tokens came
from which kind. Shards written before MASK_TEXT existed hold only 0 and 1 and read the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation", "test")
TokenDtype = Literal["uint16", "uint32"]
MASK_IGNORE = 0  # no loss: a prompt, a user turn, the chat template's scaffolding
MASK_RESPONSE = 1  # a response or assistant turn of a supervised record (and its EOS)
MASK_TEXT = 2  # a plain-text document's token in a mixed dataset (and its EOS)


def dtype_for_vocab(vocab_size: int) -> TokenDtype:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    path: str  # relative to the dataset root
    tokens: int
    documents: int
    sha256: str
    mask: str | None = None  # relative path of the loss mask (supervised data)
    mask_sha256: str | None = None


@dataclass
class SplitInfo:
    tokens: int = 0
    documents: int = 0
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class Manifest:
    fingerprint: str  # hash of the inputs and the processing config
    dtype: TokenDtype
    vocab_size: int
    eos_token_id: int
    tokenizer: str = "tokenizer.json"
    supervised: bool = False
    # Plain-text and supervised documents in supervised shards (the masks mark MASK_TEXT).
    mixed: bool = False
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        if not self.mixed:  # as before mixing existed: older readers read it unchanged
            del data["mixed"]
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest version {data.get('version')!r}")
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # a newer writer's additions
        splits = {
            name: SplitInfo(
                tokens=split["tokens"],
                documents=split["documents"],
                shards=[ShardInfo(**shard) for shard in split["shards"]],
            )
            for name, split in data["splits"].items()
        }
        return cls(**{**data, "splits": splits})


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Atomically: a reader never sees a half-written manifest."""
    target = root / MANIFEST
    partial = root / f".{MANIFEST}.partial"
    partial.write_text(manifest.to_json())
    os.replace(partial, target)
    return target


def read_manifest(root: Path) -> Manifest:
    return Manifest.from_dict(json.loads((root / MANIFEST).read_text()))


class ShardWriter:
    """Appends documents to numbered shards of about `tokens_per_shard` tokens each."""

    def __init__(
        self,
        root: Path,
        split: str,
        dtype: TokenDtype,
        eos_token_id: int,
        tokens_per_shard: int,
        supervised: bool = False,
        prefix: str = "shard-",
    ) -> None:
        self.root = root
        self.prefix = prefix
        self.split = split
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.eos = eos_token_id
        self.tokens_per_shard = tokens_per_shard
        self.supervised = supervised
        self.info = SplitInfo()
        self._tokens: list[npt.NDArray[Any]] = []
        self._masks: list[npt.NDArray[np.uint8]] = []
        self._pending_tokens = 0
        self._pending_documents = 0
        (root / split).mkdir(parents=True, exist_ok=True)

    def add(
        self, tokens: list[int] | npt.NDArray[Any], mask: list[int] | npt.NDArray[Any] | None = None
    ) -> None:
        array = self._checked(tokens)
        if self.supervised and (mask is None or len(mask) != len(array)):
            raise ValueError("supervised shards need a loss mask as long as the tokens")
        self._tokens.append(np.append(array, self.eos).astype(self.dtype))
        if self.supervised:
            assert mask is not None
            # The end-of-sequence token after a response is learned too.
            marks = np.asarray(mask, dtype=np.uint8)
            self._masks.append(np.append(marks, MASK_RESPONSE).astype(np.uint8))
        self._append(array)

    def add_text(self, tokens: list[int] | npt.NDArray[Any]) -> None:
        """A plain-text document: every token and its end-of-sequence token are learned. In
        supervised shards (a mixed dataset) its mask is MASK_TEXT throughout."""
        if not self.supervised:
            self.add(tokens)
            return
        array = self._checked(tokens)
        self._tokens.append(np.append(array, self.eos).astype(self.dtype))
        self._masks.append(np.full(array.size + 1, MASK_TEXT, dtype=np.uint8))
        self._append(array)

    def _checked(self, tokens: list[int] | npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        array = np.asarray(tokens, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {self.dtype.name}")
        return array

    def _append(self, array: npt.NDArray[np.int64]) -> None:
        self._pending_tokens += array.size + 1
        self._pending_documents += 1
        if self._pending_tokens >= self.tokens_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._pending_tokens:
            return
        index = len(self.info.shards)
        relative = f"{self.split}/{self.prefix}{index:05d}.bin"
        path = self.root / relative
        np.concatenate(self._tokens).tofile(path)
        shard = ShardInfo(
            relative, self._pending_tokens, self._pending_documents, sha256_file(path)
        )
        if self.supervised:
            mask_relative = f"{self.split}/{self.prefix}{index:05d}.mask"
            np.concatenate(self._masks).tofile(self.root / mask_relative)
            shard.mask = mask_relative
            shard.mask_sha256 = sha256_file(self.root / mask_relative)
        self.info.shards.append(shard)
        self.info.tokens += shard.tokens
        self.info.documents += shard.documents
        self._tokens, self._masks = [], []
        self._pending_tokens = self._pending_documents = 0

    def close(self) -> SplitInfo:
        self.flush()
        return self.info


def open_tokens(root: Path, manifest: Manifest, shard: ShardInfo) -> npt.NDArray[Any]:
    """The shard's tokens, memory-mapped (read-only, nothing loaded up front)."""
    return np.memmap(root / shard.path, dtype=np.dtype(manifest.dtype).newbyteorder("<"), mode="r")


def open_mask(root: Path, shard: ShardInfo) -> npt.NDArray[np.uint8] | None:
    if shard.mask is None:
        return None
    return np.memmap(root / shard.mask, dtype=np.uint8, mode="r")


def verify(root: Path, manifest: Manifest) -> list[str]:
    """Problems found (missing files, wrong sizes, checksum mismatches); empty when sound."""
    problems: list[str] = []
    itemsize = np.dtype(manifest.dtype).itemsize
    for split in manifest.splits.values():
        for shard in split.shards:
            files = [(shard.path, shard.sha256, shard.tokens * itemsize)]
            if shard.mask:
                files.append((shard.mask, shard.mask_sha256 or "", shard.tokens))
            for relative, checksum, size in files:
                path = root / relative
                if not path.is_file():
                    problems.append(f"{relative}: missing")
                elif path.stat().st_size != size:
                    problems.append(f"{relative}: {path.stat().st_size} bytes, expected {size}")
                elif sha256_file(path) != checksum:
                    problems.append(f"{relative}: checksum mismatch")
    return problems
