"""The server as the controller runs it: `python -m llmops_trainer.serve --config`, the
ModelDeployment as JSON, LLMOPS_MODEL_DIR and a token file; SIGTERM drains in-flight work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_support import free_port, make_model

from llmops_trainer.model import GPTConfig

TOKEN = "t0ken"


def deployment(port: int) -> dict[str, object]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "demo", "namespace": "default", "uid": "1234"},
        "spec": {
            "model": {"trainingRun": {"name": "demo"}, "servedName": "demo-model"},
            "server": {
                "port": port,
                "maxBatchSize": 2,
                "maxConcurrency": 4,
                "maxNewTokens": 300,
                "authTokenSecret": {"name": "demo-api", "key": "token"},
            },
        },
    }


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server never became ready")


def test_config_entrypoint_and_graceful_shutdown(tmp_path: Path) -> None:
    # Large enough that 300 tokens take a while on a CPU: SIGTERM lands mid-generation.
    config = GPTConfig(vocab_size=300, context_length=320, num_layers=4, num_heads=4,
                       hidden_size=128)  # fmt: skip
    make_model(tmp_path / "output" / "model", config=config)
    port = free_port()
    config_file = tmp_path / "modeldeployment.json"
    config_file.write_text(json.dumps(deployment(port)))
    (tmp_path / "token").write_text(TOKEN + "\n")
    env = {
        **os.environ,
        "LLMOPS_MODEL_DIR": str(tmp_path / "output"),
        "LLMOPS_AUTH_TOKEN_FILE": str(tmp_path / "token"),
    }
    command = [sys.executable, "-m", "llmops_trainer.serve", "--config", str(config_file)]
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        assert "llmops_serving_requests_running" in httpx.get(url + "/metrics").text
        headers = {"Authorization": f"Bearer {TOKEN}"}
        models = httpx.get(url + "/v1/models", headers=headers).json()
        assert models["data"][0]["id"] == "demo-model"
        body = {
            "model": "demo-model", "prompt": "the quick", "max_tokens": 300, "stream": True,
            "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True},
        }  # fmt: skip
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers,
                          timeout=120) as reply:  # fmt: skip
            lines = reply.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith("data: {")
            process.send_signal(signal.SIGTERM)
            # Draining: the port still answers; readiness and new requests say 503.
            deadline = time.monotonic() + 30
            while httpx.get(url + "/readyz").status_code != 503:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert httpx.get(url + "/readyz").text == "draining\n"
            refused = httpx.post(url + "/v1/completions", headers=headers,
                                 json={"model": "demo-model", "prompt": "x"})  # fmt: skip
            assert refused.status_code == 503
            assert refused.json()["error"]["message"] == "the server is shutting down"
            assert httpx.get(url + "/healthz").status_code == 200  # alive, not killed
            assert process.poll() is None
            rest = [line for line in lines if line]
        # The request admitted before SIGTERM finished completely.
        assert rest[-1] == "data: [DONE]"
        usage = json.loads(rest[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == 300
        assert process.wait(timeout=60) == 0
        # ...and then the port closed.
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/readyz")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    output = (tmp_path / "server.log").read_text()
    assert "ready: serving demo-model" in output
    assert "drained in" in output


def test_an_idle_server_exits_at_once_on_sigterm(tmp_path: Path) -> None:
    make_model(tmp_path / "output" / "model")
    port = free_port()
    command = [sys.executable, "-m", "llmops_trainer.serve", "--model-dir",
               str(tmp_path / "output"), "--port", str(port), "--host", "127.0.0.1"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
        with httpx.Client() as keep_alive:  # an idle kept-alive connection, as a prober's
            assert keep_alive.get(f"http://127.0.0.1:{port}/metrics").is_success
            process.send_signal(signal.SIGTERM)
            # Nothing to drain: no wait for the grace period (50 s by default).
            assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_unloadable_model_exits_with_an_error(tmp_path: Path) -> None:
    config_file = tmp_path / "modeldeployment.json"
    config_file.write_text(json.dumps(deployment(free_port())))
    (tmp_path / "token").write_text(TOKEN)
    env = {
        **os.environ,
        "LLMOPS_MODEL_DIR": str(tmp_path),  # holds no model
        "LLMOPS_AUTH_TOKEN_FILE": str(tmp_path / "token"),
    }
    command = [sys.executable, "-m", "llmops_trainer.serve", "--config", str(config_file)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "neither an exported model" in result.stderr


def test_a_deployment_asking_for_a_token_never_serves_without_one(tmp_path: Path) -> None:
    make_model(tmp_path / "output" / "model")
    config_file = tmp_path / "modeldeployment.json"
    config_file.write_text(json.dumps(deployment(free_port())))
    command = [sys.executable, "-m", "llmops_trainer.serve", "--config", str(config_file)]
    base = {k: v for k, v in os.environ.items() if k != "LLMOPS_AUTH_TOKEN_FILE"}
    base["LLMOPS_MODEL_DIR"] = str(tmp_path / "output")
    (tmp_path / "empty").write_text("\n")
    for extra, message in (
        ({}, "authTokenSecret is set but LLMOPS_AUTH_TOKEN_FILE is not"),
        ({"LLMOPS_AUTH_TOKEN_FILE": str(tmp_path / "empty")}, "is empty"),
        ({"LLMOPS_AUTH_TOKEN_FILE": str(tmp_path / "missing")}, "cannot be read"),
    ):
        result = subprocess.run(
            command, env={**base, **extra}, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 1, result.stderr
        assert message in result.stderr
