"""Synthetic English-like documents for the data engine tests (no files shipped)."""

from __future__ import annotations

import random

WORDS = [
    "river",
    "mountain",
    "village",
    "keeper",
    "baker",
    "market",
    "window",
    "garden",
    "teacher",
    "student",
    "harbor",
    "morning",
    "evening",
    "winter",
    "summer",
    "autumn",
    "spring",
    "letter",
    "story",
    "bridge",
    "meadow",
    "forest",
    "sailor",
    "captain",
    "engine",
    "station",
    "travel",
    "journey",
    "pocket",
    "silver",
    "golden",
    "yellow",
    "purple",
    "gentle",
    "quiet",
    "rapid",
    "careful",
    "honest",
    "clever",
    "patient",
    "narrow",
    "broad",
    "distant",
    "ancient",
    "modern",
    "simple",
    "strange",
    "bright",
    "darker",
    "warmer",
    "colder",
    "stone",
    "timber",
    "copper",
    "paper",
    "lantern",
    "candle",
    "kitchen",
    "orchard",
    "pasture",
    "valley",
    "island",
    "shore",
    "current",
    "weather",
    "thunder",
    "rainfall",
    "sunlight",
    "shadow",
    "thought",
    "memory",
    "promise",
    "answer",
    "question",
    "reason",
    "history",
    "science",
    "number",
    "pattern",
    "machine",
    "library",
    "chapter",
    "sentence",
    "picture",
    "music",
]
STOP = ("the", "and", "of", "to", "with", "that", "have", "be")
VERBS = [
    "walked",
    "carried",
    "opened",
    "watched",
    "painted",
    "counted",
    "followed",
    "remembered",
    "built",
]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(STOP), rng.choice(WORDS), rng.choice(VERBS)]
    words += [rng.choice(WORDS + list(STOP)) for _ in range(rng.randint(6, 12))]
    return " ".join(words).capitalize() + "."


def document(rng: random.Random, sentences: int = 20) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def near_copy(text: str, rng: random.Random, edits: int = 2) -> str:
    words = text.split(" ")
    for _ in range(edits):
        words[rng.randrange(len(words))] = rng.choice(WORDS)
    return " ".join(words)
