"""The served `/openapi.json` describes the server truly: generated from the models that
validate, no 422 (invalid requests answer 400), every status the server answers listed, the
bearer scheme when a token is configured; and schemathesis, run against the real server with
the document as its only knowledge (the model name pinned), finds no 5xx, no undocumented
status code or content type, no response or event that violates the document and no
schema-violating request accepted. benchmarks/serve_schemathesis.py is the larger run."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_support import RunningServer, make_model, metric, running_server

pytest.importorskip("schemathesis")

TOKEN = "s3cret"
EXAMPLES = 12  # per operation and phase; the benchmark runs more
# Every check but positive_data_acceptance: schema-valid requests may still break rules the
# schema cannot state (a prompt longer than the context, top_logprobs without logprobs, token
# ids beyond the vocabulary); they answer a documented 400.
CHECKS = "all"
EXCLUDED = "positive_data_acceptance"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("openapi")
    model_dir = make_model(folder / "out" / "model")
    token = folder / "token"
    token.write_text(TOKEN)
    with running_server(
        model_dir, max_new_tokens=8, max_concurrency=32, auth_token_file=token
    ) as running:
        yield running


@pytest.fixture(scope="module")
def document(server: RunningServer) -> dict[str, Any]:
    reply = httpx.get(server.url + "/openapi.json")
    assert reply.status_code == 200
    found: dict[str, Any] = reply.json()
    return found


def schema_of(document: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = document["components"]["schemas"][name]
    return found


def test_the_document_lists_what_the_server_answers(document: dict[str, Any]) -> None:
    text = json.dumps(document)
    assert '"422"' not in text and "HTTPValidationError" not in text
    for path in ("/v1/completions", "/v1/chat/completions"):
        operation = document["paths"][path]["post"]
        assert set(operation["responses"]) == {"200", "400", "401", "404", "413", "429", "500",
                                               "503"}  # fmt: skip
        assert set(operation["responses"]["200"]["content"]) == {
            "application/json",
            "text/event-stream",
        }
        assert "Retry-After" in operation["responses"]["429"]["headers"]
        assert operation["security"] == [{"bearer": []}]
    assert set(document["paths"]["/v1/models/{model}"]["get"]["responses"]) == {
        "200", "401", "404", "503",
    }  # fmt: skip
    assert document["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}
    }
    assert "security" not in document["paths"]["/healthz"]["get"]  # probes need no token


def test_the_request_schemas_are_the_validating_models(document: dict[str, Any]) -> None:
    completion = schema_of(document, "CompletionRequest")
    assert completion["additionalProperties"] is False
    properties = completion["properties"]
    n = next(s for s in properties["n"]["anyOf"] if s.get("type") == "integer")
    assert n["maximum"] == 16
    assert properties["suffix"]["type"] == "null"  # accepted only as null
    max_tokens = next(s for s in properties["max_tokens"]["anyOf"] if s.get("type") == "integer")
    assert max_tokens["minimum"] == 0
    logprobs = next(s for s in properties["logprobs"]["anyOf"] if s.get("type") == "integer")
    assert logprobs["maximum"] == 20
    bias = next(s for s in properties["logit_bias"]["anyOf"] if s.get("type") == "object")
    assert bias["additionalProperties"] is False
    chat = schema_of(document, "ChatCompletionRequest")["properties"]
    chat_max = next(s for s in chat["max_tokens"]["anyOf"] if s.get("type") == "integer")
    assert chat_max["minimum"] == 1


def pin_model(document: dict[str, Any], name: str) -> dict[str, Any]:
    """Request bodies name the served model (otherwise nearly every case is a 404)."""
    pinned = json.loads(json.dumps(document))
    for schema in pinned["components"]["schemas"].values():
        properties = schema.get("properties", {})
        if "model" in properties and ({"prompt", "messages"} & set(properties)):
            properties["model"] = {"type": "string", "enum": [name]}
    return pinned


def test_schemathesis_finds_nothing(
    server: RunningServer, document: dict[str, Any], tmp_path: Path
) -> None:
    schema = tmp_path / "openapi.json"
    schema.write_text(json.dumps(pin_model(document, "tiny")))
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "run", str(schema),
        "--url", server.url, "--checks", CHECKS, "--exclude-checks", EXCLUDED,
        "--max-examples", str(EXAMPLES), "--seed", "1", "--mode", "all",
        "--header", f"Authorization: Bearer {TOKEN}", "--workers", "1",
        "--generation-deterministic", "--suppress-health-check", "all",
        "--request-timeout", "60", "--no-color", "--output-sanitize", "false",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=540)
    print(run.stdout[-2500:])
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or "passed" in run.stdout, run.stdout[-3000:]
    # It did exercise the server, and nothing answered 5xx.
    answered = metric(server.url, "llmops_serving_http_requests_total")
    assert answered > 100
    assert metric(server.url, "llmops_serving_http_requests_total", 'status="500"') == 0
    assert server.engine.alive
