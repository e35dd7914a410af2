"""The local runtime end to end: `llmops run` on the quickstart (scaled down for test time),
serving and answering a completion; Ctrl-C and resume; a failing pod's error surfaces."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops.local import state

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
LLMOPS = [sys.executable, "-m", "llmops"]
DATASET, RUN = "python-stdlib", "stdlib-gpt"


def scaled(max_steps: int, interval: int) -> list[str]:
    """`--set` flags that scale the quickstart down for test time: a quarter of the modules,
    fewer steps; everything else as users get it."""
    settings = {
        f"ds/{DATASET}.spec.sources.0.include": "[a*.py, b*.py, c*.py, d*.py, s*.py]",
        f"tr/{RUN}.spec.hyperparameters.maxSteps": max_steps,
        f"tr/{RUN}.spec.hyperparameters.warmupSteps": 5,
        f"tr/{RUN}.spec.checkpointing.intervalSteps": interval,
        f"tr/{RUN}.spec.evaluation.intervalSteps": interval,
    }
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def write(tmp_path: Path, docs: list[dict[str, Any]]) -> Path:
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def start(manifest: Path, state_dir: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*LLMOPS, "run", "-f", str(manifest), "--state-dir", str(state_dir), *extra],
        cwd=ROOT,  # relative source paths start at the repository root
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def status(state_dir: Path, kind: str, name: str) -> dict[str, Any]:
    body = state.load_object(state.Layout(state_dir), kind, "default", name) or {}
    return body.get("status") or {}


def wait_for(predicate: Any, timeout: float, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_quickstart_trains_serves_and_answers(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    process = start(QUICKSTART, state_dir, *scaled(40, 20))
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if "serving until Ctrl-C" in line:
            break
    output = "".join(lines)
    assert process.poll() is None, output
    served = status(state_dir, "ModelDeployment", RUN)
    assert served["phase"] == "Ready"
    url = served["url"]
    assert url.startswith("http://127.0.0.1:")
    assert f"curl -s {url}/completions" in output and "from openai import OpenAI" in output

    request = urllib.request.Request(
        f"{url}/completions",
        data=json.dumps({"model": RUN, "prompt": "def ", "max_tokens": 8}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    assert answer["choices"][0]["text"] is not None
    assert answer["usage"]["completion_tokens"] >= 1

    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0

    layout = state.Layout(state_dir)
    dataset = status(state_dir, "Dataset", DATASET)
    assert dataset["phase"] == "Succeeded"
    assert dataset["outputUri"] == f"pvc://{DATASET}-data/g1"
    shards = layout.volume("default", f"{DATASET}-data") / "g1"
    assert (shards / "manifest.json").is_file() and (shards / "tokenizer.json").is_file()
    assert json.loads((shards / "manifest.json").read_text())["splits"]["train"]

    run = status(state_dir, "TrainingRun", RUN)
    assert run["phase"] == "Succeeded" and run["step"] == run["totalSteps"] == 40
    types = {c["type"]: c["status"] for c in run["conditions"]}
    assert types["Complete"] == "True" and types["Ready"] == "True"
    checkpoints = layout.volume("default", f"{RUN}-checkpoints")
    assert (checkpoints / "step-40" / "checkpoint.json").is_file()
    assert run["checkpoints"]["latest"]["uri"] == f"pvc://{RUN}-checkpoints/step-40"
    report = layout.resource_dir("TrainingRun", "default", RUN)
    assert RUN in (report / "model_card.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:  # the `local` extra
        assert (report / "training-curve.png").stat().st_size > 0
    assert (layout.resource_dir("Dataset", "default", DATASET) / "dataset_card.md").is_file()
    assert status(state_dir, "ModelDeployment", RUN)["phase"] == "Pending"  # stopped

    table = subprocess.run(
        [*LLMOPS, "status", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert DATASET in table and "Succeeded" in table and "step 40/40" in table


@pytest.mark.timeout(900)  # two trainings and a Dataset, on a machine that may be shared
def test_ctrl_c_checkpoints_and_a_second_run_resumes(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    without_serving = list(yaml.safe_load_all(QUICKSTART.read_text()))[:2]
    manifest = write(tmp_path, without_serving)
    process = start(manifest, state_dir, "--no-serve", *scaled(200, 100))
    wait_for(
        lambda: int(status(state_dir, "TrainingRun", RUN).get("step") or 0) >= 20,
        600,
        process,
    )
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 130, output
    assert "run the same command again to resume" in output
    stopped = status(state_dir, "TrainingRun", RUN)
    assert stopped["phase"] == "Suspended"
    latest = stopped["checkpoints"]["latest"]
    assert 20 <= latest["step"] < 100  # written on SIGTERM, before the first interval
    checkpoints = state.Layout(state_dir).volume("default", f"{RUN}-checkpoints")
    assert (checkpoints / latest["name"] / "checkpoint.json").is_file()

    again = subprocess.run(
        [
            *LLMOPS,
            "run",
            "-f",
            str(manifest),
            "--state-dir",
            str(state_dir),
            "--no-serve",
            *scaled(200, 100),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "up to date" in again.stdout  # the Dataset is not processed twice
    done = status(state_dir, "TrainingRun", RUN)
    assert done["phase"] == "Succeeded" and done["step"] == 200
    log = state.Layout(state_dir).log_file("TrainingRun", "default", RUN, f"{RUN}-workers-0-0")
    assert f"resuming from {latest['name']}" in log.read_text()


def test_a_failing_pod_surfaces_its_error(tmp_path: Path) -> None:
    dataset = list(yaml.safe_load_all(QUICKSTART.read_text()))[:1]
    state_dir = tmp_path / "state"
    result = subprocess.run(
        [
            *LLMOPS,
            "run",
            "-f",
            str(write(tmp_path, dataset)),
            "--state-dir",
            str(state_dir),
            "--set",
            f"ds/{DATASET}.spec.sources.0.path=examples/data/no-such-file.txt",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 1
    assert "no-such-file.txt" in result.stdout  # the log tail of the failed pod
    failed = status(state_dir, "Dataset", DATASET)
    assert failed["phase"] == "Failed"
    condition = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "SliceFailed"
    assert "InputNotFound" in condition["message"]  # the pod's termination message


def test_a_wall_time_budget_stops_the_run_after_a_checkpoint(tmp_path: Path) -> None:
    """The controller's budget rule, acted on by the local runtime: the gang gets SIGTERM,
    checkpoints, and the run fails with BudgetExhausted."""
    state_dir = tmp_path / "state"
    manifest = write(tmp_path, list(yaml.safe_load_all(QUICKSTART.read_text()))[:2])
    budget = ["--set", f"tr/{RUN}.spec.budget.maxWallTimeSeconds=45"]
    process = start(manifest, state_dir, "--no-serve", *scaled(5000, 2500), *budget)
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 1, output
    run = status(state_dir, "TrainingRun", RUN)
    assert run["phase"] == "Failed", run
    failed = next(c for c in run["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BudgetExhausted" and "maxWallTimeSeconds=45" in failed["message"]
    assert run["acceleratorHours"] > 0
    latest = run["checkpoints"]["latest"]
    assert 0 < latest["step"] < 2500  # written on SIGTERM, before the first interval
    checkpoints = state.Layout(state_dir).volume("default", f"{RUN}-checkpoints")
    assert (checkpoints / latest["name"] / "checkpoint.json").is_file()
