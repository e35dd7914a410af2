"""Property-based fuzzing of the HTTP API (hypothesis, loopback only): whatever the body, the
server answers 200 with a well-formed completion or a 4xx with an OpenAI error body, never a
5xx, a hang or a dead engine; and every answer is counted in the HTTP metric."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_support import RunningServer, make_model, metric, running_server

EXAMPLES = 150
MAX_NEW_TOKENS = 6
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
token_ids = st.lists(st.integers(min_value=-3, max_value=400), max_size=70)
# Lone surrogates arrive as JSON escapes ("\ud800"); no tokenizer can encode them.
surrogates = st.sampled_from(["\ud800", "\udfff", "\ud83d"])
texts = st.text(max_size=80) | st.tuples(st.text(max_size=5), surrogates, st.text(max_size=5)).map(
    "".join
)
sampling = {
    "max_tokens": st.integers(min_value=-1, max_value=MAX_NEW_TOKENS + 2) | anything,
    "temperature": st.floats(min_value=-0.5, max_value=2.5) | anything,
    "top_p": st.floats(min_value=-0.1, max_value=1.1) | anything,
    "top_k": st.integers(min_value=-3, max_value=500) | anything,
    "seed": st.integers(min_value=-(2**64), max_value=2**64) | anything,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | anything,
    "n": st.integers(min_value=0, max_value=3) | anything,
    "best_of": st.integers(min_value=0, max_value=4) | anything,
    "logprobs": st.integers(min_value=-1, max_value=3) | st.booleans() | anything,
    "top_logprobs": st.integers(min_value=-1, max_value=3) | anything,
    "echo": st.booleans() | anything,
    "logit_bias": st.dictionaries(
        st.sampled_from(["1", "5", "299", "300", "x"]), st.floats(min_value=-150, max_value=150)
    )
    | anything,
    "frequency_penalty": st.floats(min_value=-3, max_value=3) | anything,
    "return_tokens_as_token_ids": st.booleans() | anything,
    "stream": st.booleans() | anything,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | anything,
    "ignore_eos": st.booleans() | anything,
    "presence_penalty": st.sampled_from([0, 0.0, 1.0]) | anything,
    "user": st.text(max_size=8) | anything,
    "surprise": anything,
}
model = st.sampled_from(["tiny", "tiny", "tiny", "other", ""]) | anything
completion_bodies = st.fixed_dictionaries(
    {"model": model},
    optional={
        "prompt": texts | token_ids | st.lists(texts, max_size=2)
        | st.lists(token_ids, max_size=2) | anything,
        **sampling,
    },
)  # fmt: skip
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "robot"]) | anything},
    optional={
        "content": texts
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}))
        | anything
    },
)
chat_bodies = st.fixed_dictionaries(
    {"model": model, "messages": st.lists(message, max_size=3) | anything},
    optional={"max_completion_tokens": st.integers(-1, MAX_NEW_TOKENS + 2), **sampling},
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    model_dir = make_model(tmp_path_factory.mktemp("fuzz") / "model")
    with running_server(model_dir, max_new_tokens=MAX_NEW_TOKENS, max_body_bytes=4096) as running:
        yield running


def check(server: RunningServer, path: str, content: bytes, chat: bool) -> None:
    reply = httpx.post(
        server.url + path, content=content, headers={"content-type": "application/json"}
    )
    assert reply.status_code in (200, 400, 404, 413), reply.text
    if reply.status_code != 200:
        error = reply.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["param"] is None or "str" not in error["param"].split("."), error
        return
    if reply.headers["content-type"].startswith("text/event-stream"):
        lines = [line for line in reply.text.split("\n") if line]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert all("error" not in chunk for chunk in chunks), chunks
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert {f for f in finishes if f is not None} <= {"stop", "length"}
        return
    body = reply.json()
    usage = body["usage"]
    choices = body["choices"]
    assert usage["prompt_tokens"] >= 1
    assert 0 <= usage["completion_tokens"] <= MAX_NEW_TOKENS * len(choices)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert [choice["index"] for choice in choices] == list(range(len(choices)))
    for choice in choices:
        assert choice["finish_reason"] in ("stop", "length")
        assert isinstance(choice["message"]["content"] if chat else choice["text"], str)


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()  # NaN and Infinity come out as (invalid) JSON too


@given(completion_bodies)
@FUZZ
def test_fuzz_completions(server: RunningServer, body: dict[str, Any]) -> None:
    check(server, "/v1/completions", encode(body), chat=False)


@given(chat_bodies)
@FUZZ
def test_fuzz_chat_completions(server: RunningServer, body: dict[str, Any]) -> None:
    check(server, "/v1/chat/completions", encode(body), chat=True)


@given(st.binary(max_size=5000) | anything.map(encode))
@settings(FUZZ, max_examples=EXAMPLES // 3)
def test_fuzz_raw_bodies(server: RunningServer, content: bytes) -> None:
    check(server, "/v1/completions", content, chat=False)


def test_engine_survives_the_fuzzing(server: RunningServer) -> None:
    assert server.engine.alive and server.engine.scheduler.running == 0
    assert httpx.get(server.url + "/healthz").status_code == 200
    # Every answer was counted, none of them a 5xx.
    answered = metric(server.url, "llmops_serving_http_requests_total")
    assert answered >= EXAMPLES * 2
    for status in ("500", "503"):
        assert metric(server.url, "llmops_serving_http_requests_total", f'status="{status}"') == 0
