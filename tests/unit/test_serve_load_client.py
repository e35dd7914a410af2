"""The load generator of benchmarks/serve_load.py: its minimal HTTP/1.1 client reads every
server-sent event of a chunked reply (events split across chunks included) and the usage,
and a whole reply by its Content-Length, over one keep-alive connection."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import serve_load


class Writer:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.sent.append(data)


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, start = b"", 0
    for size in [*sizes, len(body)]:
        piece = body[start : start + size]
        if piece:
            out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        start += len(piece)
    return out + b"0\r\n\r\n"


def sse(tokens: int) -> bytes:
    events = [{"choices": [{"index": 0, "text": f" w{i}"}]} for i in range(tokens)]
    events.append({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
    events.append({"choices": [], "usage": {"completion_tokens": tokens}})
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return body + b"data: [DONE]\n\n"


def test_streamed_and_whole_replies_are_read_to_their_end() -> None:
    body = sse(5)
    streamed = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, [7, 30, 100])
    )
    whole_body = json.dumps({"choices": [{"text": "x"}], "usage": {"completion_tokens": 3}})
    whole = (
        f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        f"content-length: {len(whole_body)}\r\n\r\n{whole_body}"
    ).encode()

    async def run() -> tuple[Any, Any, Writer, asyncio.StreamReader]:
        reader = asyncio.StreamReader()
        reader.feed_data(streamed + whole)
        writer = Writer()
        connection = serve_load.Connection(8000)
        connection.reader, connection.writer = reader, writer  # type: ignore[assignment]
        first = serve_load.Result("s", "streamed", 1)
        await connection.complete([1, 2], 5, True, first)
        second = serve_load.Result("s", "whole", 1)
        await connection.complete([1, 2], 3, False, second)
        return first, second, writer, reader

    first, second, writer, reader = asyncio.run(run())
    assert first.tokens == 5 and len(first.ttft) == len(first.e2e) == 1
    assert first.events == 6  # five tokens and the finish, not the usage
    assert second.tokens == 3 and not second.ttft and len(second.e2e) == 1
    assert reader.at_eof() or not reader._buffer  # everything was consumed
    request = writer.sent[0]
    head, payload = request.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /v1/completions HTTP/1.1")
    assert f"content-length: {len(payload)}".encode() in head.lower()
    assert json.loads(payload)["stream"] is True
    assert "stream" not in json.loads(writer.sent[1].split(b"\r\n\r\n", 1)[1])
