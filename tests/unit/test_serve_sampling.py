"""Logit bias, OpenAI's presence and frequency penalties, greedy and seeded sampling per row,
and the log-probabilities reported to clients."""

from __future__ import annotations

import math

import pytest
import torch

from llmops_trainer.serve.protocol import SamplingParams
from llmops_trainer.serve.sampling import MIN_LOGPROB, TokenCounts, adjust, logprobs_of, sample

pytestmark = pytest.mark.unit


def test_penalties_follow_openais_formula() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    params = SamplingParams(5, presence_penalty=0.5, frequency_penalty=0.25)
    adjusted = adjust(logits, params, TokenCounts(4, [3, 3, 1]))
    # logit - count * frequency - (count > 0) * presence
    assert adjusted.tolist() == [1.0, 2.0 - 0.25 - 0.5, 3.0, 4.0 - 0.5 - 0.5]
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0]  # the model's logits are untouched


def test_token_counts_follow_the_output_as_it_grows() -> None:
    params = SamplingParams(5, frequency_penalty=1.0)
    counts = TokenCounts(4)
    for token in [2, 2, 0, 2]:
        counts.add(token)
    assert adjust(torch.zeros(4), params, counts).tolist() == [-1.0, 0.0, -3.0, 0.0]
    counts.add(7)  # an id past the logits (a padded vocabulary) is ignored, not an error
    assert counts.counts.tolist() == [1, 0, 3, 0]


def test_logit_bias_adds_to_the_named_tokens() -> None:
    params = SamplingParams(5, logit_bias=((0, 100.0), (3, -100.0)))
    assert adjust(torch.zeros(4), params, None).tolist() == [100.0, 0.0, 0.0, -100.0]


def test_greedy_rows_with_penalties_and_without_share_a_batch() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.9], [0.0, 5.0, 4.9]])
    plain = SamplingParams(5, temperature=0.0)
    penalised = SamplingParams(5, temperature=0.0, frequency_penalty=1.0)
    counts = [TokenCounts(3, [1]), TokenCounts(3, [1])]
    assert sample(logits, [plain, penalised], [None, None], counts) == [1, 2]


def test_seeded_sampling_uses_the_rows_generator() -> None:
    logits = torch.zeros(2, 50)
    params = [SamplingParams(5, temperature=1.0), SamplingParams(5, temperature=1.0)]

    def draw(seed: int) -> list[int]:
        generators = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)]
        return sample(logits, params, generators)  # type: ignore[arg-type]

    first = draw(3)
    assert first == draw(3) and first[0] == first[1]


def test_logprobs_of_chosen_tokens_and_alternatives() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, -1e9]])
    found = logprobs_of(logits, [0, 2], top=2)
    expected = torch.log_softmax(logits, dim=-1)
    assert found[0].token == 0 and found[0].logprob == pytest.approx(float(expected[0, 0]))
    assert [t for t, _ in found[0].top] == [2, 1]
    assert found[1].logprob == MIN_LOGPROB  # never -inf: JSON has no infinity
    assert all(math.isfinite(lp) for _, lp in found[1].top)
    assert logprobs_of(logits, [1, 1], top=0)[0].top == ()
