"""What the server process is configured with: the ModelDeployment's `spec.server` when run by
the controller, command-line flags when run by hand."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from llmops.api.modeldeployment import ModelDeployment
from llmops.api.workload import Env

MODEL_DIR_ENV = Env.MODEL_DIR
AUTH_TOKEN_FILE_ENV = Env.AUTH_TOKEN_FILE
# The controller gives pods 60 s to terminate, of which a 5 s preStop sleep; drain in the rest.
DEFAULT_GRACE_SECONDS = 50.0


@dataclass
class ServeSettings:
    model_dir: Path
    served_name: str
    port: int = 8000
    host: str = "0.0.0.0"
    max_batch_size: int = 8
    max_concurrency: int = 64
    max_new_tokens: int = 256
    context_length: int | None = None  # None: the model's
    auth_token_file: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    max_body_bytes: int = 1 << 20
    # Requests beyond max_concurrency wait (first come first served) for room, at most
    # max_queued of them (None: 4 x max_concurrency) for at most queue_timeout seconds each,
    # before a 429; vLLM queues without bound.
    max_queued: int | None = None
    queue_timeout: float = 30.0
    # LoRA adapters served by name on the model: (name, folder in peft's layout)
    adapters: list[tuple[str, Path]] = field(default_factory=list)
    # A file listing adapters (AdapterEntry records), read at start and then every
    # adapters_poll_seconds: new names and versions are served without a restart.
    adapters_file: Path | None = None
    adapters_poll_seconds: float = 10.0

    @classmethod
    def from_deployment(cls, md: ModelDeployment, model_dir: Path) -> ServeSettings:
        server = md.spec.server
        auth = os.environ.get(AUTH_TOKEN_FILE_ENV)
        if server.auth_token_secret is not None and not auth:
            # The spec asks for a token: never serve without one (fail closed).
            raise EmptyTokenError(
                f"spec.server.authTokenSecret is set but {AUTH_TOKEN_FILE_ENV} is not"
            )
        # The controller resolves each adapter to a mounted folder (the spec names runs)
        # and lists them in a file of their own.
        adapters_file = os.environ.get(Env.ADAPTERS_FILE)
        poll = os.environ.get(Env.ADAPTERS_POLL_SECONDS)
        return cls(
            adapters_file=Path(adapters_file) if adapters_file else None,
            adapters_poll_seconds=float(poll) if poll else 10.0,
            model_dir=model_dir,
            served_name=md.spec.model.served_name or md.metadata.name or model_dir.name,
            port=server.port,
            max_batch_size=server.max_batch_size,
            max_concurrency=server.max_concurrency,
            max_new_tokens=server.max_new_tokens,
            context_length=server.context_length,
            auth_token_file=Path(auth) if auth else None,
        )

    @property
    def queue_bound(self) -> int:
        return 4 * self.max_concurrency if self.max_queued is None else self.max_queued


class EmptyTokenError(RuntimeError):
    """The bearer token file is missing or empty: serving would let anyone in."""


def read_token(path: Path) -> str:
    """The bearer token in `path`; refuses a missing or empty one (never fail open)."""
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise EmptyTokenError(f"the bearer token file {path} cannot be read: {error}") from error
    if not token:
        raise EmptyTokenError(
            f"the bearer token file {path} is empty; refusing to serve without a token "
            "(fill the Secret's key, or remove server.authTokenSecret)"
        )
    return token
