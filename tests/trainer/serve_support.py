"""A tiny randomly initialised model written in the trainer's formats (final export and
checkpoint), and an in-process server on 127.0.0.1, for the serving tests and benchmark."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from prometheus_client import CollectorRegistry

from llmops.api.dataset import TokenizerTraining
from llmops_trainer import checkpoint, hf_export
from llmops_trainer.data import tokenize
from llmops_trainer.model import GPT, GPTConfig
from llmops_trainer.serve import loading
from llmops_trainer.serve.__main__ import build_engine
from llmops_trainer.serve.api import ServerState, create_app
from llmops_trainer.serve.engine import Engine
from llmops_trainer.serve.metrics import ServingMetrics
from llmops_trainer.serve.settings import ServeSettings

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum songs"


def corpus() -> list[str]:
    words = WORDS.split()
    return [" ".join(words[i:] + words[:i]) + "." for i in range(len(words))] * 4


def make_model(
    folder: Path,
    *,
    seed: int = 0,
    config: GPTConfig | None = None,
    vocab_size: int = 300,
    scale: float = 1.0,
    context_length: int = 64,
) -> Path:
    """The final model as the trainer writes it (`<output>/model`): GPT-2 export, tokenizer,
    llmops_model.json. `scale` multiplies the random weights, so greedy decoding of a random
    model does not sit on near-ties between logits."""
    tokenizer = tokenize.train(corpus(), TokenizerTraining(vocab_size=vocab_size, min_frequency=1))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_path = folder.parent / f"{folder.name}-tokenizer.json"
    tokenizer.save(str(tokenizer_path))
    eos = tokenize.eos_id(tokenizer)
    config = config or GPTConfig(
        vocab_size=tokenizer.get_vocab_size(),
        context_length=context_length,
        num_layers=2,
        num_heads=2,
        hidden_size=32,
    )
    model = random_model(config, seed, scale)
    hf_export.export(model.state_dict(), config, eos, folder, tokenizer_path)
    (folder / loading.MODEL_CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
    return folder


def random_model(config: GPTConfig, seed: int, scale: float = 1.0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    if scale != 1.0:
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(scale)
    return model


def make_checkpoint(root: Path, export: Path, step: int = 10) -> Path:
    """A published, sealed ZeRO-0 checkpoint (`<root>/step-<N>`, `latest`) of an export's
    weights, in the layout the trainer writes."""
    config, state_dict = hf_export.load_export(export)
    partial = root / checkpoint.partial_name(step)
    partial.mkdir(parents=True)
    torch.save({"module": state_dict}, partial / "mp_rank_00_model_states.pt")
    state = {"step": step, "worldSize": 1, "zeroStage": 0, "model": config.to_dict()}
    checkpoint.write_state(partial, state)
    checkpoint.seal(partial)
    return checkpoint.publish(root, step)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RunningServer:
    url: str
    state: ServerState

    @property
    def engine(self) -> Engine:
        assert self.state.engine is not None
        return self.state.engine


@contextmanager
def running_server(
    model_dir: Path,
    *,
    served_name: str = "tiny",
    max_batch_size: int = 4,
    max_concurrency: int = 8,
    max_new_tokens: int = 32,
    auth_token_file: Path | None = None,
    max_body_bytes: int = 1 << 20,
    wrap: Callable[[Engine], None] | None = None,
    adapters: list[tuple[str, Path]] | None = None,
    max_queued: int | None = None,
    queue_timeout: float = 30.0,
) -> Iterator[RunningServer]:
    """uvicorn with the app on a free loopback port, in a thread of this process."""
    settings = ServeSettings(
        model_dir=model_dir,
        served_name=served_name,
        max_batch_size=max_batch_size,
        max_concurrency=max_concurrency,
        max_new_tokens=max_new_tokens,
        auth_token_file=auth_token_file,
        device="cpu",
        dtype="float32",
        adapters=list(adapters or []),
        max_queued=max_queued,
        queue_timeout=queue_timeout,
    )
    metrics = ServingMetrics(CollectorRegistry())
    loaded = loading.load(model_dir)
    context = loaded.context_length
    state = ServerState(
        served_name, loaded.label, context, min(max_new_tokens, context - 1), metrics,
        auth_token_file,
    )  # fmt: skip

    def load() -> Engine:
        engine = build_engine(loaded, settings, metrics)
        if wrap is not None:
            wrap(engine)
        return engine

    port = free_port()
    app = create_app(state, load, max_body_bytes)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not state.ready:
        if state.failed or time.monotonic() > deadline:
            raise RuntimeError(f"server did not become ready: {state.failed}")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", state)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def metric(url: str, name: str, labels: str = "") -> float:
    """A sample's value on the server's /metrics (0 when absent); `labels` as written in the
    exposition (`reason="too_large"`), matched as a subset of the sample's labels."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = dict(part.split("=", 1) for part in labels.split(",") if part)
    wanted = {key.strip(): value.strip().strip('"') for key, value in wanted.items()}
    text = httpx.get(url + "/metrics").text
    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and wanted.items() <= sample.labels.items():
                total += sample.value
                found = True
    return total if found else 0.0


def wait_until(condition: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Poll for an outcome (the limit only turns a hang into a failure)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)
