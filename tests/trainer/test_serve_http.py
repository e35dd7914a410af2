"""The HTTP API through the official `openai` client and raw requests, against uvicorn on
127.0.0.1 serving a tiny random model in the trainer's export format."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serve_support import RunningServer, make_model, running_server, wait_until
from serve_support import metric as support_metric

from llmops_trainer.serve.engine import Engine

GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the quick fox"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("http") / "out" / "model", scale=8.0)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[RunningServer]:
    with running_server(model_dir, max_new_tokens=32) as running:
        yield running


def client(server: RunningServer, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **kwargs)


def metric(server: RunningServer, name: str, labels: str = "") -> float:
    return support_metric(server.url, name, labels)


# -- the OpenAI client ------------------------------------------------------------------------


def test_completion_with_and_without_streaming(server: RunningServer) -> None:
    api = client(server)
    whole = api.completions.create(model="tiny", prompt="the lazy dog", max_tokens=9, **GREEDY)
    choice = whole.choices[0]
    assert whole.object == "text_completion" and whole.model == "tiny"
    assert choice.finish_reason == "length" and choice.text
    prompt_tokens = len(server.engine.tokenizer.encode("the lazy dog"))
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 9)
    assert whole.usage.total_tokens == prompt_tokens + 9
    chunks = list(
        api.completions.create(
            model="tiny", prompt="the lazy dog", max_tokens=9, stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9


def test_chat_with_and_without_streaming(server: RunningServer) -> None:
    api = client(server)
    whole = api.chat.completions.create(model="tiny", messages=CHAT, max_tokens=7, **GREEDY)  # type: ignore[arg-type]
    message = whole.choices[0].message
    assert whole.object == "chat.completion" and message.role == "assistant"
    assert whole.usage is not None and whole.usage.completion_tokens <= 7
    stream = api.chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_tokens=7,
        stream=True,
        **GREEDY,  # type: ignore[arg-type]
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_sequences_cut_the_text(server: RunningServer) -> None:
    api = client(server)
    text = api.completions.create(model="tiny", prompt="a dog", max_tokens=16, **GREEDY)
    full = text.choices[0].text
    stop = full[len(full) // 2 :][:2]
    cut = api.completions.create(model="tiny", prompt="a dog", max_tokens=16, stop=[stop], **GREEDY)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.find(stop)]


def test_seed_makes_sampling_reproducible(server: RunningServer) -> None:
    api = client(server)

    def draw(seed: int) -> str:
        reply = api.completions.create(
            model="tiny", prompt="seven wizards", max_tokens=12, temperature=1.0, top_p=0.95,
            seed=seed, extra_body={"top_k": 50, "ignore_eos": True},
        )  # fmt: skip
        return reply.choices[0].text

    assert draw(3) == draw(3)
    assert len({draw(seed) for seed in range(4)}) > 1


def test_concurrent_requests_get_their_unbatched_answers(server: RunningServer) -> None:
    prompts = ["the quick", "brown fox jumps", "over", "a lazy dog while", "hum", "seven", "q"]
    api = client(server)
    alone = [
        api.completions.create(model="tiny", prompt=p, max_tokens=6 + i, **GREEDY).choices[0].text
        for i, p in enumerate(prompts)
    ]

    async def together() -> list[str]:
        aio = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        replies = await asyncio.gather(
            *(
                aio.completions.create(model="tiny", prompt=p, max_tokens=6 + i, **GREEDY)
                for i, p in enumerate(prompts)
            )
        )
        await aio.close()
        return [r.choices[0].text for r in replies]

    batches_before = metric(server, "llmops_serving_batch_size_sum")
    assert asyncio.run(together()) == alone
    assert metric(server, "llmops_serving_batch_size_sum") > batches_before


def test_models_and_probes(server: RunningServer) -> None:
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/readyz").text == "ready\n"


def test_metrics_count_tokens_and_latencies(server: RunningServer) -> None:
    before = {
        name: metric(server, name)
        for name in (
            "llmops_serving_prompt_tokens_total",
            "llmops_serving_generation_tokens_total",
            "llmops_serving_time_to_first_token_seconds_count",
            "llmops_serving_e2e_request_latency_seconds_count",
            "llmops_serving_inter_token_latency_seconds_count",
        )
    }
    reply = client(server).completions.create(model="tiny", prompt="dog", max_tokens=5, **GREEDY)
    assert reply.usage is not None
    after = {name: metric(server, name) for name in before}
    delta = {name: after[name] - before[name] for name in before}
    assert delta["llmops_serving_prompt_tokens_total"] == reply.usage.prompt_tokens
    assert delta["llmops_serving_generation_tokens_total"] == 5
    assert delta["llmops_serving_time_to_first_token_seconds_count"] == 1
    assert delta["llmops_serving_e2e_request_latency_seconds_count"] == 1
    assert delta["llmops_serving_inter_token_latency_seconds_count"] == 4
    text = httpx.get(server.url + "/metrics").text
    for name in ("llmops_serving_requests_running", "llmops_serving_requests_waiting"):
        assert f'\n{name}{{model_name="tiny"}} 0.0' in text
    assert 'llmops_serving_requests_total{finish_reason="length",model_name="tiny"}' in text
    assert "_created" not in text


# -- bad input --------------------------------------------------------------------------------

OK = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
CHAT_OK = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG_PROMPT = list(range(1, 60))  # the model's context is 64 tokens

BAD_REQUESTS: list[tuple[str, str, Any, int, str]] = [
    ("POST", "/v1/completions", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "request body"),
    ("POST", "/v1/completions", b"", 400, "request body"),
    ("POST", "/v1/completions", {"model": "tiny"}, 400, "prompt: Field required"),
    ("POST", "/v1/completions", {"prompt": "x"}, 400, "model: Field required"),
    ("POST", "/v1/completions", {**OK, "model": "gpt-4"}, 404, "does not exist"),
    (
        "POST",
        "/v1/completions",
        {**OK, "n": 17},
        400,
        "n: Input should be less than or equal to 16",
    ),
    ("POST", "/v1/completions", {**OK, "n": 3, "best_of": 2}, 400, "best_of: must be at least n"),
    ("POST", "/v1/completions", {**OK, "best_of": 9}, 400, "needs 9 sequences"),
    ("POST", "/v1/completions", {**OK, "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/completions", {**OK, "temperature": "hot"}, 400, "temperature"),
    ("POST", "/v1/completions", {**OK, "top_p": 1.5}, 400, "top_p"),
    ("POST", "/v1/completions", {**OK, "top_k": -5}, 400, "top_k"),
    ("POST", "/v1/completions", {**OK, "max_tokens": -1}, 400, "max_tokens"),
    (
        "POST",
        "/v1/completions",
        {**OK, "max_tokens": "2"},
        400,
        "max_tokens: Input should be a valid integer",
    ),
    (
        "POST",
        "/v1/completions",
        {**OK, "max_tokens": True},
        400,
        "max_tokens: Input should be a valid integer",
    ),
    ("POST", "/v1/completions", {**OK, "temperature": True}, 400, "temperature"),
    (
        "POST",
        "/v1/completions",
        {**OK, "logit_bias": {"9999": 1}},
        400,
        "logit_bias: token id 9999",
    ),
    (
        "POST",
        "/v1/completions",
        {**OK, "logit_bias": {"x": 1}},
        400,
        "logit_bias: String should match",
    ),
    ("POST", "/v1/completions", {**OK, "max_tokens": 33}, 400, "at most 32"),
    (
        "POST",
        "/v1/completions",
        {**OK, "prompt": LONG_PROMPT, "max_tokens": 10},
        400,
        "maximum context length is 64",
    ),
    (
        "POST",
        "/v1/completions",
        {**OK, "prompt": list(range(70)), "max_tokens": None},
        400,
        "maximum context length",
    ),
    ("POST", "/v1/completions", {**OK, "prompt": [10**6]}, 400, "token ids must be below"),
    ("POST", "/v1/completions", {**OK, "prompt": [["a"]]}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "prompt": ["a", 1]}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "prompt": 5}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "unknown": 1}, 400, "unknown: unrecognized"),
    ("POST", "/v1/completions", {**OK, "stop": ["a"] * 5}, 400, "at most 4"),
    (
        "POST",
        "/v1/completions",
        {**OK, "stream_options": {"include_usage": True}},
        400,
        "only allowed when stream",
    ),
    ("POST", "/v1/completions", {**OK, "logprobs": 21}, 400, "logprobs: Input should be less"),
    ("POST", "/v1/completions", {**OK, "suffix": "x"}, 400, "suffix: not supported"),
    (
        "POST",
        "/v1/completions",
        {**OK, "stream": True, "best_of": 2},
        400,
        "best_of: cannot be streamed",
    ),
    ("POST", "/v1/completions", {**OK, "seed": 2**70}, 400, "seed"),
    ("POST", "/v1/chat/completions", {**CHAT_OK, "messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "x"}]}, 400, "role"),
    ("POST", "/v1/chat/completions", {**CHAT_OK, "messages": [{"content": "x"}]}, 400, "role"),
    (
        "POST",
        "/v1/chat/completions",
        {**CHAT_OK, "messages": [{"role": "user", "content": 3}]},
        400,
        "content",
    ),
    ("POST", "/v1/chat/completions", {**CHAT_OK, "top_logprobs": 2}, 400, "needs logprobs"),
    ("POST", "/v1/chat/completions", {**CHAT_OK, "max_completion_tokens": 99}, 400, "at most"),
    ("POST", "/v1/completions", b"x" * 5000, 413, "larger than 4096 bytes"),
    ("GET", "/v1/completions", None, 405, "Method Not Allowed"),
    ("GET", "/v1/nothing", None, 404, "Not Found"),
]


@pytest.fixture(scope="module")
def small_body_server(model_dir: Path) -> Iterator[RunningServer]:
    with running_server(model_dir, max_new_tokens=32, max_body_bytes=4096) as running:
        yield running


@pytest.mark.parametrize("method, path, body, status, message", BAD_REQUESTS)
def test_bad_requests_get_a_clear_error(
    small_body_server: RunningServer, method: str, path: str, body: Any, status: int, message: str
) -> None:
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
    headers = {"content-type": "application/json"}
    reply = httpx.request(method, small_body_server.url + path, content=content, headers=headers)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message in error["message"], error
    assert error["type"]


def test_oversized_chunked_body_is_refused_while_reading(small_body_server: RunningServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(1000):  # would be 1 MB; the server stops reading after 4 kB
            yield b"x" * 1000

    reply = httpx.post(small_body_server.url + "/v1/completions", content=chunks())
    assert reply.status_code == 413
    assert metric(small_body_server, "llmops_serving_requests_rejected_total",
                  'reason="too_large"') >= 1  # fmt: skip


def test_openai_client_raises_typed_errors(server: RunningServer) -> None:
    api = client(server)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.completions.create(model="other", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context length"):
        api.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=30)


# -- auth, overload, disconnects ---------------------------------------------------------------


def test_bearer_token(model_dir: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with running_server(model_dir, auth_token_file=token) as running:
        url = running.url
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic s3cret"}):
            reply = httpx.post(url + "/v1/completions", json=OK, headers=headers)
            assert reply.status_code == 401
            assert reply.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + "/v1/models").status_code == 401
        api = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert api.completions.create(model="tiny", prompt="x", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()
        for path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapes need no token
            assert httpx.get(url + path).status_code == 200
        token.write_text("rotated")  # a rotated Secret takes effect without a restart
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer rotated"}).is_success


def gated(gate: threading.Event) -> Callable[[Engine], None]:
    """Makes every decoding step wait for `gate`: the test decides when generation advances."""

    def wrap(engine: Engine) -> None:
        decode = engine.model.decode

        def waiting(tokens: list[int], positions: list[int], adapters: Any = None) -> Any:
            assert gate.wait(60)
            return decode(tokens, positions, adapters)

        engine.model.decode = waiting  # type: ignore[method-assign]

    return wrap


def test_full_queue_without_a_wait_gets_429_with_a_spread_retry_after(model_dir: Path) -> None:
    gate = threading.Event()
    gate.set()
    with running_server(
        model_dir, max_batch_size=1, max_concurrency=2, wrap=gated(gate), max_queued=0
    ) as running:
        gate.clear()
        body = {**OK, "max_tokens": 8, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=running.url, timeout=60) as http:
            first = http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
            second = http.send(
                http.build_request("POST", "/v1/completions", json=body), stream=True
            )
            wait_until(lambda: running.engine.scheduler.waiting == 1, "one queued request")
            rejected = [httpx.post(running.url + "/v1/completions", json=OK) for _ in range(3)]
            assert [r.status_code for r in rejected] == [429] * 3
            assert all(int(r.headers["retry-after"]) >= 1 for r in rejected)
            # Spread, so that refused clients do not all come back at the same moment.
            assert len({r.headers["retry-after-ms"] for r in rejected}) > 1
            assert "capacity" in rejected[0].json()["error"]["message"]
            with pytest.raises(openai.RateLimitError):
                client(running).completions.create(model="tiny", prompt="x", max_tokens=1)
            gate.set()
            for reply in (first, second):
                lines = [line for line in reply.iter_lines() if line]
                assert lines[-1] == "data: [DONE]"
                assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        rejected_total = metric(running, "llmops_serving_requests_rejected_total",
                                'reason="queue_full"')  # fmt: skip
        assert rejected_total == 4


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_generation(model_dir: Path, stream: bool) -> None:
    gate = threading.Event()
    gate.set()
    with running_server(model_dir, max_batch_size=2, wrap=gated(gate)) as running:
        gate.clear()
        body = json.dumps({**OK, "max_tokens": 30, "stream": stream, "ignore_eos": True})
        host, port = running.url.removeprefix("http://").split(":")
        # A raw socket: the client hangs up without waiting for any response header.
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                f"{body}".encode()
            )
            wait_until(lambda: running.engine.scheduler.running == 1, "a running generation")
            generation = running.engine._running[0]
        # Nobody reads the answer any more: the engine drops it at the next step.
        wait_until(lambda: generation.cancelled, "the server to notice the disconnect")
        gate.set()
        wait_until(lambda: running.engine.scheduler.running == 0, "the slot to be freed")
        assert len(generation.output_ids) < 30
        assert metric(running, "llmops_serving_requests_total", 'finish_reason="cancelled"') == 1
