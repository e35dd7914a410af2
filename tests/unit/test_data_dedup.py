from __future__ import annotations

import random

import numpy as np
from data_corpus import document, near_copy
from hypothesis import given, settings
from hypothesis import strategies as st

from llmops_trainer.data import dedup

HASHER = dedup.MinHasher(128, 5)


def _signatures(texts: list[str]) -> np.ndarray:
    return HASHER.signatures([HASHER.shingles(t) for t in texts])


def test_near_duplicates_caught_and_distinct_documents_kept() -> None:
    rng = random.Random(1)
    originals = [document(rng, 25) for _ in range(30)]
    copies = [near_copy(originals[i], rng, edits=2) for i in range(0, 30, 3)]
    keys = dedup.band_keys(_signatures(originals + copies), 16)
    drop = dedup.near_duplicates(keys)
    assert not drop[:30].any(), "distinct documents must survive"
    assert drop[30:].all(), "every near copy must be caught"


def test_threshold_confirms_candidates() -> None:
    rng = random.Random(2)
    base = document(rng, 25)
    texts = [base, near_copy(base, rng, edits=1)]
    signatures = _signatures(texts)

    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return dedup.jaccard_estimate(signatures[a], signatures[b])

    keys = dedup.band_keys(signatures, 16)
    assert dedup.near_duplicates(keys, 0.8, similarity).tolist() == [False, True]
    assert dedup.near_duplicates(keys, 1.0, similarity).tolist() == [False, False]


def test_clusters_keep_only_their_first_member() -> None:
    # 0-2 and 1-2 share bands: one component {0, 1, 2} whose root is 0.
    keys = np.array([[1, 10], [2, 20], [1, 20], [3, 30]], dtype=np.uint64)
    assert dedup.near_duplicates(keys).tolist() == [False, True, True, False]


def test_short_documents_have_no_shingles() -> None:
    assert len(HASHER.shingles("too short")) == 0


def test_simplification_hides_trivial_edits() -> None:
    a = HASHER.shingles("The Year 1999, was; a GOOD year for the river and the sea")
    b = HASHER.shingles("the year 2024 was a good year for the river and the sea!")
    assert set(a.tolist()) == set(b.tolist())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 40))
def test_signature_estimates_jaccard(seed: int, edits: int) -> None:
    rng = random.Random(seed)
    a = document(rng, 30)
    b = near_copy(a, rng, edits)
    sa, sb = set(HASHER.shingles(a).tolist()), set(HASHER.shingles(b).tolist())
    true = len(sa & sb) / len(sa | sb)
    estimate = float(dedup.jaccard_estimate(*_signatures([a, b])[:, None, :])[0])
    assert abs(estimate - true) < 0.2  # 128 permutations: standard error about 0.045


def test_batching_does_not_change_signatures() -> None:
    rng = random.Random(3)
    texts = [document(rng, rng.randint(1, 400)) for _ in range(40)]
    together = _signatures(texts)
    alone = np.vstack([_signatures([t]) for t in texts])
    assert np.array_equal(together, alone)


def test_content_hash_separates_pairs() -> None:
    assert dedup.content_hash("ab", "c") != dedup.content_hash("a", "bc")
    assert dedup.content_hash("x") == dedup.content_hash("x")
