"""The HTTP API: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /healthz,
/readyz and /metrics on the same port.

Errors use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`) so clients show
the message: 400 for invalid requests (including prompts too long for the context), 401
without the bearer token, 404 for another model name, 413 for oversized bodies, 429 with
Retry-After when the queue is full, 503 while loading or draining.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmops_trainer.serve.engine import Delta, Done, Engine, Stream
from llmops_trainer.serve.metrics import ServingMetrics
from llmops_trainer.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    SamplingParams,
)
from llmops_trainer.serve.text import CHAT_STOPS, chat_prompt

log = logging.getLogger("llmops_trainer.serve")
RETRY_AFTER_SECONDS = 1
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
}


@dataclass
class ServerState:
    """What the routes need; `engine` appears once the model is loaded and warmed up."""

    served_name: str
    label: str
    context_length: int
    max_new_tokens: int
    metrics: ServingMetrics
    auth_token_file: Path | None = None
    engine: Engine | None = None
    ready: bool = False
    draining: bool = False
    failed: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    _token: tuple[float, str] | None = None

    def token(self) -> str | None:
        """The bearer token, re-read when the mounted Secret changes (kubelet updates it)."""
        if self.auth_token_file is None:
            return None
        try:
            mtime = self.auth_token_file.stat().st_mtime
            if self._token is None or self._token[0] != mtime:
                self._token = (mtime, self.auth_token_file.read_text().strip())
        except OSError as error:
            if self._token is None:  # fail closed: no token file means nobody gets in
                raise RequestError("authentication is not available", 503) from error
        assert self._token is not None
        return self._token[1]


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> Any:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: RequestError) -> JSONResponse:
    headers = {}
    if error.status == 429:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = error_body(error.status, error.message, error.param, error.code)
    return JSONResponse(body, status_code=error.status, headers=headers)


class BodyLimit:
    """Reads request bodies up to `limit` bytes and answers 413 beyond, before any parsing, so
    an oversized or endless body never sits in memory whole."""

    def __init__(self, app: ASGIApp, limit: int, metrics: ServingMetrics) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the client's disconnect

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.rejected.labels(reason="too_large").inc()
        message = f"request body larger than {self.limit} bytes"
        response = JSONResponse(error_body(413, message, code="request_too_large"), 413)
        await response(scope, receive, send)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
    if first.get("type") == "model_attributes_type" or not location:
        return message if location else f"request body: {message}", None
    if first.get("type") == "extra_forbidden":
        message = "unrecognized request argument"
    param = ".".join(location)
    return f"{param}: {message}", param


def create_app(
    state: ServerState,
    load: Callable[[], Engine],
    max_body_bytes: int = 1 << 20,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """The app; `load` builds the engine (in a thread, so probes answer while it loads)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_start(state, load, on_fatal))
        try:
            yield
        finally:
            loader.cancel()
            if state.engine is not None:
                await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="llmops inference server", lifespan=lifespan, docs_url=None, redoc_url=None)
    metrics = state.metrics
    app.add_middleware(BodyLimit, limit=max_body_bytes, metrics=metrics)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        metrics.rejected.labels(reason="invalid").inc()
        message, param = _validation_message(error)
        return error_response(RequestError(message, 400, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(error.status_code, str(error.detail)),
            status_code=error.status_code,
            headers=error.headers,
        )

    def authorize(request: Request) -> None:
        token = state.token()
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
            metrics.rejected.labels(reason="unauthorized").inc()
            raise RequestError("missing or invalid bearer token", 401, code="invalid_api_key")

    def engine_for(model: str) -> tuple[Engine, int]:
        """The engine and the adapter (0: the base) a request's `model` names."""
        if state.draining:
            metrics.rejected.labels(reason="draining").inc()
            raise RequestError("the server is shutting down", 503)
        if state.engine is None or not state.ready:
            raise RequestError("the model is still loading", 503)
        names = [state.served_name, *state.engine.adapter_names]
        if model not in names:
            metrics.rejected.labels(reason="not_found").inc()
            served = ", ".join(repr(n) for n in names)
            raise RequestError(
                f"the model {model!r} does not exist; this server serves {served}",
                404,
                "model",
                "model_not_found",
            )
        return state.engine, names.index(model)

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> PlainTextResponse:
        if state.failed or (state.engine is not None and not state.engine.alive and state.ready):
            return PlainTextResponse(f"unhealthy: {state.failed or 'engine stopped'}\n", 503)
        return PlainTextResponse("ok\n")

    @app.get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> PlainTextResponse:
        if state.draining:
            return PlainTextResponse("draining\n", 503)
        if not state.ready:
            return PlainTextResponse("loading\n", 503)
        return PlainTextResponse("ready\n")

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        card = {
            "id": state.served_name,
            "object": "model",
            "created": state.created,
            "owned_by": "llmops",
            "root": state.label,
            "max_model_len": state.context_length,
        }
        adapter_names = state.engine.adapter_names if state.engine is not None else []
        cards = [card] + [
            {**card, "id": name, "root": name, "parent": state.served_name}
            for name in adapter_names
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        authorize(request)
        engine, adapter = engine_for(body.model)
        prompt = body.single_prompt()
        ids = _encode(engine, prompt) if isinstance(prompt, str) else _check_ids(engine, prompt)
        params = body.sampling(_token_limit(state, engine, ids, body.max_tokens))
        return await _respond(state, request, engine, adapter, ids, params, body, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        authorize(request)
        engine, adapter = engine_for(body.model)
        messages = [(m.role, m.text()) for m in body.messages]
        stops: tuple[str, ...]
        if engine.chat is not None:  # the model's own template; its end-of-turn id stops
            try:
                prompt, stops = engine.chat.render(messages), ()
            except ValueError as error:
                raise RequestError(str(error), 400, "messages") from error
        else:
            prompt, stops = chat_prompt(messages), CHAT_STOPS
        ids = _encode(engine, prompt)
        limit = _token_limit(state, engine, ids, body.token_limit())
        params = body.sampling(limit, extra_stops=stops)
        return await _respond(state, request, engine, adapter, ids, params, body, chat=True)

    return app


async def _start(
    state: ServerState, load: Callable[[], Engine], on_fatal: Callable[[], None] | None
) -> None:
    try:
        engine = await asyncio.to_thread(load)
        engine.start()
        state.engine = engine
        # Warm-up: one short generation, so the first client does not pay for lazy set-up.
        stream = engine.submit([0], SamplingParams(max_tokens=2, temperature=0.0))
        if stream is not None:
            async for _ in stream.events():
                pass
        state.ready = True
        log.info("ready: serving %s (%s)", state.served_name, state.label)
    except Exception as error:  # reported through /healthz and the exit code
        log.exception("loading the model failed")
        state.failed = str(error) or type(error).__name__
        if on_fatal is not None:
            on_fatal()


def _encode(engine: Engine, text: str) -> list[int]:
    try:
        ids = engine.tokenizer.encode(text)
    except ValueError as error:
        raise RequestError(str(error), 400, "prompt") from error
    if not ids:
        if engine.eos_token_id is None:
            raise RequestError("prompt: must not be empty", 400, "prompt")
        ids = [engine.eos_token_id]  # GPT-2's convention: an empty prompt starts a document
    return ids


def _check_ids(engine: Engine, ids: list[int]) -> list[int]:
    vocab = engine.model.config.vocab_size
    if not ids:
        return _encode(engine, "")
    if max(ids) >= vocab:
        raise RequestError(f"prompt: token ids must be below {vocab}", 400, "prompt")
    return ids


def _token_limit(state: ServerState, engine: Engine, ids: list[int], asked: int | None) -> int:
    room = state.context_length - len(ids)
    if asked is None:
        if room < 1:
            raise RequestError(
                f"This model's maximum context length is {state.context_length} tokens; the "
                f"prompt has {len(ids)} tokens, leaving no room for a completion.",
                400,
                "prompt",
                "context_length_exceeded",
            )
        return min(state.max_new_tokens, room)
    if asked > state.max_new_tokens:
        raise RequestError(
            f"max_tokens: at most {state.max_new_tokens} tokens per request", 400, "max_tokens"
        )
    if asked > room:
        raise RequestError(
            f"This model's maximum context length is {state.context_length} tokens. However, "
            f"you requested {len(ids) + asked} tokens ({len(ids)} in the prompt, {asked} for "
            f"the completion). Please reduce the prompt or the completion length.",
            400,
            "max_tokens",
            "context_length_exceeded",
        )
    return asked


async def _respond(
    state: ServerState,
    request: Request,
    engine: Engine,
    adapter: int,
    ids: list[int],
    params: SamplingParams,
    body: CompletionRequest | ChatCompletionRequest,
    chat: bool,
) -> JSONResponse | StreamingResponse:
    stream = engine.submit(ids, params, adapter)
    if stream is None:
        if state.draining or engine.scheduler.closed:
            state.metrics.rejected.labels(reason="draining").inc()
            raise RequestError("the server is shutting down", 503)
        state.metrics.rejected.labels(reason="queue_full").inc()
        raise RequestError(
            "the server is at capacity; retry later", 429, code="rate_limit_exceeded"
        )
    reply = _Reply(body.model, chat)  # the base's or an adapter's name, as asked
    if body.stream:
        return StreamingResponse(
            _sse(engine, stream, reply, body.include_usage()),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    outcome = await _collect(engine, stream, request)
    if outcome is None:  # the client went away; nobody reads this
        return JSONResponse(error_body(499, "client closed the request"), 499)
    text, done = outcome
    if done.finish_reason not in ("stop", "length"):
        status = 500 if done.finish_reason == "error" else 503
        raise RequestError(done.error or "generation was interrupted", status)
    return JSONResponse(reply.whole(text, done))


async def _collect(engine: Engine, stream: Stream, request: Request) -> tuple[str, Done] | None:
    """The whole text, or None if the client disconnected first (the work is then cancelled)."""
    parts: list[str] = []

    async def consume() -> Done:
        async for event in stream.events():
            if isinstance(event, Delta):
                parts.append(event.text)
            else:
                return event
        raise AssertionError("stream ended without Done")

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            engine.cancel(stream)
    if consumer.cancelled():
        return None
    return "".join(parts), consumer.result()


async def _sse(
    engine: Engine, stream: Stream, reply: _Reply, include_usage: bool
) -> AsyncIterator[str]:
    finished = False
    try:
        if reply.chat:
            yield _event(reply.chunk({"role": "assistant", "content": ""}, None))
        async for event in stream.events():
            if isinstance(event, Delta):
                yield _event(reply.chunk(event.text, None))
                continue
            finished = True
            if event.error is not None or event.finish_reason not in ("stop", "length"):
                message = event.error or "generation was interrupted"
                yield _event(error_body(503, message))
            else:
                yield _event(reply.chunk("", event.finish_reason))
            if include_usage:
                yield _event({**reply.chunk("", None, choices=False), "usage": _usage(event)})
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client disconnected mid-stream
            engine.cancel(stream)


def _event(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


class _Reply:
    """Response bodies of one request, in the completion or the chat shape."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, object_type: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_type, "created": self.created, "model": self.model}

    def whole(self, text: str, done: Done) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
            head = self._head("text_completion")
        choice["finish_reason"] = done.finish_reason
        return {**head, "choices": [choice], "usage": _usage(done)}

    def chunk(
        self, content: str | dict[str, str], finish: str | None, choices: bool = True
    ) -> dict[str, Any]:
        if self.chat:
            head = self._head("chat.completion.chunk")
            if isinstance(content, dict):
                delta = content
            else:
                delta = {"content": content} if content else {}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None}
        else:
            head = self._head("text_completion")
            choice = {"index": 0, "text": content, "logprobs": None}
        choice["finish_reason"] = finish
        return {**head, "choices": [choice] if choices else []}
