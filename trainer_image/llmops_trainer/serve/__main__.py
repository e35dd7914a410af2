"""The server process.

    python -m llmops_trainer.serve --config /etc/llmops/modeldeployment.json
    python -m llmops_trainer.serve --model-dir DIR [--port P]

With --config (the ModelDeployment as JSON) the model folder is LLMOPS_MODEL_DIR and the bearer
token, if any, is in the file LLMOPS_AUTH_TOKEN_FILE (a missing or empty one stops the server:
it never serves without the token it was told to require). On SIGTERM the server reports not
ready (503 on /readyz, still answering), refuses new requests with 503 and finishes what it
admitted within the grace period, then closes its port and exits; a second signal exits at
once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import uvicorn
from prometheus_client import CollectorRegistry

from llmops.api.modeldeployment import ModelDeployment
from llmops_trainer.model import GPT
from llmops_trainer.serve import adapter_watch, adapters, loading
from llmops_trainer.serve.api import ServerState, create_app
from llmops_trainer.serve.decoder_cache import DecoderKVCacheModel, UnsupportedModel
from llmops_trainer.serve.engine import Engine, KVCacheModel
from llmops_trainer.serve.failures import (
    AdapterLoadError,
    ServingConfigError,
    UnsupportedModelError,
    failure_reason,
    report_failure,
)
from llmops_trainer.serve.metrics import ServingMetrics
from llmops_trainer.serve.settings import (
    AUTH_TOKEN_FILE_ENV,
    MODEL_DIR_ENV,
    EmptyTokenError,
    ServeSettings,
    read_token,
)

log = logging.getLogger("llmops_trainer.serve")
SWITCH_INTERVAL = 0.0005  # seconds a thread holds the GIL while another waits for it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llmops_trainer.serve", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="the ModelDeployment object as JSON")
    source.add_argument("--model-dir", type=Path, help="serve this folder (local use)")
    parser.add_argument("--port", type=int, help="HTTP port (default: spec.server.port, 8000)")
    parser.add_argument("--host", default=None, help="listen address (default 0.0.0.0)")
    parser.add_argument("--served-name", help="model name clients send (default: folder name)")
    parser.add_argument("--max-batch-size", type=int, help="sequences decoded together")
    parser.add_argument("--max-concurrency", type=int, help="requests running plus queued")
    parser.add_argument("--max-new-tokens", type=int, help="upper bound on max_tokens")
    parser.add_argument("--context-length", type=int, help="prompt plus completion tokens")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: auto)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (auto)")
    parser.add_argument("--grace-seconds", type=float, help="drain time after SIGTERM")
    parser.add_argument(
        "--max-queued", type=int, help="requests waiting for room beyond max-concurrency"
    )
    parser.add_argument(
        "--queue-timeout", type=float, help="seconds a request waits for room before a 429"
    )
    parser.add_argument(
        "--adapters-file",
        type=Path,
        help="a JSON list of {name, path} adapters, read again every few seconds",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve a LoRA adapter folder (peft layout) as model NAME (repeatable)",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> ServeSettings:
    if args.config is not None:
        md = ModelDeployment.model_validate_json(args.config.read_text())
        model_dir = os.environ.get(MODEL_DIR_ENV)
        if not model_dir:
            raise SystemExit(f"--config needs {MODEL_DIR_ENV}, the folder of the model to serve")
        settings = ServeSettings.from_deployment(md, Path(model_dir))
    else:
        auth = os.environ.get(AUTH_TOKEN_FILE_ENV)
        settings = ServeSettings(
            model_dir=args.model_dir,
            served_name=args.served_name or loading.model_folder(args.model_dir).name,
            auth_token_file=Path(auth) if auth else None,
        )
    overrides = {
        "port": args.port,
        "host": args.host,
        "served_name": args.served_name,
        "max_batch_size": args.max_batch_size,
        "max_concurrency": args.max_concurrency,
        "max_new_tokens": args.max_new_tokens,
        "context_length": args.context_length,
        "grace_seconds": args.grace_seconds,
        "max_queued": args.max_queued,
        "queue_timeout": args.queue_timeout,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(settings, name, value)
    for value in args.adapter:
        name, _, folder = value.partition("=")
        if not name or not folder:
            raise SystemExit(f"--adapter wants NAME=DIR, got {value!r}")
        settings.adapters.append((name, Path(folder)))
    if args.adapters_file is not None:
        settings.adapters_file = args.adapters_file
    settings.device, settings.dtype = args.device, args.dtype
    settings.max_concurrency = max(settings.max_concurrency, settings.max_batch_size)
    return settings


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # Half precision on accelerators; float32 on CPUs, where it is the fast path.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SystemExit(f"unknown dtype {name!r}")
    return dtype


def build_engine(
    loaded: loading.LoadedModel, settings: ServeSettings, metrics: ServingMetrics
) -> Engine:
    context = loaded.context_length
    if settings.context_length is not None:
        if settings.context_length > context:
            raise ServingConfigError(
                f"contextLength {settings.context_length} exceeds the model's {context}"
            )
        context = settings.context_length
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    runner: KVCacheModel | DecoderKVCacheModel
    names = [name for name, _ in settings.adapters]
    if loaded.config is None:
        try:
            lora = [adapters.load(name, folder) for name, folder in settings.adapters]
            runner = DecoderKVCacheModel(
                loaded.transformers_model, settings.max_batch_size, context, device, dtype, lora
            )
        except UnsupportedModel as error:
            raise UnsupportedModelError(str(error)) from error
        except adapters.AdapterError as error:
            raise AdapterLoadError(str(error)) from error
    elif names:
        raise AdapterLoadError("LoRA adapters are served on transformers models only")
    else:
        model = GPT(loaded.config)
        model.load_state_dict(loaded.state_dict, strict=False)  # the tied head may be absent
        runner = KVCacheModel(model, settings.max_batch_size, context, device, dtype)
    return Engine(
        runner,
        loaded.tokenizer,
        loaded.eos_token_id,
        metrics,
        settings.max_concurrency,
        stop_token_ids=loaded.stop_token_ids,
        chat=loaded.chat,
        adapter_names=names,
        max_queued=settings.queue_bound,
        queue_timeout=settings.queue_timeout,
    )


class Server(uvicorn.Server):
    """uvicorn's server, draining before it closes its port: on the first SIGTERM readiness
    goes to 503 at once and new requests get 503, while the port stays open (probes get an
    answer, not a refused connection) until what was admitted is done or the grace period
    ends; then uvicorn shuts down as usual. A second signal shuts down at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace: float) -> None:
        super().__init__(config)
        self.state = state
        self.grace = grace

    def handle_exit(self, sig: int, frame: object) -> None:
        engine = self.state.engine
        if self.state.draining or engine is None or not self.state.ready:
            self.state.draining = True
            super().handle_exit(sig, frame)  # type: ignore[arg-type]
            return
        self.state.draining = True  # /readyz and new requests: 503 from now on
        # Not in the signal handler: it may have interrupted the loop inside the scheduler.
        threading.Thread(
            target=self._drain, args=(engine, sig, frame), name="llmops-drain", daemon=True
        ).start()

    def _drain(self, engine: Engine, sig: int, frame: object) -> None:
        started = time.monotonic()
        if not engine.drain(self.grace):
            log.warning("grace period over with requests still running")
        left = self.grace - (time.monotonic() - started)
        self.config.timeout_graceful_shutdown = max(1, int(left))
        log.info("drained in %.1f s; shutting down", time.monotonic() - started)
        super().handle_exit(sig, frame)  # type: ignore[arg-type]


def serve(settings: ServeSettings) -> int:
    if settings.auth_token_file is not None:
        try:
            read_token(settings.auth_token_file)
        except EmptyTokenError as error:
            log.error("%s", error)
            report_failure(failure_reason(error), str(error))
            return 1
    metrics = ServingMetrics(CollectorRegistry())
    state = ServerState(
        served_name=settings.served_name,
        label=str(settings.model_dir),
        context_length=settings.context_length or 0,
        max_new_tokens=settings.max_new_tokens,
        metrics=metrics,
        auth_token_file=settings.auth_token_file,
    )
    server: Server | None = None

    def load() -> Engine:
        loaded = loading.load(settings.model_dir)
        listed = settings.adapters_file
        if listed is not None and listed.is_file():
            try:
                entries = adapter_watch.read_entries(listed)
            except ValueError as error:
                raise AdapterLoadError(f"adapters file {listed}: {error}") from error
            settings.adapters += [(e.name, Path(e.path)) for e in entries]
        engine = build_engine(loaded, settings, metrics)
        if listed is not None:
            adapter_watch.AdapterWatcher(
                listed,
                engine,
                metrics,
                settings.adapters_poll_seconds,
                served=dict(settings.adapters),
            ).start()
        context = engine.context_length
        state.label = loaded.label
        state.context_length = context
        state.max_new_tokens = min(settings.max_new_tokens, context - 1)
        metrics.model_info.labels(settings.served_name, loaded.label, str(context)).set(1)
        return engine

    def fatal() -> None:
        if server is not None:
            server.should_exit = True

    config = uvicorn.Config(
        create_app(state, load, settings.max_body_bytes, on_fatal=fatal),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=int(settings.grace_seconds),
        access_log=False,
    )
    server = Server(config, state, settings.grace_seconds)
    # The engine thread and the event loop share the GIL: with the default 5 ms switch
    # interval one waits that long for the other's Python (a decoding step, a burst of
    # requests), which stalls streaming and, worse, the decoding of the whole batch.
    sys.setswitchinterval(SWITCH_INTERVAL)
    # uvicorn re-raises the signal it stopped on to the handler it found; a no-op one lets a
    # drained server exit 0 rather than die of SIGTERM.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if state.failed:
        report_failure(state.failed_reason, state.failed)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = settings_from(parse_args(argv))
    except EmptyTokenError as error:
        log.error("%s", error)
        report_failure(failure_reason(error), str(error))
        return 1
    return serve(settings)


if __name__ == "__main__":
    code = main()
    # Everything is shut down by now; skip the interpreter's teardown of torch and friends
    # (most of an idle server's exit time).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
