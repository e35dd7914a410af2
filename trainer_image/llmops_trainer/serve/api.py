"""The HTTP API: OpenAI's /v1/completions, /v1/chat/completions, /v1/models and
/v1/models/{model}, plus /healthz, /readyz and /metrics on the same port.

Errors use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`) so clients show
the message: 400 for invalid requests (including prompts too long for the context), 401
without the bearer token, 404 for another model name, 413 for oversized bodies, 429 with a
spread Retry-After when the queue stays full for its whole wait, 503 while loading, draining
or without a usable token, 500 for a bug. Every one of them is counted in
`llmops_serving_requests_rejected_total` (by reason) and `llmops_serving_http_requests_total`
(by status), and `/openapi.json` lists them, generated from the same models that validate.

Nothing slow runs on the event loop: the length of a prompt is bounded cheaply first, and
tokenization and chat templates run on a small thread pool, so probes and streams keep
flowing while a large prompt is processed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmops_trainer.serve.engine import Closed, Delta, Done, Engine, Event, QueueFull, Stream
from llmops_trainer.serve.failures import failure_reason
from llmops_trainer.serve.metrics import ServingMetrics
from llmops_trainer.serve.protocol import (
    DEFAULT_COMPLETION_TOKENS,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    RequestError,
    SamplingParams,
    field_names,
)
from llmops_trainer.serve.replies import Choice, Reply, TokenNames, sse_event, usage
from llmops_trainer.serve.settings import EmptyTokenError, read_token
from llmops_trainer.serve.text import CHAT_STOPS, chat_prompt

log = logging.getLogger("llmops_trainer.serve")
T = TypeVar("T")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
}
_PARAMS = field_names(CompletionRequest, ChatCompletionRequest)
TOKENIZER_THREADS = 2
# Routes as labelled in llmops_serving_http_requests_total (anything else is "other").
_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz", "/readyz",
           "/metrics", "/openapi.json")  # fmt: skip


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
    failed_reason: str = "ServerFailed"  # a SERVER_REASONS entry once `failed` is set
    created: int = field(default_factory=lambda: int(time.time()))
    _token: tuple[float, str] | None = None

    def token(self) -> str | None:
        """The bearer token, re-read when the mounted Secret changes (kubelet updates it).
        Never fails open: without a readable, non-empty token every request gets a 503."""
        if self.auth_token_file is None:
            return None
        try:
            mtime = self.auth_token_file.stat().st_mtime
            if self._token is None or self._token[0] != mtime:
                self._token = (mtime, self.auth_token_file.read_text().strip())
        except OSError as error:
            if self._token is None:  # fail closed: no token file means nobody gets in
                raise _auth_unavailable("the token file cannot be read") from error
        assert self._token is not None
        if not self._token[1]:
            raise _auth_unavailable("the token is empty")
        return self._token[1]


def _auth_unavailable(why: str) -> RequestError:
    return RequestError(
        f"authentication is not available: {why}", 503, code="auth_unavailable",
        reason="auth_unavailable",
    )  # fmt: skip


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> Any:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": _printable(message), "type": kind, "param": param, "code": code}}


def _printable(text: str) -> str:
    """Text that encodes as UTF-8 (a message may quote a client's lone surrogate)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(error: RequestError) -> JSONResponse:
    headers = {}
    if error.status == 429:
        seconds = error.retry_after or 1.0
        headers["Retry-After"] = str(max(1, math.ceil(seconds)))
        headers["retry-after-ms"] = str(max(1, round(seconds * 1000)))
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


class CountResponses:
    """Counts every HTTP response by route, method and status, including the 500 of an
    exception that escapes the app."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in _ROUTES else "other"
        if path.startswith("/v1/models/"):
            route = "/v1/models/{model}"
        status: list[int] = []

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not status:
                status.append(500)
            raise
        finally:
            code = str(status[0]) if status else "499"  # nothing sent: the client left
            self.metrics.http_responses.labels(route, scope["method"], code).inc()


def _validation_error(error: RequestValidationError) -> RequestError:
    """A 400 naming the field the way a client wrote it (`messages[0].content`), never
    pydantic's internals (union members such as `str` or `list[int]`)."""
    errors = list(error.errors())
    if not errors:
        return RequestError("invalid request", 400)
    if errors[0].get("type") == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", "")
        return RequestError(f"request body is not valid JSON: {detail}", 400)

    def where(e: Any) -> list[str | int]:
        parts = [p for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "extra_forbidden":
            return [*(p for p in parts[:-1] if isinstance(p, int) or p in _PARAMS), parts[-1]]
        return [p for p in parts if isinstance(p, int) or p in _PARAMS]

    def rank(e: Any) -> tuple[bool, int]:
        # A broken constraint or value beats "wrong type" (which every other member of a
        # union reports too); deeper beats shallower.
        return (str(e.get("type", "")).endswith("_type"), -len(where(e)))

    first = min(errors, key=rank)
    location = where(first)
    if not location:
        message = _message(first)
        named = message.split(":", 1)[0]
        if named in _PARAMS:  # a rule across fields names the one to fix first
            return RequestError(message, 400, named)
        return RequestError(f"request body: {message}", 400)
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in location).lstrip(".")
    message = _message(first)
    if first.get("type") == "extra_forbidden":
        message = "unrecognized request argument"
    elif str(first.get("type", "")).endswith("_type"):
        alternatives = [_message(e) for e in errors if where(e) == location]
        message = " or ".join(
            dict.fromkeys(
                [alternatives[0]] + [a.removeprefix("Input should be ") for a in alternatives]
            )
        )
        message = message.replace(f"{alternatives[0]} or {alternatives[0]}", alternatives[0])
    if first.get("type") == "none_required":
        message = "not supported (only null is accepted)"
    return RequestError(f"{param}: {message}", 400, param)


def _message(error: Any) -> str:
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (the message names the field)"},
    404: {"model": ErrorResponse, "description": "No such model"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    429: {
        "model": ErrorResponse,
        "description": "Still at capacity after queueing; retry after the time given",
        "headers": {
            "Retry-After": {"description": "Seconds", "schema": {"type": "integer"}},
            "retry-after-ms": {"description": "Milliseconds", "schema": {"type": "integer"}},
        },
    },
    500: {"model": ErrorResponse, "description": "Internal error"},
    503: {"model": ErrorResponse, "description": "Loading, draining or no usable token"},
}
_UNAUTHORIZED: dict[str, Any] = {
    "model": ErrorResponse,
    "description": "Missing or wrong bearer token",
    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
}


def _stream(chunk: type[BaseModel]) -> dict[str, Any]:
    """A streamed response's media type: each event's data is one chunk (or an error) as
    JSON, and the last is `[DONE]`."""
    return {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "event": {"type": "string"},
                    "data": {
                        "anyOf": [
                            {"const": "[DONE]"},
                            {
                                "type": "string",
                                "contentMediaType": "application/json",
                                "contentSchema": {
                                    "anyOf": [
                                        {"$ref": f"#/components/schemas/{chunk.__name__}"},
                                        {"$ref": "#/components/schemas/ErrorResponse"},
                                    ]
                                },
                            },
                        ]
                    },
                },
            },
        }
    }


_PROBE: dict[int | str, dict[str, Any]] = {
    503: {"description": "Not (yet) healthy or ready", "content": {"text/plain": {}}}
}


def create_app(
    state: ServerState,
    load: Callable[[], Engine],
    max_body_bytes: int = 1 << 20,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """The app; `load` builds the engine (in a thread, so probes answer while it loads)."""
    tokenizers = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="llmops-tokenize")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_start(state, load, on_fatal))
        try:
            yield
        finally:
            loader.cancel()
            tokenizers.shutdown(wait=False, cancel_futures=True)
            if state.engine is not None:
                await asyncio.to_thread(state.engine.stop)

    app = FastAPI(
        title="llmops inference server",
        summary="OpenAI-compatible completions and chat completions of one model and its "
        "LoRA adapters",
        version="v1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    metrics = state.metrics
    metrics.model_name = state.served_name
    app.add_middleware(BodyLimit, limit=max_body_bytes, metrics=metrics)
    app.add_middleware(CountResponses, metrics=metrics)
    auth: dict[int | str, dict[str, Any]] = {}
    if state.auth_token_file is not None:
        auth[401] = _UNAUTHORIZED

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, error: RequestError) -> JSONResponse:
        metrics.rejected.labels(reason=error.reason).inc()
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problem = _validation_error(error)
        metrics.rejected.labels(reason=problem.reason).inc()
        return error_response(problem)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(error.status_code, str(error.detail)),
            status_code=error.status_code,
            headers=error.headers,
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> JSONResponse:
        log.error("request failed", exc_info=error)
        metrics.rejected.labels(reason="error").inc()
        return JSONResponse(error_body(500, f"internal error: {type(error).__name__}"), 500)

    def authorize(request: Request) -> None:
        token = state.token()
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            raise RequestError(
                "missing or invalid bearer token", 401, code="invalid_api_key",
                reason="unauthorized",
            )  # fmt: skip

    def engine_for(model: str) -> tuple[Engine, int]:
        """The engine and the adapter (0: the base) a request's `model` names."""
        if state.draining:
            raise RequestError("the server is shutting down", 503, reason="draining")
        if state.engine is None or not state.ready:
            raise RequestError("the model is still loading", 503, reason="loading")
        if model == state.served_name:
            return state.engine, 0
        adapter = state.engine.adapter_id(model)
        if adapter is None:
            names = [state.served_name, *state.engine.adapter_names]
            served = ", ".join(repr(n) for n in names)
            raise RequestError(
                f"the model {model!r} does not exist; this server serves {served}",
                404,
                "model",
                "model_not_found",
            )
        return state.engine, adapter

    async def off_loop(function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(tokenizers, function, *args)

    def cards() -> list[dict[str, Any]]:
        card = {
            "id": state.served_name,
            "object": "model",
            "created": state.created,
            "owned_by": "llmops",
            "root": state.label,
            "parent": None,
            "max_model_len": state.context_length,
        }
        adapter_names = state.engine.adapter_names if state.engine is not None else []
        return [card] + [
            {**card, "id": name, "root": name, "parent": state.served_name}
            for name in adapter_names
        ]

    @app.get("/healthz", response_class=PlainTextResponse, responses=_PROBE, summary="Liveness")
    async def healthz() -> PlainTextResponse:
        if state.failed or (state.engine is not None and not state.engine.alive and state.ready):
            return PlainTextResponse(f"unhealthy: {state.failed or 'engine stopped'}\n", 503)
        return PlainTextResponse("ok\n")

    @app.get("/readyz", response_class=PlainTextResponse, responses=_PROBE, summary="Readiness")
    async def readyz() -> PlainTextResponse:
        if state.draining:
            return PlainTextResponse("draining\n", 503)
        if not state.ready:
            return PlainTextResponse("loading\n", 503)
        return PlainTextResponse("ready\n")

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/v1/models",
        response_model=ModelList,
        responses={**auth, 503: _ERRORS[503]},
        summary="The model and its adapters",
    )
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": cards()}

    @app.get(
        "/v1/models/{model:path}",
        response_model=ModelCard,
        responses={**auth, 404: _ERRORS[404], 503: _ERRORS[503]},
        summary="One model",
    )
    async def model_card(model: str, request: Request) -> dict[str, Any]:
        authorize(request)
        for card in cards():
            if card["id"] == model:
                return card
        raise RequestError(f"the model {model!r} does not exist", 404, "model", "model_not_found")

    post_responses: dict[int | str, dict[str, Any]] = {**_ERRORS, **auth}

    @app.post(
        "/v1/completions",
        response_model=None,
        responses={
            200: {
                "model": Completion,
                "content": _stream(CompletionChunk),
                "description": "The completion; with `stream: true`, its chunks as events",
            },
            **post_responses,
        },
        summary="Completions (OpenAI's legacy API)",
    )
    async def completions(
        body: CompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse | Response:
        authorize(request)
        engine, adapter = engine_for(body.model)
        prompts = body.prompts()
        per_prompt = body.generated()
        _check_size(engine, len(prompts) * per_prompt)
        _check_bias(engine, body)
        ids = [
            await _encode(engine, p, "prompt", off_loop)
            if isinstance(p, str)
            else _check_ids(engine, p)
            for p in prompts
        ]
        wanted = body.logprobs
        # best_of ranks choices by their log-probability, asked for or not.
        scored = wanted if wanted is not None or per_prompt == body.choices() else 0
        requests: list[tuple[list[int], SamplingParams, int]] = []
        for prompt_ids in ids:
            limit = _token_limit(state, prompt_ids, body.max_tokens, DEFAULT_COMPLETION_TOKENS)
            for choice in range(per_prompt):
                echo_logprobs = wanted if body.echo else None
                params = body.sampling(
                    limit, logprobs=scored, prompt_logprobs=echo_logprobs, choice=choice
                )
                requests.append((prompt_ids, params, adapter))
        streams = await _admit(engine, requests, request)
        if streams is None:
            return Response(status_code=499)
        texts = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts]
        job = _Job(engine, body, Reply(body.model, chat=False), streams, ids, texts, per_prompt)
        if body.stream:
            return _event_stream(job.sse())
        return await job.respond(request)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={
            200: {
                "model": ChatCompletion,
                "content": _stream(ChatCompletionChunk),
                "description": "The chat completion; with `stream: true`, its chunks as events",
            },
            **post_responses,
        },
        summary="Chat completions",
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse | Response:
        authorize(request)
        engine, adapter = engine_for(body.model)
        _check_size(engine, body.choices())
        _check_bias(engine, body)
        messages = [(m.role, m.text()) for m in body.messages]
        # Bound the size before rendering: the template only adds to the contents.
        await _bound(engine, "".join(text for _, text in messages), "messages", off_loop)
        stops: tuple[str, ...]
        if engine.chat is not None:  # the model's own template; its end-of-turn id stops
            try:
                prompt, stops = await off_loop(engine.chat.render, messages), ()
            except ValueError as error:
                raise RequestError(str(error), 400, "messages") from error
        else:
            prompt, stops = chat_prompt(messages), CHAT_STOPS
        ids = await _encode(engine, prompt, "messages", off_loop)
        limit = _token_limit(state, ids, body.token_limit(), None)
        requests = [
            (ids, body.sampling(limit, stops, logprobs=body.logprob_count(), choice=c), adapter)
            for c in range(body.choices())
        ]
        streams = await _admit(engine, requests, request)
        if streams is None:
            return Response(status_code=499)
        job = _Job(
            engine, body, Reply(body.model, chat=True), streams, [ids], [prompt], body.choices()
        )
        if body.stream:
            return _event_stream(job.sse())
        return await job.respond(request)

    app.openapi = lambda: _document(app, state)  # type: ignore[method-assign]
    return app


def _document(app: FastAPI, state: ServerState) -> dict[str, Any]:
    """FastAPI's document of the routes and models, less what never happens (422: invalid
    requests answer 400), plus the bearer scheme when a token is configured."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        routes=app.routes,
    )
    for path, operations in document["paths"].items():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            if state.auth_token_file is not None and path.startswith("/v1/"):
                operation["security"] = [{"bearer": []}]
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    for chunk in (CompletionChunk, ChatCompletionChunk):  # referenced by the event streams
        found = chunk.model_json_schema(
            ref_template="#/components/schemas/{model}", mode="serialization"
        )
        schemas.update(found.pop("$defs", {}))
        schemas[chunk.__name__] = found
    if state.auth_token_file is not None:
        document.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"}
        }
    app.openapi_schema = document
    return document


async def _start(
    state: ServerState, load: Callable[[], Engine], on_fatal: Callable[[], None] | None
) -> None:
    try:
        if state.auth_token_file is not None:
            read_token(state.auth_token_file)  # refuse to start rather than fail open
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
        if isinstance(error, EmptyTokenError):
            log.error("%s", error)
        else:
            log.exception("loading the model failed")
        state.failed = str(error) or type(error).__name__
        state.failed_reason = failure_reason(error)
        if on_fatal is not None:
            on_fatal()


OffLoop = Callable[..., Awaitable[Any]]


def _too_long(context: int, count: str, param: str) -> RequestError:
    return RequestError(
        f"This model's maximum context length is {context} tokens; the prompt has {count} "
        "tokens, leaving no room for a completion.",
        400,
        param,
        "context_length_exceeded",
        reason="context_length",
    )


async def _bound(engine: Engine, text: str, param: str, off_loop: OffLoop) -> None:
    """Refuse a text far over the context after tokenizing a bounded prefix of it (off the
    event loop): no token spans more than `max_token_chars` characters."""
    widest = engine.tokenizer.max_token_chars
    if widest is None:
        return
    slack = 16  # a cut through a word may split one token into several
    cut = (engine.context_length + slack) * widest
    if len(text) <= cut:
        return
    try:
        head = await off_loop(engine.tokenizer.encode, text[:cut])
    except (ValueError, TypeError):
        return  # the whole text gives the error
    if len(head) > engine.context_length + slack:
        raise _too_long(engine.context_length, f"more than {len(head) - slack}", param)


async def _encode(engine: Engine, text: str, param: str, off_loop: OffLoop) -> list[int]:
    await _bound(engine, text, param, off_loop)
    try:
        ids: list[int] = await off_loop(engine.tokenizer.encode, text)
    except (ValueError, TypeError) as error:
        raise RequestError(f"{param}: {error}", 400, param) from error
    if not ids:
        if engine.eos_token_id is None:
            raise RequestError(f"{param}: must not be empty", 400, param)
        ids = [engine.eos_token_id]  # GPT-2's convention: an empty prompt starts a document
    if len(ids) > engine.context_length:
        raise _too_long(engine.context_length, str(len(ids)), param)
    return ids


def _check_ids(engine: Engine, ids: list[int]) -> list[int]:
    vocab = engine.vocab_size
    if not ids:
        if engine.eos_token_id is None:
            raise RequestError("prompt: must not be empty", 400, "prompt")
        return [engine.eos_token_id]
    if max(ids) >= vocab:
        raise RequestError(f"prompt: token ids must be below {vocab}", 400, "prompt")
    if len(ids) > engine.context_length:
        raise _too_long(engine.context_length, str(len(ids)), "prompt")
    return ids


def _check_size(engine: Engine, sequences: int) -> None:
    if sequences > engine.scheduler.capacity:
        raise RequestError(
            f"n: this request needs {sequences} sequences (prompts x max(n, best_of)); the "
            f"server runs or queues at most {engine.scheduler.capacity} at once",
            400,
            "n",
        )


def _check_bias(engine: Engine, body: CompletionRequest | ChatCompletionRequest) -> None:
    for token, _ in body.bias():
        if token >= engine.vocab_size:
            raise RequestError(
                f"logit_bias: token id {token} is not below the vocabulary size "
                f"{engine.vocab_size}",
                400,
                "logit_bias",
            )


def _token_limit(state: ServerState, ids: list[int], asked: int | None, default: int | None) -> int:
    room = state.context_length - len(ids)
    if asked is None:
        if room < 1:
            raise _too_long(state.context_length, str(len(ids)), "prompt")
        return min(default or state.max_new_tokens, state.max_new_tokens, room)
    if asked > state.max_new_tokens:
        raise RequestError(
            f"max_tokens: at most {state.max_new_tokens} tokens per request", 400, "max_tokens",
            reason="max_tokens",
        )  # fmt: skip
    if asked > room:
        raise RequestError(
            f"This model's maximum context length is {state.context_length} tokens. However, "
            f"you requested {len(ids) + asked} tokens ({len(ids)} in the prompt, {asked} for "
            f"the completion). Please reduce the prompt or the completion length.",
            400,
            "max_tokens",
            "context_length_exceeded",
            reason="context_length",
        )
    return asked


async def _admit(
    engine: Engine, requests: list[tuple[list[int], SamplingParams, int]], request: Request
) -> list[Stream] | None:
    """The streams of the request's generations, once the engine has room (waiting, within
    the queue's bounds, for it); None if the client left while waiting."""
    waiting = asyncio.ensure_future(engine.admit(requests))
    if not waiting.done():
        await asyncio.sleep(0)  # admitted at once when there is room
    watcher = None
    if not waiting.done():
        watcher = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({waiting, watcher}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        if not waiting.done():
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            return None
    try:
        return waiting.result()
    except QueueFull as full:
        error = RequestError(
            "the server is at capacity; retry later", 429, code="rate_limit_exceeded",
            reason="queue_full",
        )  # fmt: skip
        error.retry_after = full.retry_after
        raise error from None
    except Closed:
        raise RequestError("the server is shutting down", 503, reason="draining") from None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


_event = sse_event


class _Job:
    """The generations of one request: prompts x choices, in OpenAI's choice order."""

    def __init__(
        self,
        engine: Engine,
        body: CompletionRequest | ChatCompletionRequest,
        reply: Reply,
        streams: list[Stream],
        prompt_ids: list[list[int]],
        prompt_texts: list[str],
        per_prompt: int,
    ) -> None:
        self.engine = engine
        self.body = body
        self.reply = reply
        self.streams = streams
        self.prompt_ids = prompt_ids
        self.prompt_texts = prompt_texts
        self.per_prompt = per_prompt
        self.choices = [
            Choice(k // per_prompt, prompt_ids[k // per_prompt]) for k in range(len(streams))
        ]
        self.echo = False
        as_ids = False
        if isinstance(body, CompletionRequest):
            self.echo = bool(body.echo)
            self.logprobs = body.logprobs
            as_ids = bool(body.return_tokens_as_token_ids)
        else:
            self.logprobs = body.logprob_count()
        self.names = TokenNames(engine.tokenizer, as_ids)
        self._offsets: list[int] = []  # streaming: where each choice's next token starts
        self._finished = 0  # streaming: choices done

    def cancel(self) -> None:
        for stream in self.streams:
            self.engine.cancel(stream)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every stream's events as they come, tagged with the stream's index."""
        if len(self.streams) == 1:
            async for event in self.streams[0].events():
                yield 0, event
            return
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        async def forward(index: int, stream: Stream) -> None:
            async for event in stream.events():
                queue.put_nowait((index, event))

        tasks = [asyncio.ensure_future(forward(i, s)) for i, s in enumerate(self.streams)]
        remaining = len(tasks)
        try:
            while remaining:
                index, event = await queue.get()
                if isinstance(event, Done):
                    remaining -= 1
                yield index, event
        finally:
            for task in tasks:
                task.cancel()

    # -- whole responses ----------------------------------------------------------------------

    async def respond(self, request: Request) -> JSONResponse | Response:
        async def consume() -> None:
            async for index, event in self.events():
                self.choices[index].add(event)

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_disconnected(request))
        left = False
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not consumer.done():
                # A task only turns cancelled once the loop runs it again: remember why here.
                left = True
                consumer.cancel()
                self.cancel()
        if left:  # the client went away; nobody reads this
            await asyncio.gather(consumer, return_exceptions=True)
            return Response(status_code=499)
        consumer.result()
        for choice in self.choices:
            assert choice.done is not None
            if choice.done.finish_reason not in ("stop", "length"):
                error = choice.done.error or "generation was interrupted"
                if choice.done.finish_reason == "error":
                    raise RequestError(error, 500, reason="error")
                raise RequestError(error, 503, reason="draining")
        returned: list[Choice] = []
        for prompt in range(len(self.prompt_ids)):
            group = self.choices[prompt * self.per_prompt : (prompt + 1) * self.per_prompt]
            if self.per_prompt > self.body.choices():  # best_of: the likeliest n
                group = sorted(group, key=lambda c: c.score, reverse=True)[: self.body.choices()]
            returned += group
        bodies = [self._whole(index, choice) for index, choice in enumerate(returned)]
        prompt_tokens = sum(len(ids) for ids in self.prompt_ids)
        generated = sum(c.done.completion_tokens for c in returned if c.done is not None)
        return JSONResponse(self.reply.whole(bodies, usage(prompt_tokens, generated)))

    def _whole(self, index: int, choice: Choice) -> dict[str, Any]:
        assert choice.done is not None
        text = "".join(choice.text)
        if self.reply.chat:
            logprobs = None
            if self.logprobs is not None:
                logprobs = {"content": self.names.chat(choice.entries), "refusal": None}
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": choice.done.finish_reason,
            }
        prompt_text = self.prompt_texts[choice.prompt]
        completion_logprobs = None
        if self.logprobs is not None:
            completion_logprobs = self._completion_logprobs(choice, prompt_text)
        return {
            "index": index,
            "text": prompt_text + text if self.echo else text,
            "logprobs": completion_logprobs,
            "finish_reason": choice.done.finish_reason,
        }

    def _completion_logprobs(self, choice: Choice, prompt_text: str) -> dict[str, Any]:
        ids = [entry.token for entry in choice.entries]
        entries: list[Any] = list(choice.entries)
        offset = len(prompt_text)
        if self.echo:
            prompt_entries = self._prompt_entries(choice)
            ids = choice.prompt_ids + ids
            entries = list(prompt_entries) + entries
            offset = 0
        body, _ = self.names.completion(ids, entries, offset)
        return body

    def _prompt_entries(self, choice: Choice) -> tuple[Any, ...]:
        found = choice.prompt_entries
        return found if found is not None else (None,) * len(choice.prompt_ids)

    # -- server-sent events -------------------------------------------------------------------

    async def sse(self) -> AsyncIterator[str]:
        reply = self.reply
        self._offsets = [len(self.prompt_texts[c.prompt]) for c in self.choices]
        self._finished = 0
        try:
            for index, choice in enumerate(self.choices):
                if reply.chat:
                    yield _event(reply.chunk(index, None, None, role=True))
                elif self.echo and self.logprobs is None:
                    yield _event(reply.chunk(index, self.prompt_texts[choice.prompt], None))
            if len(self.streams) == 1:  # no merging: the common case, once per token
                async for event in self.streams[0].events():
                    out = self._chunk(0, event)
                    if out is not None:
                        yield out
            else:
                async for index, event in self.events():
                    out = self._chunk(index, event)
                    if out is not None:
                        yield out
            if self.body.include_usage():
                prompt_tokens = sum(len(ids) for ids in self.prompt_ids)
                generated = sum(c.done.completion_tokens for c in self.choices if c.done)
                yield _event(reply.usage_chunk(usage(prompt_tokens, generated)))
            yield "data: [DONE]\n\n"
        finally:
            if self._finished < len(self.choices):  # the client disconnected mid-stream
                self.cancel()

    def _chunk(self, index: int, event: Event) -> str | None:
        """The server-sent event for one engine event of choice `index`, if any."""
        reply = self.reply
        if isinstance(event, Delta):
            logprobs = None
            if self.logprobs is not None:
                if reply.chat:
                    logprobs = {"content": self.names.chat(event.logprobs)}
                else:
                    ids = [entry.token for entry in event.logprobs]
                    logprobs, self._offsets[index] = self.names.completion(
                        ids, list(event.logprobs), self._offsets[index]
                    )
            if logprobs is not None:
                return _event(reply.chunk(index, event.text, None, logprobs))
            return reply.text_event(index, event.text) if event.text else None
        choice = self.choices[index]
        choice.add(event)
        if isinstance(event, Done):
            self._finished += 1
            if event.error is not None or event.finish_reason not in ("stop", "length"):
                status = 500 if event.finish_reason == "error" else 503
                return _event(error_body(status, event.error or "generation was interrupted"))
            return _event(reply.chunk(index, None, event.finish_reason))
        if self.echo and self.logprobs is not None:  # the prompt, scored
            prompt_logprobs, _ = self.names.completion(
                choice.prompt_ids, list(self._prompt_entries(choice)), 0
            )
            text = self.prompt_texts[choice.prompt]
            return _event(reply.chunk(index, text, None, prompt_logprobs))
        return None
