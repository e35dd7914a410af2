"""Load test of the inference server: 1, 8 and 32 concurrent streaming clients.

    python benchmarks/serve_load.py [--model-dir DIR] [--device cpu|cuda] [--max-tokens 64]
    python benchmarks/serve_load.py --llama --clients 1,8,32,64   # a Llama-shaped model

Compares, on the same prompts (token ids of equal length) with greedy decoding of exactly
`--max-tokens` tokens (eos ignored):

- llmops, batching on: `python -m llmops_trainer.serve` with --max-batch-size 32;
- llmops, batching off: the same server with --max-batch-size 1 (requests queue);
- transformers: `AutoModelForCausalLM.generate` on the same exported folder, loaded from
  disk only, called in this process with static batches of as many requests as there are
  clients (each wave starts when the previous one ends, as the clients' next requests would).
  It pays no HTTP, tokenization or scheduling cost, which favours it.

Prints tokens/s and p50/p99 time to first token (TTFT) and end-to-end latency per system and
client count, then the ratios. Without --model-dir a random model in the trainer's export
format is written to a temporary folder (the speed of a model does not depend on its training):
the built-in GPT, or with --llama a `transformers` Llama (RoPE, RMSNorm, SwiGLU, grouped-query
attention), as the trainer exports open-weights and llama runs.
Needs the `bench` extra for transformers; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
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
    clients: int
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


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


async def one_request(
    http: httpx.AsyncClient, prompt: list[int], max_tokens: int, result: Result
) -> None:
    body = {
        "model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    start = time.perf_counter()
    first: float | None = None
    async with http.stream("POST", "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"]:
                first = time.perf_counter()
            if chunk.get("usage"):
                result.tokens += chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    result.ttft.append((first or end) - start)
    result.e2e.append(end - start)


async def load(url: str, clients: int, work: list[list[int]], args: argparse.Namespace,
               system: str) -> Result:  # fmt: skip
    result = Result(system, clients)
    per_client = requests_per_client(clients)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client(k: int) -> None:
            for r in range(per_client):
                await one_request(http, work[k * per_client + r], args.max_tokens, result)

        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        result.seconds = time.perf_counter() - start
    return result


def bench_server(model_dir: Path, batch: int, system: str, vocab: int,
                 args: argparse.Namespace) -> list[Result]:  # fmt: skip
    port = 18000 + batch
    process = start_server(model_dir, port, batch, args)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(load(url, 1, prompts(vocab, requests_per_client(1)), args, system))  # warm-up
        results = []
        for clients in args.clients:
            work = prompts(vocab, clients * requests_per_client(clients))
            results.append(asyncio.run(load(url, clients, work, args, system)))
            print(f"  {system}: {clients} clients done", file=sys.stderr)
        return results
    finally:
        process.terminate()
        process.wait(timeout=120)


# -- transformers ---------------------------------------------------------------------------------


def bench_transformers(model_dir: Path, vocab: int, args: argparse.Namespace) -> list[Result]:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]  # fmt: skip
    if dtype is None:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    model = model.to(args.device).eval()

    class FirstToken(LogitsProcessor):
        """Called once per generated token; the first call follows the prefill."""

        def __init__(self) -> None:
            self.first: float | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.first is None:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                self.first = time.perf_counter()
            return scores

    def wave(batch: list[list[int]]) -> tuple[float, float, int]:
        ids = torch.tensor(batch, device=args.device)
        marker = FirstToken()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                pad_token_id=model.config.eos_token_id,
                logits_processor=LogitsProcessorList([marker]),
            )  # fmt: skip
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        end = time.perf_counter()
        generated = (out.shape[1] - ids.shape[1]) * out.shape[0]
        return (marker.first or end) - start, end - start, generated

    wave(prompts(vocab, 1))  # warm-up
    results = []
    for clients in args.clients:
        result = Result("transformers generate", clients)
        work = prompts(vocab, clients * requests_per_client(clients))
        start = time.perf_counter()
        for offset in range(0, len(work), clients):
            ttft, e2e, generated = wave(work[offset : offset + clients])
            result.tokens += generated
            result.ttft += [ttft] * len(work[offset : offset + clients])
            result.e2e += [e2e] * len(work[offset : offset + clients])
        result.seconds = time.perf_counter() - start
        results.append(result)
        print(f"  transformers: {clients} clients done", file=sys.stderr)
    return results


# -- report ------------------------------------------------------------------------------------


def report(results: list[Result], args: argparse.Namespace) -> None:
    print(f"\ndevice {args.device}, {args.threads} CPU thread(s) per system, {args.max_tokens} "
          f"new tokens per request, prompts of {PROMPT_TOKENS} tokens, greedy")  # fmt: skip
    header = (f"{'system':<24}{'clients':>8}{'requests':>9}{'tokens/s':>10}"
              f"{'TTFT p50':>10}{'TTFT p99':>10}{'E2E p50':>10}{'E2E p99':>10}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.system:<24}{r.clients:>8}{len(r.e2e):>9}{r.tokens_per_second:>10.1f}"
              f"{percentile(r.ttft, .5):>10.3f}{percentile(r.ttft, .99):>10.3f}"
              f"{percentile(r.e2e, .5):>10.3f}{percentile(r.e2e, .99):>10.3f}")  # fmt: skip
    print("\nratios of tokens/s (latencies in seconds above)")
    by = {(r.system, r.clients): r for r in results}
    for clients in args.clients:
        ours = by.get(("llmops batching", clients))
        if ours is None:
            continue
        parts = [f"{clients:>3} clients:"]
        for other in ("llmops no batching", "transformers generate"):
            if (other, clients) in by:
                ratio = ours.tokens_per_second / by[(other, clients)].tokens_per_second
                parts.append(f"batching / {other} = {ratio:.2f}x")
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
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--llama", action="store_true", help="a random Llama-shaped model")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        make = make_random_llama if args.llama else make_random_model
        model_dir = args.model_dir or make(Path(scratch) / "model", args.device)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        results = bench_server(model_dir, 32, "llmops batching", vocab, args)
        results += bench_server(model_dir, 1, "llmops no batching", vocab, args)
        if not args.skip_transformers:
            results += bench_transformers(model_dir, vocab, args)
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
