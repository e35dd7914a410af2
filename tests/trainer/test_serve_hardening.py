"""The server as its users push it (issue 15), at a scale the trainer tier affords: lone
surrogates, an empty token, a huge prompt next to a running stream, errors in the metrics,
a burst through the `openai` client's default retries, defaults and error parameters, the
model endpoint, and the serving metrics. benchmarks/serve_burst.py measures the full-size
versions."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serve_support import RunningServer, make_model, metric, running_server, wait_until

from llmops.api.workload import FailureReport, read_record
from llmops_trainer.serve.engine import Engine

OK = {"model": "tiny", "prompt": "hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("hardening") / "out" / "model", scale=8.0)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[RunningServer]:
    with running_server(model_dir, max_new_tokens=32) as running:
        yield running


def client(server: RunningServer, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", **kwargs)


def post(server: RunningServer, path: str, raw: str) -> httpx.Response:
    return httpx.post(
        server.url + path, content=raw.encode(), headers={"content-type": "application/json"}
    )


# -- lone surrogates ---------------------------------------------------------------------------


def test_a_lone_surrogate_is_a_counted_400_naming_the_field(server: RunningServer) -> None:
    invalid = metric(server.url, "llmops_serving_requests_rejected_total", 'reason="invalid"')
    cases = [
        ("/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt[1]"),
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": '
            '[{"type": "text", "text": "\\ud83d"}]}]}',
            "messages[0].content[0].text",
        ),
    ]
    for path, raw, param in cases:
        reply = post(server, path, raw)
        assert reply.status_code == 400, reply.text
        assert reply.headers["content-type"] == "application/json"
        error = reply.json()["error"]
        assert error["param"] == param and "surrogate" in error["message"], error
    after = metric(server.url, "llmops_serving_requests_rejected_total", 'reason="invalid"')
    assert after == invalid + len(cases)


def test_error_params_name_fields_not_pydantic_internals(server: RunningServer) -> None:
    cases = [
        ('{"model": "tiny", "prompt": 5}', "prompt"),
        ('{"model": "tiny", "prompt": "x", "max_tokens": "2"}', "max_tokens"),
        ('{"model": "tiny", "prompt": "x", "max_tokens": true}', "max_tokens"),
        ('{"model": "tiny", "prompt": "x", "stop": [1]}', "stop[0]"),
        ('{"model": "tiny", "prompt": "x", "n": 2, "best_of": 1}', "best_of"),
    ]
    for raw, param in cases:
        reply = post(server, "/v1/completions", raw)
        assert reply.status_code == 400, raw
        assert reply.json()["error"]["param"] == param, reply.text
    chat = '{"model": "tiny", "messages": [{"role": "user", "content": 3}]}'
    error = post(server, "/v1/chat/completions", chat).json()["error"]
    assert error["param"] == "messages[0].content"
    assert error["message"].startswith("messages[0].content: Input should be a valid string")


# -- an empty token ------------------------------------------------------------------------------


def test_an_empty_token_file_refuses_to_start(model_dir: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  \n")  # an empty Secret value, as the kubelet mounts it
    with (
        pytest.raises(RuntimeError, match="empty"),
        running_server(model_dir, auth_token_file=token),
    ):
        pass
    # The process, as the controller runs it: exits with an error instead of serving.
    report = serve_until_it_fails(model_dir, tmp_path, LLMOPS_AUTH_TOKEN_FILE=str(token))
    assert (report.stage, report.reason) == ("serve", "EmptyAuthToken")
    assert "empty" in report.message


def serve_until_it_fails(model_dir: Path, tmp_path: Path, **env: str) -> FailureReport:
    """Run the server as a pod would (its termination log named by the env) and expect it to
    exit 1, leaving the report the ModelDeployment's Degraded condition shows."""
    log = tmp_path / "termination-log"
    command = [sys.executable, "-m", "llmops_trainer.serve", "--model-dir", str(model_dir),
               "--port", "0"]  # fmt: skip
    env = {**os.environ, "LLMOPS_TERMINATION_LOG": str(log), **env}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    report = read_record(FailureReport, log.read_text())
    assert report is not None, log.read_text()
    return report


def test_a_model_that_cannot_load_leaves_a_report_naming_why(tmp_path: Path) -> None:
    empty = tmp_path / "model"
    empty.mkdir()
    report = serve_until_it_fails(empty, tmp_path)
    assert (report.stage, report.reason) == ("serve", "ModelLoadFailed")
    assert f"{empty} is neither an exported model" in report.message


def test_a_token_emptied_while_serving_refuses_every_request(
    model_dir: Path, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret")
    with running_server(model_dir, auth_token_file=token) as running:
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.post(running.url + "/v1/completions", json=OK, headers=good).is_success
        token.write_text("")  # the Secret's value was cleared
        os.utime(token, (time.time() + 5, time.time() + 5))  # a new mtime, surely
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic x"}, good):
            for method, path, body in (
                ("POST", "/v1/completions", OK),
                ("GET", "/v1/models", None),
                ("GET", "/v1/models/tiny", None),
            ):
                reply = httpx.request(method, running.url + path, json=body, headers=headers)
                assert reply.status_code == 503, (headers, path, reply.text)
                assert reply.json()["error"]["code"] == "auth_unavailable"
        assert metric(running.url, "llmops_serving_requests_rejected_total",
                      'reason="auth_unavailable"') == 12  # fmt: skip


# -- a large prompt while another stream runs ----------------------------------------------------


def test_a_huge_prompt_is_tokenized_off_the_event_loop(model_dir: Path) -> None:
    """While the huge prompt is being tokenized (held there by the test), the other stream
    keeps receiving tokens and /healthz answers: tokenization is not on the event loop."""
    tokenizing = threading.Event()
    release = threading.Event()
    threads: list[str] = []

    def slow_decoding(engine: Engine) -> None:
        decode, encode = engine.model.decode, engine.tokenizer.encode

        def paced(*args: Any) -> Any:
            time.sleep(0.01)  # a stream that lasts long enough to watch
            return decode(*args)

        def held(text: str) -> list[int]:
            if len(text) > 500:  # the huge prompt (or the bounded prefix of it)
                threads.append(threading.current_thread().name)
                tokenizing.set()
                assert release.wait(60)
            return encode(text)

        engine.model.decode = paced  # type: ignore[method-assign]
        engine.tokenizer.encode = held  # type: ignore[method-assign]

    with running_server(model_dir, max_new_tokens=60, wrap=slow_decoding) as running:
        received: list[float] = []
        finish: list[str] = []

        def stream() -> None:
            body = {"model": "tiny", "prompt": [1], "max_tokens": 60, "ignore_eos": True,
                    "stream": True}  # fmt: skip
            with httpx.stream("POST", running.url + "/v1/completions", json=body) as reply:
                for line in reply.iter_lines():
                    if line.startswith("data: {"):
                        received.append(time.monotonic())
                        finish.append(json.loads(line[6:])["choices"][0]["finish_reason"])

        huge: list[httpx.Response] = []
        text = "the quick brown fox jumps over a lazy dog " * 21_000  # ~0.9 MB
        streamer = threading.Thread(target=stream)
        streamer.start()
        wait_until(lambda: len(received) >= 2, "the stream to start")
        big = {"model": "tiny", "prompt": text}
        sender = threading.Thread(
            target=lambda: huge.append(
                httpx.post(running.url + "/v1/completions", timeout=60, json=big)
            )
        )
        sender.start()
        assert tokenizing.wait(30)
        before = len(received)
        # The tokenizer is busy with the huge prompt right now, and yet:
        health = httpx.get(running.url + "/healthz", timeout=5)
        assert health.status_code == 200
        wait_until(lambda: len(received) >= before + 3, "tokens while tokenizing", limit=10)
        release.set()
        sender.join(60)
        streamer.join(60)
        assert threads and all(name.startswith("llmops-tokenize") for name in threads)
        assert threading.main_thread().name not in threads
        (reply,) = huge
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
        assert finish[-1] == "length"  # the stream ran to its end, undisturbed


# -- errors in the metrics -----------------------------------------------------------------------


def test_every_error_is_counted(model_dir: Path) -> None:
    broken = threading.Event()

    def breakable(engine: Engine) -> None:
        encode = engine.tokenizer.encode

        def maybe(text: str) -> list[int]:
            if broken.is_set():
                raise RuntimeError("a bug")
            return encode(text)

        engine.tokenizer.encode = maybe  # type: ignore[method-assign]

    with running_server(model_dir, max_new_tokens=32, wrap=breakable) as running:

        def count(name: str, labels: str) -> float:
            return metric(running.url, name, labels)

        rejected = "llmops_serving_requests_rejected_total"
        http = "llmops_serving_http_requests_total"
        long_prompt = {**OK, "prompt": list(range(1, 60)), "max_tokens": 10}
        assert httpx.post(running.url + "/v1/completions", json=long_prompt).status_code == 400
        assert count(rejected, 'reason="context_length"') == 1
        too_many = {**OK, "max_tokens": 33}
        assert httpx.post(running.url + "/v1/completions", json=too_many).status_code == 400
        assert count(rejected, 'reason="max_tokens"') == 1
        assert count(http, 'path="/v1/completions",method="POST",status="400"') == 2
        broken.set()
        reply = httpx.post(running.url + "/v1/completions", json=OK)
        assert reply.status_code == 500
        assert reply.json()["error"]["type"] == "server_error"
        assert count(rejected, 'reason="error"') == 1
        assert count(http, 'path="/v1/completions",status="500"') == 1
        assert httpx.get(running.url + "/nowhere").status_code == 404
        assert count(http, 'path="other",status="404"') == 1


# -- a burst through the openai client's default retries -----------------------------------------


def gated(gate: threading.Event) -> Callable[[Engine], None]:
    def wrap(engine: Engine) -> None:
        decode = engine.model.decode

        def waiting(*args: Any) -> Any:
            assert gate.wait(60)
            return decode(*args)

        engine.model.decode = waiting  # type: ignore[method-assign]

    return wrap


def test_a_burst_that_fits_the_queue_all_succeeds_without_a_429(model_dir: Path) -> None:
    """Four decoding slots and room, 24 streaming clients at once with the openai client's
    default retries: the requests beyond maxConcurrency wait their turn instead of 429."""
    gate = threading.Event()
    gate.set()
    with running_server(
        model_dir, max_batch_size=2, max_concurrency=4, max_queued=20, wrap=gated(gate)
    ) as running:
        gate.clear()  # warmed up; hold decoding until everybody has arrived
        clients = 24

        async def burst() -> list[str]:
            api = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused")
            assert api.max_retries == 2  # the library's default

            async def one(k: int) -> str:
                stream = await api.completions.create(
                    model="tiny", prompt=f"the quick {k}", max_tokens=8, temperature=0,
                    stream=True, extra_body={"ignore_eos": True},
                )  # fmt: skip
                finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
                return str(finishes[-1])

            async def open_gate() -> None:
                while running.engine.scheduler.waiting + len(running.engine._waiters) < 22:
                    await asyncio.sleep(0.01)
                gate.set()

            try:
                results = await asyncio.gather(*(one(k) for k in range(clients)), open_gate())
            finally:
                await api.close()
            return [r for r in results if r is not None]

        assert asyncio.run(burst()) == ["length"] * clients
        http = "llmops_serving_http_requests_total"
        assert metric(running.url, http, 'status="429"') == 0
        assert metric(running.url, http, 'path="/v1/completions",status="200"') == clients
        queued = metric(running.url, "llmops_serving_request_queue_time_seconds_count")
        assert queued == clients + 1  # and the warm-up


def test_a_request_beyond_the_queue_gets_429_after_its_wait(model_dir: Path) -> None:
    gate = threading.Event()
    gate.set()
    with running_server(
        model_dir, max_batch_size=1, max_concurrency=2, max_queued=1, queue_timeout=2.0,
        wrap=gated(gate),
    ) as running:  # fmt: skip
        gate.clear()
        body = {**OK, "max_tokens": 4, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=running.url, timeout=60) as http:
            held = [
                http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
                for _ in range(2)
            ]
            wait_until(lambda: running.engine.scheduler.waiting == 1, "a full scheduler")
            results: list[httpx.Response] = []
            waiter = threading.Thread(
                target=lambda: results.append(
                    httpx.post(running.url + "/v1/completions", json=OK, timeout=60)
                )
            )
            waiter.start()
            wait_until(lambda: len(running.engine._waiters) == 1, "a waiting request")
            assert metric(running.url, "llmops_serving_requests_waiting") == 2
            # The queue (one) is full: the next is refused at once, the waiting one in time.
            refused = httpx.post(running.url + "/v1/completions", json=OK)
            assert refused.status_code == 429
            waiter.join(30)
            assert results[0].status_code == 429
            for reply in (refused, results[0]):
                assert int(reply.headers["retry-after"]) >= 1
                assert int(reply.headers["retry-after-ms"]) > 0
            gate.set()
            for reply in held:
                assert [line for line in reply.iter_lines() if line][-1] == "data: [DONE]"
        assert metric(running.url, "llmops_serving_requests_rejected_total",
                      'reason="queue_full"') == 2  # fmt: skip


def test_a_client_leaving_the_queue_frees_its_place(model_dir: Path) -> None:
    gate = threading.Event()
    gate.set()
    with running_server(
        model_dir, max_batch_size=1, max_concurrency=1, max_queued=4, wrap=gated(gate)
    ) as running:
        gate.clear()
        body = {**OK, "max_tokens": 4, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=running.url, timeout=60) as http:
            first = http.send(http.build_request("POST", "/v1/completions", json=body),
                              stream=True)  # fmt: skip
            wait_until(lambda: running.engine.scheduler.running == 1, "a running request")

            outcomes: list[BaseException | None] = []

            def leave() -> None:  # times out while queued: the client goes away
                try:
                    httpx.post(running.url + "/v1/completions", json=OK, timeout=2.0)
                    outcomes.append(None)
                except httpx.ReadTimeout as error:
                    outcomes.append(error)

            leaving = threading.Thread(target=leave)
            leaving.start()
            wait_until(lambda: len(running.engine._waiters) == 1, "a waiting request")
            leaving.join(30)
            assert len(outcomes) == 1 and isinstance(outcomes[0], httpx.ReadTimeout)
            wait_until(lambda: not running.engine._waiters, "the waiter to leave")
            gate.set()
            assert [line for line in first.iter_lines() if line][-1] == "data: [DONE]"
        assert running.engine.scheduler.waiting == 0


def test_draining_answers_the_queued_requests_503(model_dir: Path) -> None:
    gate = threading.Event()
    gate.set()
    with running_server(
        model_dir, max_batch_size=1, max_concurrency=1, max_queued=4, wrap=gated(gate)
    ) as running:
        gate.clear()
        body = {**OK, "max_tokens": 4, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=running.url, timeout=60) as http:
            first = http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
            wait_until(lambda: running.engine.scheduler.running == 1, "a running request")
            results: list[httpx.Response] = []
            waiter = threading.Thread(
                target=lambda: results.append(httpx.post(running.url + "/v1/completions", json=OK))
            )
            waiter.start()
            wait_until(lambda: len(running.engine._waiters) == 1, "a waiting request")
            running.engine.close()  # what SIGTERM does first
            waiter.join(30)
            assert results[0].status_code == 503
            assert results[0].json()["error"]["message"] == "the server is shutting down"
            gate.set()  # ...while what was admitted still completes
            assert [line for line in first.iter_lines() if line][-1] == "data: [DONE]"


# -- defaults, the model endpoint, metrics -------------------------------------------------------


def test_completions_default_to_16_tokens_like_openai(server: RunningServer) -> None:
    reply = client(server, max_retries=0).completions.create(
        model="tiny", prompt="the", temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 16


def test_one_model_endpoint(server: RunningServer) -> None:
    api = client(server, max_retries=0)
    card = api.models.retrieve("tiny")
    assert card.id == "tiny" and card.object == "model"
    assert card.model_dump()["max_model_len"] == 64
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("other")


def test_serving_metrics_carry_the_model_name_and_new_series(model_dir: Path) -> None:
    gate = threading.Event()
    gate.set()
    with running_server(model_dir, max_batch_size=2, wrap=gated(gate)) as running:
        gate.clear()
        body = {**OK, "prompt": [1, 2, 3, 4], "max_tokens": 5, "stream": True,
                "ignore_eos": True}  # fmt: skip
        with httpx.Client(base_url=running.url, timeout=60) as http:
            reply = http.send(http.build_request("POST", "/v1/completions", json=body),
                              stream=True)  # fmt: skip
            wait_until(lambda: running.engine.scheduler.running == 1, "a running request")
            usage = metric(running.url, "llmops_serving_kv_cache_usage_ratio")
            # Four prompt positions cached of 2 slots x 64 positions (or five, a step on).
            assert usage in (4 / 128, 5 / 128)
            gate.set()
            assert [line for line in reply.iter_lines() if line][-1] == "data: [DONE]"
        assert metric(running.url, "llmops_serving_kv_cache_usage_ratio") == 0
        text = httpx.get(running.url + "/metrics").text
        samples = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert samples and all('model_name="tiny"' in line for line in samples)
        assert "_created" not in text
        assert metric(running.url, "llmops_serving_request_prompt_tokens_sum") == 4 + 1
        assert metric(running.url, "llmops_serving_request_generation_tokens_sum") == 5 + 2
        assert metric(running.url, "llmops_serving_request_queue_time_seconds_count") == 2
        assert metric(running.url, "llmops_serving_requests_total",
                      'model_name="tiny",finish_reason="length"') == 2  # fmt: skip


def test_streamed_usage_counts_every_choice(server: RunningServer) -> None:
    body = {**OK, "prompt": ["a", "b"], "n": 2, "max_tokens": 3, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    lines = [line for line in httpx.post(server.url + "/v1/completions", json=body).text.split(
        "\n") if line]  # fmt: skip
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2].removeprefix("data: "))["usage"]
    assert usage["completion_tokens"] == 12
