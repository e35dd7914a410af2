"""Decontamination: training documents sharing an n-gram of words with evaluation text.

The prepare stage (where splits are known) indexes the n-grams of the evaluation text (the
documents of the splits in `spec.processing.decontamination.against`, and the evaluation
files); each tokenize unit drops every training document that contains one of them. Words
are the runs of letters and digits, lower-cased, so case, punctuation and spacing do not
hide a copy. The
index holds one 64-bit hash per distinct n-gram (a sorted numpy array: 8 bytes each, however
long the n-grams are), and the training documents are looked up in batches.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from llmops_trainer.data.collect import expand_path

CONTAMINATED = "contaminated"
_WORD = re.compile(r"[^\W_]+")
_PARAGRAPHS = re.compile(r"\n\s*\n")
_PRIME = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime: the rolling hash's base
_COMPACT = 1 << 20  # pending hashes merged into the index past this many
_EMPTY = np.empty(0, dtype=np.uint64)


def words(text: str) -> list[str]:
    """The normalised words of `text`: runs of letters and digits, lower-cased."""
    return _WORD.findall(text.lower())


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64 finalizer."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return np.asarray(x ^ (x >> np.uint64(31)), dtype=np.uint64)


def ngram_hashes(text: str, n: int) -> npt.NDArray[np.uint64]:
    """A 64-bit hash of every n-gram of the normalised words of `text`, in order (none when
    it has fewer than n words). Equal n-grams hash equally in every process."""
    found = words(text)
    if len(found) < n:
        return _EMPTY
    ids: dict[str, int] = {}
    for word in found:
        if word not in ids:
            ids[word] = xxhash.xxh3_64_intdigest(word.encode())
    values = np.fromiter((ids[w] for w in found), dtype=np.uint64, count=len(found))
    m = len(found) - n + 1
    out = np.zeros(m, dtype=np.uint64)
    for j in range(n):
        out = out * _PRIME + values[j : j + m]  # wraps modulo 2**64
    return _mix(out)


class NgramIndex:
    """The distinct n-gram hashes of the evaluation text, and lookups of training text."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.texts = 0
        self._sorted = _EMPTY
        self._pending: list[npt.NDArray[np.uint64]] = []
        self._pending_size = 0

    def add(self, text: str) -> None:
        hashes = ngram_hashes(text, self.n)
        self.texts += 1
        if len(hashes):
            self._pending.append(hashes)
            self._pending_size += len(hashes)
            if self._pending_size >= _COMPACT:
                self._compact()

    def _compact(self) -> None:
        if self._pending:
            self._sorted = np.unique(np.concatenate([self._sorted, *self._pending]))
            self._pending, self._pending_size = [], 0

    def __len__(self) -> int:
        self._compact()
        return len(self._sorted)

    def hashes(self) -> npt.NDArray[np.uint64]:
        """The distinct n-gram hashes, sorted (to save the index)."""
        self._compact()
        return self._sorted

    @classmethod
    def of(cls, n: int, hashes: npt.NDArray[np.uint64]) -> NgramIndex:
        """An index of saved, sorted hashes."""
        index = cls(n)
        index._sorted = np.asarray(hashes, dtype=np.uint64)
        return index

    def matches(self, texts: list[str]) -> npt.NDArray[np.bool_]:
        """Whether each text shares an n-gram with the index."""
        self._compact()
        out = np.zeros(len(texts), dtype=bool)
        if not len(self._sorted) or not texts:
            return out
        parts = [ngram_hashes(text, self.n) for text in texts]
        sizes = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        if not sizes.sum():
            return out
        hashes = np.concatenate(parts)
        at = np.minimum(np.searchsorted(self._sorted, hashes), len(self._sorted) - 1)
        hits = (self._sorted[at] == hashes).astype(np.int64)
        owner = np.repeat(np.arange(len(texts)), sizes)
        out[np.bincount(owner, weights=hits, minlength=len(texts)) > 0] = True
        return out


def _files(path: str) -> list[Path]:
    where = Path(expand_path(path))
    if where.is_dir():
        return sorted(p for p in where.rglob("*") if p.is_file())
    if not where.is_file():
        raise FileNotFoundError(
            f"spec.processing.decontamination.files: {path!r} ({where}) is not a file or folder"
        )
    return [where]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def file_texts(paths: Iterable[str]) -> Iterator[str]:
    """The evaluation texts of files or folders: every string value of each record of a
    `.jsonl` file, every blank-line separated paragraph of any other file."""
    for path in paths:
        for file in _files(path):
            if file.suffix == ".jsonl":
                with file.open(encoding="utf-8", errors="replace") as handle:
                    for line in handle:
                        if line.strip():
                            yield from _strings(json.loads(line))
            else:
                text = file.read_text(encoding="utf-8", errors="replace")
                yield from (p for p in _PARAGRAPHS.split(text) if p.strip())


def files_digest(paths: Iterable[str]) -> str:
    """sha256 of the evaluation files' names and contents: part of the Dataset fingerprint."""
    digest = hashlib.sha256()
    for path in paths:
        for file in _files(path):
            digest.update(f"{file}\x00".encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()
