"""The OpenAI request schemas: what is accepted, what is refused and how it maps to sampling."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from llmops_trainer.serve.protocol import ChatCompletionRequest, CompletionRequest


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def test_defaults_map_to_sampling_params() -> None:
    params = completion().sampling(max_tokens=7)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (7, 1.0, 1.0, 0)
    assert params.stop == () and params.seed is None and not params.greedy


def test_sampling_fields() -> None:
    request = completion(temperature=0, top_p=0.5, top_k=-1, seed=-1, stop="\n")
    params = request.sampling(max_tokens=3, extra_stops=("\nuser:",))
    assert params.greedy and params.top_p == 0.5 and params.top_k == 0
    assert params.seed == 2**64 - 1  # negative seeds wrap to the generator's range
    assert params.stop == ("\n", "\nuser:")


@pytest.mark.parametrize(
    "prompt, expected",
    [("text", "text"), ([1, 2], [1, 2]), (["one"], "one"), ([[3, 4]], [3, 4]), ([], [])],
)
def test_prompt_forms(prompt: Any, expected: Any) -> None:
    assert completion(prompt=prompt).single_prompt() == expected


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n": 2}, "only n=1"),
        ({"best_of": 3}, "best_of=1"),
        ({"echo": True}, "echo is not supported"),
        ({"logprobs": 2}, "logprobs is not supported"),
        ({"suffix": "x"}, "suffix is not supported"),
        ({"presence_penalty": 0.5}, "not supported"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"stop": [""]}, "at least 1 character"),
        ({"prompt": ["a", "b"]}, "only one prompt"),
        ({"stream_options": {"include_usage": True}}, "only allowed when stream"),
        ({"temperature": 2.5}, "less than or equal to 2"),
        ({"top_p": 0}, "greater than 0"),
        ({"max_tokens": 0}, "greater than or equal to 1"),
        ({"prompt": [-1]}, "greater than or equal to 0"),
        ({"unknown": 1}, "Extra inputs are not permitted"),
    ],
)
def test_refused_completion_fields(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        completion(**fields)


def test_chat_request() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": parts}]
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": messages, "max_completion_tokens": 5}
    )
    assert [m.text() for m in request.messages] == ["s", "ab"]
    assert request.token_limit() == 5


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": []},
        {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
        {"messages": [{"role": "user", "content": "x"}]},
    ],
)
def test_refused_chat_bodies(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_vanishing_temperatures_are_greedy() -> None:
    # Found by the HTTP fuzz: 1e-300 made the sampling probabilities overflow.
    assert completion(temperature=1e-300).sampling(1).greedy
    assert not completion(temperature=1e-3).sampling(1).greedy
