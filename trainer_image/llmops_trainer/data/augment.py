"""Augment: cheap noisy copies of documents, no model needed.

- word-dropout: each word is removed with the given probability;
- word-swap: each word swaps places with its right neighbour with that probability;
- sentence-shuffle: each sentence moves to a random position with that probability.

Copies are seeded from the document's content hash, so reruns produce the same copies.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

_SENTENCES = re.compile(r"(?<=[.!?])\s+")


def augment(text: str, methods: Iterable[str], probability: float, seed: int) -> str:
    rng = random.Random(seed)
    for method in methods:
        if method == "word-dropout":
            words = text.split(" ")
            kept = [w for w in words if rng.random() >= probability]
            text = " ".join(kept or words[:1])
        elif method == "word-swap":
            words = text.split(" ")
            i = 0
            while i < len(words) - 1:
                if rng.random() < probability:
                    words[i], words[i + 1] = words[i + 1], words[i]
                    i += 1
                i += 1
            text = " ".join(words)
        elif method == "sentence-shuffle":
            sentences = _SENTENCES.split(text)
            for i in range(len(sentences)):
                if rng.random() < probability:
                    j = rng.randrange(len(sentences))
                    sentences[i], sentences[j] = sentences[j], sentences[i]
            text = " ".join(sentences)
        else:
            raise ValueError(f"unknown augmentation {method!r}")
    return text
