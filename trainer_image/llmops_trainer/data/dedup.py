"""Deduplicate: exact content hashes, MinHash signatures and LSH banding.

MinHash is vectorised over a whole batch of documents: shingles are 64-bit hashes of word
n-grams (built from cached per-word xxhash values with wrapping numpy arithmetic), each
permutation is a multiply-shift hash, and the per-document minimum is one `reduceat`.
Text is simplified first (lowercase, punctuation to spaces, numbers to 0), as datatrove does,
so trivial edits do not hide a duplicate.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import xxhash

U64 = npt.NDArray[np.uint64]
_WORDS = re.compile(r"[^\W_]+")
_NUMBERS = re.compile(r"\d+")
_CHUNK_ROWS = 1 << 15  # shingles per vectorised block: bounds the (rows x permutations) matrix
_CACHE_LIMIT = 2_000_000


def content_hash(text: str, response: str | None = None) -> bytes:
    """128-bit identity of a document's content (a pair hashes prompt and response)."""
    data = text if response is None else f"{text}\x00{response}"
    return xxhash.xxh3_128_digest(data.encode("utf-8", "surrogatepass"))


def chat_hash(messages: Sequence[tuple[str, str]]) -> bytes:
    """128-bit identity of a whole conversation: every role and content, in order."""
    data = "\x00chat" + "".join(f"\x1e{role}\x1f{content}" for role, content in messages)
    return xxhash.xxh3_128_digest(data.encode("utf-8", "surrogatepass"))


class MinHasher:
    def __init__(self, num_permutations: int, shingle_size: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.num_permutations = num_permutations
        self.shingle_size = shingle_size
        self.a = rng.integers(0, 2**63, num_permutations, dtype=np.uint64) * 2 + 1
        self.b = rng.integers(0, 2**63, num_permutations, dtype=np.uint64)
        self.mix = rng.integers(0, 2**63, shingle_size + 1, dtype=np.uint64) * 2 + 1
        self._words: dict[str, int] = {}

    def words(self, text: str) -> list[str]:
        text = text.lower()
        if any(c.isdigit() for c in text):
            text = _NUMBERS.sub("0", text)
        return _WORDS.findall(text)

    def shingles(self, text: str) -> U64:
        """Hashes of the document's word n-grams; empty when it has fewer words than n."""
        words = self.words(text)
        k = self.shingle_size
        if len(words) < k:
            return np.empty(0, dtype=np.uint64)
        cache = self._words
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        ids = np.fromiter(
            (cache[w] if w in cache else self._hash_word(w) for w in words),
            np.uint64,
            len(words),
        )
        m = len(words) - k + 1
        out = ids[:m] * self.mix[0]
        for j in range(1, k):
            out = (out ^ (ids[j : j + m] * self.mix[j])) * self.mix[k]
        return np.asarray(
            out, dtype=np.uint64
        )  # repeated shingles need no removal: they cannot change a minimum

    def _hash_word(self, word: str) -> int:
        value = xxhash.xxh64_intdigest(word.encode("utf-8", "surrogatepass"))
        self._words[word] = value
        return value

    def signatures(self, shingles: Sequence[U64]) -> npt.NDArray[np.uint32]:
        """One row of `num_permutations` minima per (non-empty) shingle set."""
        count = len(shingles)
        out = np.empty((count, self.num_permutations), dtype=np.uint32)
        i = 0
        while i < count:
            j, rows = i, 0
            while j < count and (j == i or rows + len(shingles[j]) <= _CHUNK_ROWS):
                rows += len(shingles[j])
                j += 1
            if j == i + 1 and rows > _CHUNK_ROWS:
                big = shingles[i]
                out[i] = np.min(
                    [
                        self._permute(big[s : s + _CHUNK_ROWS]).min(axis=0)
                        for s in range(0, len(big), _CHUNK_ROWS)
                    ],
                    axis=0,
                )
            else:
                block = np.concatenate(shingles[i:j])
                starts = np.cumsum([0] + [len(s) for s in shingles[i : j - 1]])
                out[i:j] = np.minimum.reduceat(self._permute(block), starts, axis=0)
            i = j
        return out

    def _permute(self, shingles: U64) -> U64:
        values = np.multiply.outer(shingles, self.a)
        values += self.b
        values >>= np.uint64(32)
        return values


def band_keys(
    signatures: npt.NDArray[np.uint32], bands: int, which: npt.NDArray[np.int64] | None = None
) -> U64:
    """One 64-bit key per (document, band): equal keys mean an identical band. `which`:
    only these bands (the columns of the result, in that order)."""
    rows = signatures.shape[1] // bands
    mix = np.random.default_rng(7).integers(0, 2**63, rows, dtype=np.uint64) * 2 + 1
    chosen = np.arange(bands) if which is None else np.asarray(which)
    keys = np.zeros((signatures.shape[0], len(chosen)), dtype=np.uint64)
    for r in range(rows):
        column = signatures[:, r::rows][:, :bands][:, chosen].astype(np.uint64)
        keys = (keys ^ (column + np.uint64(r))) * mix[r]
    return keys


def near_duplicates(
    keys: U64,
    threshold: float = 0.0,
    similarity: Callable[[npt.NDArray[np.int64], npt.NDArray[np.int64]], npt.NDArray[np.float64]]
    | None = None,
) -> npt.NDArray[np.bool_]:
    """Which documents to drop: all but the first of every cluster of documents that share
    a band (optionally confirmed by estimated Jaccard similarity >= threshold)."""
    count = keys.shape[0]
    edges: list[npt.NDArray[np.int64]] = []
    for band in range(keys.shape[1]):
        column = keys[:, band]
        order = np.argsort(column, kind="stable")
        ordered = column[order]
        new_run = np.empty(count, dtype=bool)
        new_run[:1] = True
        new_run[1:] = ordered[1:] != ordered[:-1]
        if new_run.all():
            continue
        run_start = np.flatnonzero(new_run)[np.cumsum(new_run) - 1]
        first = order[run_start]  # stable sort: the earliest document of each run
        member = ~new_run
        edges.append(np.stack([first[member], order[member]], axis=1))
    if not edges:
        return np.zeros(count, dtype=bool)
    pairs = np.unique(np.concatenate(edges), axis=0)
    if similarity is not None and threshold > 0:
        pairs = pairs[similarity(pairs[:, 0], pairs[:, 1]) >= threshold]
    return _non_roots(count, pairs)


def _non_roots(count: int, pairs: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Connected components by min-label propagation with pointer jumping; the root of
    each component is its smallest (earliest) document."""
    labels = np.arange(count)
    if len(pairs):
        a, b = pairs[:, 0], pairs[:, 1]
        while True:
            low = np.minimum(labels[a], labels[b])
            before = labels.copy()
            np.minimum.at(labels, a, low)
            np.minimum.at(labels, b, low)
            labels = labels[labels]
            if np.array_equal(labels, before):
                break
    return np.asarray(labels != np.arange(count), dtype=np.bool_)


def jaccard_estimate(
    left: npt.NDArray[np.uint32], right: npt.NDArray[np.uint32]
) -> npt.NDArray[np.float64]:
    return np.asarray((left == right).mean(axis=1), dtype=np.float64)
