"""Fixtures of the trainer tier: a toy dataset and one uninterrupted reference run that the
failure tests compare their loss curves and sample schedules against."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from helpers import Job, make_dataset, training_run

REFERENCE_STEPS = 40


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def job(tmp_path: Path, data: Path) -> Callable[..., Job]:
    """Makes Jobs in this test's folder; each gets its own rendezvous port."""

    def make(run: dict[str, object], name: str = "run", **kwargs: object) -> Job:
        return Job(run, kwargs.pop("data", data), tmp_path / name, port=free_port(), **kwargs)  # type: ignore[arg-type]

    return make


def reference_run(**overrides: object) -> dict[str, object]:
    """The spec every comparison uses: 40 steps, checkpoints and evaluations every 10."""
    spec: dict[str, object] = {
        "hyperparameters": {"maxSteps": REFERENCE_STEPS, "globalBatchSize": 8},
        "checkpointing": {"intervalSteps": 10, "keepLast": 2},
        "evaluation": {"intervalSteps": 10, "batches": 2, "metrics": ["perplexity", "accuracy"]},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}  # type: ignore[dict-item]
        else:
            spec[key] = value
    return training_run(**spec)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Iterator[Job]:
    """ZeRO stage 0, 2 processes, never interrupted."""
    job = Job(reference_run(), data, tmp_path_factory.mktemp("reference"), port=free_port())
    code = job.run()
    assert code == 0, job.log.read_text()[-4000:]
    yield job
