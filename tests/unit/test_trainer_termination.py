"""A failure report always fits the 4096 bytes Kubernetes keeps of a termination message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmops.api.workload import FailureReport, read_record
from llmops_trainer.termination import LIMIT, write_failure

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("message", ["ok", "é" * 3000, '"\n' * 3000, "x" * 10000])
def test_a_failure_report_is_cut_to_fit_in_bytes(
    message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("LLMOPS_TERMINATION_LOG", str(log))
    write_failure("serve", "ModelLoadFailed", message)
    text = log.read_text()
    assert len(text.encode()) <= LIMIT
    report = read_record(FailureReport, text)
    assert report is not None and report.reason == "ModelLoadFailed"
    assert message.startswith(report.message) and report.message
    if len(json.dumps(message)) < LIMIT - 100:
        assert report.message == message


def test_every_reason_the_server_gives_is_in_the_contract() -> None:
    from llmops.api.workload import SERVER_REASONS
    from llmops_trainer.serve.failures import REASONS, failure_reason

    given = {reason for _, reason in REASONS} | {failure_reason(RuntimeError("other"))}
    assert given <= set(SERVER_REASONS), given - set(SERVER_REASONS)


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        ("DistBackendError", True),
        (ConnectionResetError("peer"), True),
        (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"), True),
        (RuntimeError("NCCL communicator was aborted on rank 1"), True),
        (ValueError("contextLength 512 exceeds the model's 256 positions"), False),
        (RuntimeError("the split has no complete sample"), False),
        (KeyError("tokenizer.json"), False),
    ],
)
def test_a_lost_peer_is_not_a_permanent_failure(error: object, fault: bool) -> None:
    """Set-up and the final evaluation fail the run at once on errors a restart would meet
    again, but not on the gang's own faults: those get a restart like any crash."""
    import torch.distributed as dist

    from llmops_trainer.train import node_fault

    if error == "DistBackendError":
        error = dist.DistBackendError("store lost")
    assert isinstance(error, BaseException)
    assert node_fault(error) is fault
