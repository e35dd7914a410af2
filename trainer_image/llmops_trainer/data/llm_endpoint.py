"""A small client of OpenAI-compatible endpoints for the data engine (pseudo-labelling and
augmentation with a language model): `/chat/completions` or `/completions` over urllib,
bounded concurrency (threads), a token-bucket rate limit, retries with exponential backoff
and jitter honouring `Retry-After` (collect.with_retries), and a content-hash cache.

The cache maps sha256(model, api, prompt template, rendered prompt, sampling parameters,
sample number) to the endpoint's answer (the response JSON), one file per key written
atomically (a temporary file renamed into place), so slice pods writing at once never see a
torn file and a rerun or a retried slice sends nothing it already got an answer for. The URL
is not part of the key: the same model behind another address answers the same.

A request refused for what it asks (400, 413, 422: a prompt beyond the model's context) leaves
its document without an answer, counted as `refused`, unless too many are (then it fails as
below). Any other refusal (401, 403, 404, ...) or a request still failing after its retries
raises EndpointError, whose message names the endpoint (never the key) and the HTTP status.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from llmops.api.dataset import LlmEndpoint
from llmops.api.workload import llm_endpoint_env
from llmops_trainer.data.collect import with_retries

log = logging.getLogger("llmops.data")
BACKOFF_SECONDS = 0.5  # the first retry's delay (before jitter), doubling per retry
BACKOFF_CAP_SECONDS = 30.0
RETRY_AFTER_CAP_SECONDS = 120.0
DETAIL_CHARS = 300
# A refusal of one request for what it asks (too long, a bad value in it): that document goes
# without an answer, unless more than REFUSED_FREE requests and REFUSED_SHARE of all were
# refused (then the configuration is wrong and the slice fails). 401, 403, 404 always fail.
REFUSED_ALONE = frozenset({400, 413, 422})
REFUSED_FREE = 3
REFUSED_SHARE = 0.1
_PLACEHOLDER = re.compile(r"\{(text|question)\}")


def render(template: str, **values: str) -> str:
    """`{text}` and `{question}` replaced in one pass (a value holding `{text}` stays as it is);
    other braces are literal."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


@dataclass(frozen=True)
class Target:
    """An endpoint as a data pod reaches it."""

    url: str  # base URL, up to and including /v1
    model: str
    api: str  # chat | completions
    api_key: str | None
    concurrency: int = 4
    requests_per_second: float | None = None
    max_retries: int = 5
    timeout: float = 120.0

    @property
    def request_url(self) -> str:
        path = "chat/completions" if self.api == "chat" else "completions"
        return f"{self.url.rstrip('/')}/{path}"


def resolve(endpoint: LlmEndpoint, index: int, environ: Mapping[str, str] = os.environ) -> Target:
    """The Target of endpoint number `index` of DatasetSpec.llm_endpoints(): a `url` as the
    spec says; a ModelDeployment's URL and served name from the variables the operator set."""
    names = llm_endpoint_env(index)
    url = endpoint.url or environ.get(names.url)
    if not url:
        assert endpoint.model_deployment is not None
        raise ValueError(
            f"ModelDeployment {endpoint.model_deployment.name!r}: its URL was not given "
            f"({names.url} is unset; the operator resolves it)"
        )
    model = endpoint.model or environ.get(names.model)
    if not model and endpoint.model_deployment is not None:
        model = endpoint.model_deployment.name
    return Target(
        url=url,
        model=model or "",
        api=endpoint.api,
        api_key=environ.get(names.api_key) or None,
        concurrency=endpoint.concurrency,
        requests_per_second=endpoint.requests_per_second,
        max_retries=endpoint.max_retries,
        timeout=endpoint.timeout_seconds,
    )


@dataclass(frozen=True)
class Ask:
    """One request: a rendered prompt and how to sample; `sample` tells apart the requests
    for several answers to one prompt (their cache keys differ)."""

    prompt: str
    temperature: float
    max_tokens: int
    logprobs: bool = False
    sample: int = 0


@dataclass(frozen=True)
class Answer:
    text: str
    mean_logprob: float | None  # None when logprobs were not asked for
    cached: bool
    refused: str | None = None  # why the endpoint refused this one request (its text is "")


def cache_key(target: Target, template: str, ask: Ask) -> str:
    payload = {
        "model": target.model,
        "api": target.api,
        "template": template,
        "prompt": ask.prompt,
        "temperature": ask.temperature,
        "maxTokens": ask.max_tokens,
        "logprobs": ask.logprobs,
        "sample": ask.sample,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class Cache:
    """Answers by content hash, one file per key under `folder/<2 hex>/<key>.json`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            value: dict[str, Any] = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
        os.replace(temporary, path)  # atomic: readers see the whole answer or none

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.json")) if self.folder.is_dir() else 0


class RateLimiter:
    """A token bucket of `burst` tokens refilled at `rate` per second; `acquire` takes one,
    waiting for it when the bucket is empty (waits are reserved in order, so threads that
    arrive together are spaced 1/rate apart). `rate` None: no limit."""

    def __init__(
        self,
        rate: float | None,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate, self.burst, self.clock, self.sleep = rate, burst, clock, sleep
        self.tokens = burst
        self.updated = clock()
        self.lock = threading.Lock()

    def acquire(self) -> float:
        """Take a token; returns the seconds waited for it."""
        if self.rate is None:
            return 0.0
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            self.tokens -= 1
            wait_for = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait_for > 0:
            self.sleep(wait_for)
        return wait_for


def retry_after(error: Exception | None, now: Callable[[], float] = time.time) -> float | None:
    """The seconds a 429 or 503 answer's `Retry-After` header asks for (seconds or a date)."""
    if not isinstance(error, urllib.error.HTTPError) or error.headers is None:
        return None
    value = error.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now())
    except (TypeError, ValueError):
        return None


def retry_delay(
    tries: int, error: Exception | None, rng: Callable[[], float] = random.random
) -> float:
    """Seconds before retry number `tries` + 1: what `Retry-After` asks (capped), else
    exponential backoff with jitter (half of it fixed, half random)."""
    asked = retry_after(error)
    if asked is not None:
        return min(asked, RETRY_AFTER_CAP_SECONDS)
    ceiling = min(BACKOFF_SECONDS * 2.0**tries, BACKOFF_CAP_SECONDS)
    return ceiling * (0.5 + rng() / 2)


class EndpointError(Exception):
    """An endpoint refused a request, kept failing or answered nonsense: names the endpoint
    (never the key) and the HTTP status. Not an OSError, so it is never retried."""

    def __init__(self, url: str, status: int | None, detail: str) -> None:
        self.url, self.status = url, status
        answered = f"answered HTTP {status}" if status is not None else "did not answer"
        super().__init__(f"endpoint {url} {answered}: {detail}".strip())


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        body = ""
    return " ".join((body or str(error.reason)).split())[:DETAIL_CHARS]


class Client:
    """Requests to one endpoint, through the cache; `counts` says how many were answered by
    the endpoint (`answered`), read from the cache (`cached`) and sent (`requests`, retries
    included)."""

    def __init__(
        self,
        target: Target,
        cache: Cache,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target, self.cache, self.sleep = target, cache, sleep
        self.limiter = RateLimiter(target.requests_per_second, clock=clock, sleep=sleep)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def ask(self, template: str, ask: Ask) -> Answer:
        key = cache_key(self.target, template, ask)
        response = self.cache.get(key)
        cached = response is not None
        if response is None:
            try:
                response = self._post(self._body(ask))
            except EndpointError as error:
                if error.status not in REFUSED_ALONE:
                    raise
                return self._refused(error)
            self._parse(response, ask)  # a malformed answer is not cached
            self.cache.put(key, response)
            self._count("answered")
        else:
            self._count("cached")
        text, mean = self._parse(response, ask)
        return Answer(text, mean, cached)

    def _refused(self, error: EndpointError) -> Answer:
        """One request refused for what it asks (a prompt beyond the model's context): that
        document goes without, and the slice goes on; unless the endpoint refuses too many,
        which says the configuration is wrong, not a document."""
        with self._lock:
            self.counts["refused"] += 1
            refused = self.counts["refused"]
            asked = refused + self.counts["answered"] + self.counts["cached"]
        if refused > REFUSED_FREE and refused > REFUSED_SHARE * asked:
            raise EndpointError(
                error.url,
                error.status,
                f"{refused} of {asked} requests refused (more than {REFUSED_SHARE:.0%}); the "
                f"last: {error}",
            )
        log.warning("a request was refused, its document goes without: %s", error)
        return Answer("", None, False, refused=str(error))

    def ask_all(self, template: str, asks: Sequence[Ask]) -> list[Answer]:
        """Answers in order, `concurrency` requests at a time. On the first failure nothing
        new starts, the requests in flight finish (and are cached), and the error is raised."""
        if not asks:
            return []
        with ThreadPoolExecutor(max_workers=self.target.concurrency) as pool:
            futures: list[Future[Answer]] = [pool.submit(self.ask, template, a) for a in asks]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and f.exception() is not None]
            if failed:
                for future in futures:
                    future.cancel()
                wait(futures)
                raise failed[0].exception()  # type: ignore[misc]
        return [f.result() for f in futures]

    def _body(self, ask: Ask) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.target.model,
            "temperature": ask.temperature,
            "max_tokens": ask.max_tokens,
        }
        if self.target.api == "chat":
            body["messages"] = [{"role": "user", "content": ask.prompt}]
            if ask.logprobs:
                body["logprobs"] = True
        else:
            body["prompt"] = ask.prompt
            if ask.logprobs:
                body["logprobs"] = 1
        return body

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        url = self.target.request_url
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.target.api_key:
            headers["Authorization"] = f"Bearer {self.target.api_key}"

        def attempt() -> dict[str, Any]:
            self.limiter.acquire()
            self._count("requests")
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=self.target.timeout) as response:
                raw = response.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                raise EndpointError(url, 200, "the answer is not JSON") from None
            if not isinstance(parsed, dict):
                raise EndpointError(url, 200, "the answer is not a JSON object")
            return parsed

        try:
            return with_retries(
                url,
                attempt,
                attempts=self.target.max_retries + 1,
                delay=retry_delay,
                sleep=self.sleep,
            )
        except EndpointError:
            raise
        except urllib.error.HTTPError as error:  # refused: 400, 401, 403, 404, ...
            raise EndpointError(url, error.code, _detail(error)) from error
        except OSError as error:  # retries spent
            last = error.__cause__
            tries = f"after {self.target.max_retries + 1} attempts"
            if isinstance(last, urllib.error.HTTPError):
                raise EndpointError(url, last.code, f"{tries}: {_detail(last)}") from error
            raise EndpointError(url, None, f"{tries}: {last or error}") from error

    def _parse(self, response: dict[str, Any], ask: Ask) -> tuple[str, float | None]:
        url = self.target.request_url
        try:
            choice = response["choices"][0]
            if self.target.api == "chat":
                text = choice["message"].get("content") or ""
                entries = ((choice.get("logprobs") or {}).get("content")) or []
                values = [e.get("logprob") for e in entries]
            else:
                text = choice.get("text") or ""
                values = list((choice.get("logprobs") or {}).get("token_logprobs") or [])
        except (KeyError, IndexError, TypeError, AttributeError) as error:
            raise EndpointError(url, 200, f"unexpected answer shape ({error!r})") from None
        if not ask.logprobs:
            return str(text), None
        scored = [float(v) for v in values if isinstance(v, int | float)]
        if text and not scored:
            raise EndpointError(
                url, 200, "the answer has no logprobs (pseudo-labelling needs them)"
            )
        return str(text), (sum(scored) / len(scored)) if scored else None
