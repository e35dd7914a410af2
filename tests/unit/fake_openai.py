"""A loopback stand-in for an OpenAI-compatible endpoint: answers `/v1/chat/completions` and
`/v1/completions` with canned text and log-probabilities, fails on demand (a status for
prompts holding a marker, `Retry-After` included) and counts what it was asked."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class FakeEndpoint:
    url: str = ""  # base URL, ending in /v1
    requests: list[dict[str, Any]] = field(default_factory=list)
    # prompt -> (status, headers) to answer instead of a completion; None: answer
    fail: Callable[[str], tuple[int, dict[str, str]] | None] = lambda prompt: None
    # prompt -> (text, token log-probabilities)
    reply: Callable[[str], tuple[str, list[float]]] = lambda prompt: (
        f"about: {prompt[-40:]}",
        [-0.5, -0.25],
    )
    token: str | None = None  # the bearer token it wants, if any
    lock: threading.Lock = field(default_factory=threading.Lock)

    def prompts(self) -> list[str]:
        return [_prompt(body) for body in self.requests]


def _prompt(body: dict[str, Any]) -> str:
    if "messages" in body:
        return str(body["messages"][-1]["content"])
    return str(body.get("prompt", ""))


@contextmanager
def fake_endpoint(**settings: Any) -> Iterator[FakeEndpoint]:
    endpoint = FakeEndpoint(**settings)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with endpoint.lock:
                endpoint.requests.append(body)
            if endpoint.token and self.headers.get("Authorization") != f"Bearer {endpoint.token}":
                return self._send(401, {"error": {"message": "invalid API key"}})
            prompt = _prompt(body)
            failure = endpoint.fail(prompt)
            if failure is not None:
                status, headers = failure
                return self._send(status, {"error": {"message": "failing"}}, headers)
            text, logprobs = endpoint.reply(prompt)
            if self.path.endswith("/chat/completions"):
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                if body.get("logprobs"):
                    content = [{"token": "x", "logprob": v} for v in logprobs]
                    choice["logprobs"] = {"content": content}
            else:
                choice = {"index": 0, "text": text, "finish_reason": "stop"}
                if body.get("logprobs") is not None:
                    choice["logprobs"] = {"token_logprobs": logprobs}
            self._send(200, {"object": "completion", "choices": [choice]})

        def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    endpoint.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
