"""Overload, liveness and shutdown of the inference server, measured as its users meet them (by
hand, not a test; the trainer tier checks the same behaviour at a small scale).

    python benchmarks/serve_burst.py [--clients 64,300] [--max-concurrency 16]

Starts `python -m llmops_trainer.serve` on a small random model in the trainer's export format
(context 128 tokens) and measures:

- burst: N streaming clients at once through the official `openai` client with its default
  retries (2, honouring Retry-After); how many requests finally failed, how many 429s the
  clients saw on the way, the spread of the Retry-After values and p50/p99 latency;
- large prompt: a 0.9 MB prompt (under the 1 MiB body limit, far over the context) sent
  while a stream runs; the longest gap between that stream's tokens and the slowest
  `/healthz` answer while the large prompt is handled;
- shutdown: the time an idle server takes to exit after SIGTERM, and what `/readyz` answers
  while a loaded server drains (a status code, or `refused` when the socket is closed).

Point PYTHONPATH at another checkout's trainer_image to measure that code instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from serve_load import wait_ready  # the scripts run from benchmarks/

ROOT = Path(__file__).resolve().parents[1]


def make_model(folder: Path, hidden: int, layers: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "trainer"))
    from serve_support import make_model as make

    from llmops_trainer.model import GPTConfig

    config = GPTConfig(vocab_size=300, context_length=128, num_layers=layers, num_heads=4,
                       hidden_size=hidden)  # fmt: skip
    return make(folder, config=config)


def start(model_dir: Path, port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "llmops_trainer.serve", "--model-dir", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--served-name", "bench",
        "--device", "cpu", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return wait_ready(process, port, 120)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def burst(url: str, clients: int, max_tokens: int) -> dict[str, Any]:
    import openai

    statuses: Counter[int] = Counter()
    retry_after: list[str] = []

    async def seen(response: httpx.Response) -> None:
        statuses[response.status_code] += 1
        if response.status_code == 429:
            retry_after.append(response.headers.get("retry-after-ms")
                               or response.headers.get("retry-after", "?"))  # fmt: skip

    http = httpx.AsyncClient(
        timeout=600,
        limits=httpx.Limits(max_connections=clients + 8),
        event_hooks={"response": [seen]},
    )
    api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", http_client=http)
    latencies: list[float] = []
    failures: Counter[str] = Counter()

    async def one(k: int) -> None:
        start = time.perf_counter()
        try:
            stream = await api.completions.create(
                model="bench", prompt=f"the quick brown fox {k}", max_tokens=max_tokens,
                temperature=0, stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            async for _ in stream:
                pass
            latencies.append(time.perf_counter() - start)
        except openai.APIStatusError as error:
            failures[str(error.status_code)] += 1
        except openai.APIError as error:
            failures[type(error).__name__] += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    await api.close()
    return {
        "clients": clients,
        "succeeded": len(latencies),
        "failed": dict(failures),
        "responses_seen": dict(statuses),
        "distinct_retry_after": len(set(retry_after)),
        "retry_after_sample": sorted(set(retry_after))[:6],
        "seconds": round(elapsed, 2),
        "p50_s": round(percentile(latencies, 0.5), 2),
        "p99_s": round(percentile(latencies, 0.99), 2),
    }


def large_prompt(url: str) -> dict[str, Any]:
    """Stream tokens, send a 0.9 MB prompt meanwhile, probe /healthz all along."""
    gaps: list[float] = []
    health: list[float] = []
    done = threading.Event()
    large_status: list[int] = []

    def stream() -> None:
        body = {"model": "bench", "prompt": "the", "max_tokens": 120, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        while not done.is_set():  # one stream after another while the large prompts go in
            last = None
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as reply:
                for line in reply.iter_lines():
                    now = time.perf_counter()
                    if line.startswith("data: {"):
                        if last is not None:
                            gaps.append(now - last)
                        last = now

    def probe() -> None:
        while not done.is_set():
            start = time.perf_counter()
            httpx.get(url + "/healthz", timeout=30)
            health.append(time.perf_counter() - start)
            time.sleep(0.01)

    def large() -> None:
        text = "the quick brown fox jumps over a lazy dog " * 21_500  # ~0.9 MB
        reply = httpx.post(url + "/v1/completions", json={"model": "bench", "prompt": text},
                           timeout=120)  # fmt: skip
        large_status.append(reply.status_code)

    threads = [threading.Thread(target=stream), threading.Thread(target=probe)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    for _ in range(3):
        large()
    done.set()
    for thread in threads:
        thread.join()
    return {
        "large_prompt_status": large_status,
        "max_token_gap_s": round(max(gaps, default=0.0), 3),
        "max_healthz_s": round(max(health, default=0.0), 3),
    }


def shutdown(model_dir: Path, port: int) -> dict[str, Any]:
    process = start(model_dir, port, [])
    started = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    idle_exit = time.perf_counter() - started
    process = start(model_dir, port, ["--max-batch-size", "2"])
    url = f"http://127.0.0.1:{port}"
    body = {"model": "bench", "prompt": "the", "max_tokens": 120, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    answers: list[str] = []

    streamed: list[str] = []

    def load() -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as reply:
            lines = [line for line in reply.iter_lines() if line]
        streamed.append(f"{reply.status_code} {lines[-1][:20] if lines else ''}")

    loaders = [threading.Thread(target=load) for _ in range(8)]  # 4 rounds of 2
    for thread in loaders:
        thread.start()
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    after: list[str] = []
    while process.poll() is None:
        try:
            answer = str(httpx.get(url + "/readyz", timeout=5).status_code)
        except httpx.TransportError:
            answer = "refused"
        # While the admitted streams still run, and after they finished (closing down).
        (answers if any(t.is_alive() for t in loaders) else after).append(answer)
        time.sleep(0.02)
    for thread in loaders:
        thread.join()
    return {
        "idle_exit_s": round(idle_exit, 2),
        "readyz_while_streams_drain": dict(Counter(answers)),
        "readyz_after_streams_ended": dict(Counter(after)),
        "streams": dict(Counter(streamed)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")],
                        default=[64, 300])  # fmt: skip
    parser.add_argument("--max-concurrency", type=int, default=64, help="server flag")
    parser.add_argument("--max-batch-size", type=int, default=8, help="server flag")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=18431)
    parser.add_argument("--hidden", type=int, default=256, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="model depth")
    parser.add_argument("--skip", default="", help="comma-separated: burst,large,shutdown")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = make_model(Path(scratch) / "out" / "model", args.hidden, args.layers)
        flags = ["--max-concurrency", str(args.max_concurrency),
                 "--max-batch-size", str(args.max_batch_size)]  # fmt: skip
        process = start(model_dir, args.port, flags)
        url = f"http://127.0.0.1:{args.port}"
        try:
            if "burst" not in skip:
                results["burst"] = [
                    asyncio.run(burst(url, n, args.max_tokens)) for n in args.clients
                ]
            if "large" not in skip:
                results["large_prompt"] = large_prompt(url)
        finally:
            process.terminate()
            process.wait(timeout=120)
        if "shutdown" not in skip:
            results["shutdown"] = shutdown(model_dir, args.port + 1)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
