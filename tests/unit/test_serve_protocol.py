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
    [
        ("text", ["text"]),
        ([1, 2], [[1, 2]]),
        (["one"], ["one"]),
        (["one", "two"], ["one", "two"]),
        ([[3, 4]], [[3, 4]]),
        ([[3, 4], [5]], [[3, 4], [5]]),
        ([], [[]]),
    ],
)
def test_prompt_forms(prompt: Any, expected: Any) -> None:
    assert completion(prompt=prompt).prompts() == expected


def test_choices_penalties_bias_and_logprobs_map_to_sampling_params() -> None:
    request = completion(
        n=3, best_of=4, seed=10, presence_penalty=0.5, frequency_penalty=-1.0,
        logit_bias={"7": 2.5, "9": -100}, logprobs=2, echo=True,
    )  # fmt: skip
    assert request.choices() == 3 and request.generated() == 4
    params = request.sampling(5, logprobs=2, prompt_logprobs=2, choice=2)
    assert params.seed == 12  # each choice has its own seed
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.logit_bias == ((7, 2.5), (9, -100.0)) and params.penalised
    assert (params.logprobs, params.prompt_logprobs) == (2, 2)
    assert not completion().sampling(1).penalised


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n": 17}, "less than or equal to 16"),
        ({"n": 3, "best_of": 2}, "best_of: must be at least n"),
        ({"best_of": 3, "stream": True}, "cannot be streamed"),
        ({"logprobs": 21}, "less than or equal to 20"),
        ({"suffix": "x"}, "Input should be None"),
        ({"presence_penalty": 2.5}, "less than or equal to 2"),
        ({"logit_bias": {"x": 5}}, "should match pattern"),
        ({"logit_bias": {"1": 101}}, "less than or equal to 100"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"stop": [""]}, "at least 1 character"),
        ({"prompt": [["a"]]}, "prompt"),
        ({"prompt": "\ud800"}, "lone surrogate"),
        ({"prompt": ["ok", "\udfff"]}, "lone surrogate"),
        ({"stop": "\ud800"}, "unicode"),
        ({"stream_options": {"include_usage": True}}, "only allowed when stream"),
        ({"temperature": 2.5}, "less than or equal to 2"),
        ({"temperature": True}, "valid number"),
        ({"top_p": 0}, "greater than 0"),
        ({"max_tokens": -1}, "greater than or equal to 0"),
        ({"max_tokens": "2"}, "valid integer"),
        ({"max_tokens": True}, "valid integer"),
        ({"max_tokens": 2.0}, "valid integer"),
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
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        {"messages": [{"role": "user", "content": "x"}]},
    ],
)
def test_refused_chat_bodies(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_chat_logprobs() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert ChatCompletionRequest.model_validate(body).logprob_count() is None
    request = ChatCompletionRequest.model_validate({**body, "logprobs": True, "top_logprobs": 3})
    assert request.logprob_count() == 3


def test_vanishing_temperatures_are_greedy() -> None:
    # Found by the HTTP fuzz: 1e-300 made the sampling probabilities overflow.
    assert completion(temperature=1e-300).sampling(1).greedy
    assert not completion(temperature=1e-3).sampling(1).greedy


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"model": "m", "prompt": "\ud800"}, "prompt", "lone surrogate"),
        ({"model": "m", "prompt": ["a", "\ud800"]}, "prompt[1]", "lone surrogate"),
        ({"model": "m", "prompt": 5}, "prompt", "valid string or a valid list"),
        ({"model": "m", "prompt": "x", "max_tokens": "2"}, "max_tokens", "valid integer"),
        ({"model": "m", "prompt": "x", "stop": [1]}, "stop[0]", "valid string"),
        ({"model": "m", "prompt": "x", "oops": 1}, "oops", "unrecognized request argument"),
        ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix", "only null"),
        ({"model": "m", "prompt": "x", "n": 2, "best_of": 1}, "best_of", "at least n"),
    ],
)
def test_http_errors_name_the_field_as_the_client_wrote_it(
    body: dict[str, Any], param: str, message: str
) -> None:
    from fastapi.exceptions import RequestValidationError

    from llmops_trainer.serve.api import _validation_error

    with pytest.raises(ValidationError) as raised:
        CompletionRequest.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in raised.value.errors()]
    error = _validation_error(RequestValidationError(errors))
    assert (error.status, error.param) == (400, param)
    assert error.message.startswith(f"{param}: ") and message in error.message
