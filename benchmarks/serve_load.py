"""Load test of the inference server: 1, 8 and 32 concurrent clients, streamed and not.

    python benchmarks/serve_load.py [--model-dir DIR] [--device cpu|cuda] [--max-tokens 64]
    python benchmarks/serve_load.py --llama --clients 1,8,32,64   # a Llama-shaped model

Compares, on the same prompts (token ids of equal length) with greedy decoding of exactly
`--max-tokens` tokens (eos ignored):

- llmops, batching on: `python -m llmops_trainer.serve` with --max-batch-size 32;
- llmops, batching off: the same server with --max-batch-size 1 (requests queue);
- transformers: `AutoModelForCausalLM.generate` on the same exported folder, loaded from
  disk only, called in this process with static batches of as many requests as there are
  clients (each wave starts when the previous one ends, as the clients' next requests would).
  It pays no HTTP, tokenization or scheduling cost and streams nothing, which favours it.

Each server is measured in two modes: `streamed` (server-sent events, one per token or per
tokens merged while the client was behind: TTFT is the arrival of the first text event) and
`whole` (`"stream": false`, one JSON reply: tokens/s and end-to-end only), the mode closest
to what `generate` does; `--no-stream` runs the whole mode only, `--stream-only` the streamed
one. The clients are one asyncio task each with its own keep-alive HTTP/1.1 connection and a
minimal parser (every event is read; only the usage chunk is decoded as JSON), so that the
load generator, which shares the machine's cores with the server, costs little CPU.

The systems run interleaved: both servers stay up, and each round runs every system and mode
at each client count in turn (the order rotates between rounds), so that a change of the
machine's load hits them alike; the table gives each figure's median over `--rounds`, the
range of tokens/s, and the CPU seconds per 1,000 tokens of the server process and of this
process (the clients, or `generate` itself) from /proc on Linux.

Without --model-dir a random model in the trainer's export format is written to a temporary
folder (the speed of a model does not depend on its training): the built-in GPT, or with
--llama a `transformers` Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention), as the
trainer exports open-weights and llama runs.
Needs the `bench` extra for transformers; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

CLIENTS = (1, 8, 32)
PROMPT_TOKENS = 16


@dataclass
class Result:
    system: str
    mode: str  # streamed, whole (servers) or static batches (generate)
    clients: int
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)  # empty in the whole mode
    e2e: list[float] = field(default_factory=list)
    events: int = 0  # server-sent events carrying text (streamed)
    server_cpu: float | None = None  # seconds of the server process during the run
    client_cpu: float = 0.0  # seconds of this process (the clients, or generate)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def median(values: list[float]) -> float:
    return percentile(values, 0.5) if len(values) % 2 else _middle(sorted(values))


def _middle(ordered: list[float]) -> float:
    if not ordered:
        return float("nan")
    half = len(ordered) // 2
    return (ordered[half - 1] + ordered[half]) / 2


def process_cpu(pid: int | None = None) -> float | None:
    """CPU seconds (user + system, all threads) of a process; None where /proc is missing."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def requests_per_client(clients: int) -> int:
    return max(2, 16 // clients)


def make_random_model(folder: Path, device: str) -> Path:
    """A random GPT in the trainer's export format; GPT-2-small-like on a GPU, smaller on CPU."""
    import torch

    from llmops.api.dataset import TokenizerTraining
    from llmops_trainer import hf_export
    from llmops_trainer.data import tokenize
    from llmops_trainer.model import GPT, GPTConfig

    words = [f"w{i}" for i in range(3000)]
    texts = [" ".join(words[(i * 7) % 3000 : (i * 7) % 3000 + 50]) for i in range(2000)]
    tokenizer = tokenize.train(texts, TokenizerTraining(vocab_size=4096, min_frequency=1))
    tokenizer.save(str(folder.parent / "tokenizer.json"))
    if device.startswith("cuda"):
        shape = {"num_layers": 12, "num_heads": 12, "hidden_size": 768, "context_length": 1024}
    else:
        shape = {"num_layers": 4, "num_heads": 8, "hidden_size": 256, "context_length": 512}
    config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), **shape)
    torch.manual_seed(0)
    model = GPT(config)
    eos = tokenize.eos_id(tokenizer)
    hf_export.export(model.state_dict(), config, eos, folder, folder.parent / "tokenizer.json")
    (folder / "llmops_model.json").write_text(json.dumps(config.to_dict()))
    return folder


def make_random_llama(folder: Path, device: str) -> Path:
    """A random Llama-shaped `transformers` model with a trained tokenizer; TinyLlama-1.1B's
    shape on a GPU, a small one on CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmops.api.dataset import TokenizerTraining
    from llmops_trainer import hf_export
    from llmops_trainer.data import tokenize

    words = [f"w{i}" for i in range(3000)]
    texts = [" ".join(words[(i * 7) % 3000 : (i * 7) % 3000 + 50]) for i in range(2000)]
    tokenizer = tokenize.train(texts, TokenizerTraining(vocab_size=4096, min_frequency=1))
    if device.startswith("cuda"):
        shape = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                 "num_attention_heads": 32, "num_key_value_heads": 4,
                 "max_position_embeddings": 2048}  # fmt: skip
    else:
        shape = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
                 "num_attention_heads": 8, "num_key_value_heads": 4,
                 "max_position_embeddings": 512}  # fmt: skip
    eos = tokenize.eos_id(tokenizer)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), eos_token_id=eos, **shape)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    hf_export.write_tokenizer_config(folder, shape["max_position_embeddings"])
    return folder


def prompts(vocab_size: int, count: int) -> list[list[int]]:
    return [[(17 + 31 * i + 7 * j) % (vocab_size - 1) + 1 for j in range(PROMPT_TOKENS)]
            for i in range(count)]  # fmt: skip


# -- our server ---------------------------------------------------------------------------------


def start_server(model_dir: Path, port: int, batch: int, args: argparse.Namespace) -> Any:
    command = [
        sys.executable, "-m", "llmops_trainer.serve", "--model-dir", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--served-name", "bench",
        "--max-batch-size", str(batch), "--max-concurrency", "256",
        "--max-new-tokens", str(args.max_tokens), "--device", args.device,
        "--dtype", args.dtype,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return wait_ready(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL), port, 300)  # fmt: skip


def wait_ready(process: Any, port: int, seconds: float) -> Any:
    """The started server once /readyz answers 200 (shared by the serve benchmarks)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready")


class Connection:
    """One client's keep-alive HTTP/1.1 connection with the least parsing a measurement
    needs: the status, the framing (chunked or Content-Length), and the usage chunk."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self.reader, self.writer

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()

    async def complete(self, prompt: list[int], max_tokens: int, stream: bool,
                       result: Result) -> None:  # fmt: skip
        body = json.dumps({
            "model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream, "stream_options": {"include_usage": True},
        } if stream else {
            "model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True,
        }).encode()  # fmt: skip
        request = (
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        reader, writer = await self._open()
        start = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if head[9:12] != b"200":
            raise RuntimeError(f"server answered {head.decode(errors='replace')!r}")
        if b"transfer-encoding: chunked" in head.lower():
            first, events, payload = await self._events(reader)
        else:
            length = head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]
            payload = await reader.readexactly(int(length))
            first, events = None, 0
        end = time.perf_counter()
        if stream:
            usage = payload[payload.rindex(b"data: {") + 6 :].split(b"\n\n", 1)[0]
            result.tokens += json.loads(usage)["usage"]["completion_tokens"]
            result.ttft.append((first or end) - start)
            result.events += events
        else:
            result.tokens += json.loads(payload)["usage"]["completion_tokens"]
        result.e2e.append(end - start)

    @staticmethod
    async def _events(reader: asyncio.StreamReader) -> tuple[float | None, int, bytes]:
        """Read a chunked body of server-sent events to its end: when the first event with
        a choice arrived, how many such events came, and the last chunks (the usage)."""
        first: float | None = None
        events = 0
        tail = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # the empty trailer
                return first, events, tail
            data = (await reader.readexactly(size + 2))[:-2]
            choices = data.count(b'"choices":[{') + data.count(b'"choices": [{')
            if choices:
                events += choices
                if first is None:
                    first = time.perf_counter()
            tail = tail[-4096:] + data


async def load(port: int, clients: int, work: list[list[int]], args: argparse.Namespace,
               system: str, stream: bool) -> Result:  # fmt: skip
    result = Result(system, "streamed" if stream else "whole", clients)
    per_client = requests_per_client(clients)

    async def client(k: int) -> None:
        connection = Connection(port)
        try:
            for r in range(per_client):
                await connection.complete(work[k * per_client + r], args.max_tokens, stream,
                                          result)  # fmt: skip
        finally:
            await connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    result.seconds = time.perf_counter() - start
    return result


class Server:
    """A running server and how to load it (at once, for the interleaved rounds)."""

    def __init__(self, model_dir: Path, batch: int, system: str, args: argparse.Namespace):
        self.system = system
        self.port = 18000 + batch
        self.process = start_server(model_dir, self.port, batch, args)

    def run(self, clients: int, stream: bool, vocab: int, args: argparse.Namespace) -> Result:
        work = prompts(vocab, clients * requests_per_client(clients))
        server_before, client_before = process_cpu(self.process.pid), process_cpu()
        result = asyncio.run(load(self.port, clients, work, args, self.system, stream))
        server_after, client_after = process_cpu(self.process.pid), process_cpu()
        if server_before is not None and server_after is not None:
            result.server_cpu = server_after - server_before
        result.client_cpu = (client_after or 0.0) - (client_before or 0.0)
        return result

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


# -- transformers ---------------------------------------------------------------------------------


class Generate:
    """`transformers` `generate` on the same folder, in this process."""

    system = "transformers generate"

    def __init__(self, model_dir: Path, args: argparse.Namespace) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[args.dtype]  # fmt: skip
        if dtype is None:
            dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        torch.set_num_threads(args.threads)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                     dtype=dtype)  # fmt: skip
        self.model = model.to(args.device).eval()
        self.args = args

    def wave(self, batch: list[list[int]]) -> tuple[float, float, int]:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        cuda = self.args.device.startswith("cuda")

        class FirstToken(LogitsProcessor):
            """Called once per generated token; the first call follows the prefill."""

            def __init__(self) -> None:
                self.first: float | None = None

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                if self.first is None:
                    if cuda:
                        torch.cuda.synchronize()
                    self.first = time.perf_counter()
                return scores

        ids = torch.tensor(batch, device=self.args.device)
        marker = FirstToken()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=self.args.max_tokens, min_new_tokens=self.args.max_tokens,
                pad_token_id=self.model.config.eos_token_id,
                logits_processor=LogitsProcessorList([marker]),
            )  # fmt: skip
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        generated = (out.shape[1] - ids.shape[1]) * out.shape[0]
        return (marker.first or end) - start, end - start, generated

    def run(self, clients: int, stream: bool, vocab: int, args: argparse.Namespace) -> Result:
        result = Result(self.system, "static batches", clients)
        work = prompts(vocab, clients * requests_per_client(clients))
        cpu = process_cpu() or 0.0
        start = time.perf_counter()
        for offset in range(0, len(work), clients):
            ttft, e2e, generated = self.wave(work[offset : offset + clients])
            result.tokens += generated
            result.ttft += [ttft] * len(work[offset : offset + clients])
            result.e2e += [e2e] * len(work[offset : offset + clients])
        result.seconds = time.perf_counter() - start
        result.client_cpu = (process_cpu() or 0.0) - cpu
        return result

    def stop(self) -> None:
        pass


# -- report ------------------------------------------------------------------------------------


@dataclass
class Row:
    """A system, mode and client count: the medians over the rounds."""

    system: str
    mode: str
    clients: int
    runs: list[Result]

    def tokens_per_second(self) -> float:
        return median([r.tokens_per_second for r in self.runs])

    def spread(self) -> str:
        rates = [r.tokens_per_second for r in self.runs]
        return f"{min(rates):.0f}-{max(rates):.0f}"

    def latency(self, name: str, q: float) -> float:
        return median([percentile(getattr(r, name), q) for r in self.runs if getattr(r, name)])

    def cpu_per_1k(self, name: str) -> float:
        values = [getattr(r, name) / r.tokens * 1000 for r in self.runs
                  if getattr(r, name) is not None and r.tokens]  # fmt: skip
        return median(values) if values else float("nan")

    def events_per_request(self) -> float:
        return median([r.events / len(r.e2e) for r in self.runs if r.e2e])


def rows(results: list[Result]) -> list[Row]:
    grouped: dict[tuple[str, str, int], list[Result]] = {}
    for r in results:
        grouped.setdefault((r.system, r.mode, r.clients), []).append(r)
    return [Row(system, mode, clients, runs)
            for (system, mode, clients), runs in grouped.items()]  # fmt: skip


def _figure(value: float, width: int, digits: int) -> str:
    return f"{value:>{width}.{digits}f}" if value == value else f"{'-':>{width}}"


def report(results: list[Result], args: argparse.Namespace) -> None:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\ndevice {args.device}, {args.threads} CPU thread(s) per system, {args.max_tokens} "
          f"new tokens per request, prompts of {PROMPT_TOKENS} tokens, greedy; medians of "
          f"{args.rounds} interleaved round(s); load average at the end "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")  # fmt: skip
    print(
        "streamed: server-sent events, TTFT = first text event; whole: one JSON reply, no "
        "TTFT; generate: static batches in this process, TTFT = its first logits"
    )
    header = (f"{'system':<22}{'mode':<15}{'clients':>7}{'reqs':>5}{'tokens/s':>9}"
              f"{'range':>11}{'TTFT p50':>9}{'TTFT p99':>9}{'E2E p50':>9}{'E2E p99':>9}"
              f"{'ev/req':>7}{'srv cpu':>8}{'cli cpu':>8}")  # fmt: skip
    print(header)
    print(" " * 89 + "(CPU s per 1k tokens)")
    print("-" * len(header))
    table = sorted(rows(results), key=lambda row: (row.system, row.mode, row.clients))
    nan = float("nan")
    for row in table:
        print(f"{row.system:<22}{row.mode:<15}{row.clients:>7}{len(row.runs[0].e2e):>5}"
              f"{row.tokens_per_second():>9.1f}{row.spread():>11}"
              f"{_figure(row.latency('ttft', .5), 9, 3)}{_figure(row.latency('ttft', .99), 9, 3)}"
              f"{_figure(row.latency('e2e', .5), 9, 3)}{_figure(row.latency('e2e', .99), 9, 3)}"
              f"{_figure(row.events_per_request() if row.mode == 'streamed' else nan, 7, 1)}"
              f"{_figure(row.cpu_per_1k('server_cpu'), 8, 3)}"
              f"{_figure(row.cpu_per_1k('client_cpu'), 8, 3)}")  # fmt: skip
    print("\nratios of median tokens/s (batching vs the others, in the same mode)")
    by = {(row.system, row.mode, row.clients): row for row in table}
    for mode in ("streamed", "whole"):
        for clients in args.clients:
            ours = by.get(("llmops batching", mode, clients))
            if ours is None:
                continue
            parts = [f"{mode:<8} {clients:>3} clients:"]
            for other in (
                ("llmops no batching", mode),
                ("transformers generate", "static batches"),
            ):
                if (*other, clients) in by:
                    ratio = ours.tokens_per_second() / by[(*other, clients)].tokens_per_second()
                    parts.append(f"/ {other[0]} = {ratio:.2f}x")
            print("  ".join(parts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="an exported model (default: random)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")],
                        default=list(CLIENTS))  # fmt: skip
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of each system (the same for all; on a small CPU, OpenMP threads "
        "competing with the load generator distort every number)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--no-stream", action="store_true", help="the whole mode only")
    modes.add_argument("--stream-only", action="store_true", help="the streamed mode only")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-unbatched", action="store_true", help="no batching-off server")
    parser.add_argument("--llama", action="store_true", help="a random Llama-shaped model")
    parser.add_argument("--json", type=Path, help="also write every run here")
    args = parser.parse_args()
    streams = [not args.no_stream, not args.stream_only]
    streams = [stream for stream, kept in zip((True, False), streams, strict=True) if kept]
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as scratch:
        make = make_random_llama if args.llama else make_random_model
        model_dir = args.model_dir or make(Path(scratch) / "model", args.device)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        systems: list[Server | Generate] = []
        try:
            systems.append(Server(model_dir, 32, "llmops batching", args))
            if not args.skip_unbatched:
                systems.append(Server(model_dir, 1, "llmops no batching", args))
            if not args.skip_transformers:
                systems.append(Generate(model_dir, args))
            runs = [(system, stream) for system in systems
                    for stream in (streams if isinstance(system, Server) else [False])]  # fmt: skip
            for system, stream in runs:  # warm-up
                system.run(1, stream, vocab, args)
            for round_ in range(args.rounds):
                for clients in args.clients:
                    turn = (round_ + args.clients.index(clients)) % len(runs)
                    for system, stream in runs[turn:] + runs[:turn]:
                        results.append(system.run(clients, stream, vocab, args))
                    print(f"  round {round_ + 1}: {clients} clients done", file=sys.stderr)
        finally:
            for system in systems:
                system.stop()
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 0


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
