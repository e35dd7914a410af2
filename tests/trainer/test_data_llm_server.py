"""Pseudo-labelling and augmentation with a language model, against the project's own server
serving a tiny model: a Dataset slice asks it (chat and completions), keeps what it was
confident of, writes synthetic records the merge reports, and a rerun asks nothing twice; a
server refusing the key fails the slice with a report naming the endpoint and status."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from serve_support import make_model, metric, running_server

from llmops.api.dataset import Dataset
from llmops.api.workload import LLM_ENDPOINT_FAILED, FailureReport
from llmops.decide.dataset import failure_of
from llmops_trainer.data import run_local
from llmops_trainer.data.__main__ import main
from llmops_trainer.data.llm_endpoint import Cache
from llmops_trainer.data.slice_stage import slice_dir

PROMPTS = [f"the fox {i} jumps" for i in range(10)]
TEXTS = [f"wizards hum {i} songs" for i in range(5)]
POSTS = 'method="POST"'


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("llm") / "model", scale=4.0, context_length=256)


def _dataset(folder: Path, url: str, min_mean_logprob: float) -> Dataset:
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    texts = folder / "texts.txt"
    texts.write_text("\n\n".join(TEXTS))
    endpoint: dict[str, Any] = {"url": url, "model": "tiny", "concurrency": 4, "maxRetries": 1}
    return Dataset.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "synthetic"},
            "spec": {
                "sources": [
                    {
                        "name": "questions",
                        "path": str(prompts),
                        "format": "jsonl",
                        "textField": "prompt",
                        "pseudoLabel": {
                            "endpoint": {**endpoint, "api": "completions"},
                            "minMeanLogprob": min_mean_logprob,
                            "maxTokens": 8,
                        },
                    },
                    {"name": "docs", "path": str(texts)},
                ],
                "processing": {
                    "filters": {"quality": False, "repetition": False},
                    "deduplication": {"near": {"enabled": False}},
                    "augmentation": {
                        "llm": {
                            "endpoint": endpoint,
                            "paraphrases": {
                                "count": 2,
                                "maxTokens": 8,
                                "promptTemplate": "again: {text}",
                            },
                            "questionAnswer": {
                                "count": 1,
                                "maxTokens": 8,
                                "questionTemplate": "ask: {text}",
                                "answerTemplate": "{text} q: {question} a:",
                            },
                        }
                    },
                },
                "tokenizer": {"byte": {}},
                "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
            },
        }
    )


def test_pseudo_labels_and_augments_with_the_projects_server(tmp_path: Path, model: Path) -> None:
    with running_server(model, served_name="tiny", max_new_tokens=8) as server:
        out = tmp_path / "out"
        manifest = run_local(_dataset(tmp_path, f"{server.url}/v1", -100.0), out)
        posts = metric(server.url, "llmops_serving_http_requests_total", POSTS)
        records = [
            json.loads(line)
            for line in (slice_dir(out / ".work", 0) / "docs.jsonl").read_text().splitlines()
        ]
        labelled = [r for r in records if r.get("s") == "pseudo-label"]
        steps = {s["name"]: s for s in manifest.stats["steps"]}
        counts = steps["pseudo-label"]["pseudoLabel"]
        assert counts["asked"] == counts["answered"] == len(PROMPTS)
        assert counts.get("kept", 0) == len(labelled) > 0  # the threshold keeps every answer
        assert all(r["r"] and r["lp"] <= 0 for r in labelled)
        made = manifest.stats["synthetic"]
        assert made["pseudoLabelled"] == len(labelled)
        assert made["paraphrases"] + made["questionAnswer"] > 0
        assert manifest.stats["syntheticDocuments"] == sum(made.values())
        asked = len(labelled) + len(TEXTS)
        augment = steps["augment"]["synthetic"]["requests"]
        # 2 paraphrases and a question per document, an answer per (non-empty) question
        assert asked * 3 <= augment["asked"] <= asked * 4
        assert posts == counts["answered"] + augment["answered"]
        assert manifest.supervised and manifest.mixed

        # A retried slice (its folder gone) and a stricter threshold ask nothing again.
        (slice_dir(out / ".work", 0) / "DONE").unlink()
        run_local(_dataset(tmp_path, f"{server.url}/v1", -100.0), out)
        median = statistics.median(r["lp"] for r in labelled)
        stricter = run_local(_dataset(tmp_path, f"{server.url}/v1", median), out)
        assert metric(server.url, "llmops_serving_http_requests_total", POSTS) == posts
        kept = {s["name"]: s for s in stricter.stats["steps"]}["pseudo-label"]
        assert kept["pseudoLabel"]["cached"] == len(PROMPTS)
        assert 0 < stricter.stats["synthetic"]["pseudoLabelled"] < len(PROMPTS)
        assert sum(kept["dropped"].values()) > 0


def test_a_refused_key_fails_the_slice_naming_the_endpoint(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("right-key")
    with running_server(model, served_name="tiny", auth_token_file=token) as server:
        url = f"{server.url}/v1"
        config = tmp_path / "dataset.json"
        config.write_text(json.dumps(_dataset(tmp_path, url, -100.0).to_dict()))
        termination = tmp_path / "termination-log"
        monkeypatch.setenv("LLMOPS_OUTPUT_DIR", str(tmp_path / "out"))
        monkeypatch.setenv("LLMOPS_TERMINATION_LOG", str(termination))
        monkeypatch.setenv("LLMOPS_LLM_0_API_KEY", "wrong-key")  # pseudo-labelling's
        assert main(["--config", str(config), "--stage", "slice"]) == 1
        report = FailureReport.model_validate_json(termination.read_text())
        assert report.reason == LLM_ENDPOINT_FAILED
        assert f"endpoint {url}/completions answered HTTP 401" in report.message
        assert "wrong-key" not in report.message
        pod = {
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {"state": {"terminated": {"exitCode": 1, "message": termination.read_text()}}}
                ],
            }
        }
        reason, message = failure_of([pod], "SliceFailed", "")
        assert reason == LLM_ENDPOINT_FAILED and "HTTP 401" in message and url in message

        # With the right key the retried slice finishes.
        monkeypatch.setenv("LLMOPS_LLM_0_API_KEY", "right-key")
        monkeypatch.setenv("LLMOPS_LLM_1_API_KEY", "right-key")
        assert main(["--config", str(config), "--stage", "slice"]) == 0
        assert len(Cache(tmp_path / "out" / ".work" / "llm-cache")) > 0
