"""Language models in the data engine: the API rules, the endpoint client (cache keys, rate
limit, backoff, errors), pseudo-labelling's confidence filter and the synthetic records, the
operator's side (env, ModelDeployment references, the failure condition), against a
loopback stand-in for an OpenAI-compatible endpoint (fake_openai)."""

from __future__ import annotations

import email.message
import json
import urllib.error
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from fake_openai import fake_endpoint
from pydantic import ValidationError

from llmops.api.dataset import (
    Augmentation,
    Dataset,
    DataSource,
    LlmEndpoint,
    Paraphrases,
    QuestionAnswer,
)
from llmops.api.workload import LLM_ENDPOINT_FAILED, FailureReport, llm_endpoint_env
from llmops.builders import dataset as build
from llmops.decide.dataset import failure_of, served_models, wait_for_models
from llmops.decide.status import StatusDraft
from llmops.local.resources import order
from llmops_trainer.data import collect, run_local
from llmops_trainer.data.__main__ import main
from llmops_trainer.data.llm_endpoint import (
    Ask,
    Cache,
    Client,
    EndpointError,
    RateLimiter,
    Target,
    cache_key,
    render,
    resolve,
    retry_delay,
)
from llmops_trainer.data.slice_stage import slice_dir

PROMPTS = [f"Question number {i}: what is the colour of the sky at noon?" for i in range(8)]
TEXTS = [
    f"Document {i} says that the sky is blue because air scatters blue light." for i in range(4)
]


# -- API --------------------------------------------------------------------------------------


def test_an_endpoint_is_a_deployment_or_a_url_with_a_model() -> None:
    LlmEndpoint.model_validate({"modelDeployment": {"name": "chat"}})
    LlmEndpoint.model_validate({"url": "https://api.example.com/v1", "model": "m"})
    with pytest.raises(ValidationError, match="exactly one of modelDeployment or url"):
        LlmEndpoint.model_validate({"modelDeployment": {"name": "a"}, "url": "http://x/v1"})
    with pytest.raises(ValidationError, match=r"model \(the served model name\) is needed"):
        LlmEndpoint.model_validate({"url": "https://api.example.com/v1"})
    with pytest.raises(ValidationError):
        LlmEndpoint.model_validate({"url": "ftp://x", "model": "m"})


def test_templates_need_their_placeholders() -> None:
    with pytest.raises(ValidationError, match=r"promptTemplate must contain \{text\}"):
        Paraphrases.model_validate({"promptTemplate": "Rewrite this."})
    with pytest.raises(ValidationError, match=r"answerTemplate must contain \{question\}"):
        QuestionAnswer.model_validate({"answerTemplate": "{text}"})
    endpoint = {"url": "http://x/v1", "model": "m"}
    with pytest.raises(ValidationError, match="needs paraphrases or questionAnswer"):
        Augmentation.model_validate({"llm": {"endpoint": endpoint}})


def test_a_pseudo_label_source_reads_prompts_only() -> None:
    label = {"endpoint": {"modelDeployment": {"name": "m"}}}
    source = DataSource.model_validate(
        {"name": "q", "path": "p", "format": "jsonl", "textField": "prompt", "pseudoLabel": label}
    )
    assert source.supervised
    assert source.pseudo_label is not None and source.pseudo_label.temperature == 0.0
    with pytest.raises(ValidationError, match="pseudoLabel reads prompts from textField"):
        DataSource.model_validate(
            {
                "name": "q",
                "path": "p",
                "format": "jsonl",
                "promptField": "a",
                "responseField": "b",
                "pseudoLabel": label,
            }
        )


def _dataset(tmp_path: Path, spec: dict[str, Any], **extra: Any) -> Dataset:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    sources = [
        {
            "name": "questions",
            "path": str(prompts),
            "format": "jsonl",
            "textField": "prompt",
            "pseudoLabel": {"endpoint": spec["endpoint"], "minMeanLogprob": -1.0},
        },
        {"name": "docs", "path": str(texts), "format": "jsonl"},
    ]
    processing = {
        "filters": {"quality": False, "repetition": False},
        "deduplication": {"near": {"enabled": False}},
        "augmentation": {
            "llm": {
                "endpoint": spec["endpoint"],
                "paraphrases": {"count": 2},
                "questionAnswer": {"count": 1},
            }
        },
    }
    return Dataset.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "synthetic", "namespace": "ns"},
            "spec": {
                "sources": sources,
                "processing": processing,
                "tokenizer": {"byte": {}},
                "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
                **extra,
            },
        }
    )


def test_the_endpoints_are_numbered_sources_first(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, {"endpoint": {"modelDeployment": {"name": "chat"}}})
    assert [what for what, _ in dataset.spec.llm_endpoints()] == [
        "spec.sources[questions].pseudoLabel.endpoint",
        "spec.processing.augmentation.llm.endpoint",
    ]


# -- the client ------------------------------------------------------------------------------


def _target(url: str = "http://127.0.0.1:9/v1", **extra: Any) -> Target:
    return Target(url=url, model="m", api="chat", api_key=None, **extra)


def test_cache_keys_follow_what_is_asked_not_where() -> None:
    ask = Ask("Rewrite: hello", 0.7, 64)
    key = cache_key(_target(), "Rewrite: {text}", ask)
    assert key == cache_key(_target("https://elsewhere/v1", concurrency=9), "Rewrite: {text}", ask)
    different = [
        cache_key(_target(), "Say: {text}", ask),
        cache_key(_target(), "Rewrite: {text}", Ask("Rewrite: bye", 0.7, 64)),
        cache_key(_target(), "Rewrite: {text}", Ask("Rewrite: hello", 0.8, 64)),
        cache_key(_target(), "Rewrite: {text}", Ask("Rewrite: hello", 0.7, 65)),
        cache_key(_target(), "Rewrite: {text}", Ask("Rewrite: hello", 0.7, 64, sample=1)),
        cache_key(Target("http://x/v1", "other", "chat", None), "Rewrite: {text}", ask),
    ]
    assert len({key, *different}) == 1 + len(different)


def test_the_cache_writes_whole_files(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    assert cache.get("ab" * 32) is None
    cache.put("ab" * 32, {"choices": [1]})
    assert cache.get("ab" * 32) == {"choices": [1]}
    assert len(cache) == 1 and not list((tmp_path / "c").rglob("*.tmp"))


def test_render_replaces_placeholders_once() -> None:
    assert render("{text} / {question} {other}", text="a {question}", question="q") == (
        "a {question} / q {other}"
    )


def test_the_rate_limiter_spaces_requests() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(2.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        limiter.acquire()
    assert slept == [0.5, 0.5, 0.5, 0.5] and now[0] == 102.0  # 5 requests in 2 s: 2 per s
    now[0] += 10  # idle: the bucket refills to its burst of 1, not 20
    slept.clear()
    limiter.acquire()
    limiter.acquire()
    assert slept == [0.5]
    assert RateLimiter(None, sleep=sleep).acquire() == 0.0


def _http_error(status: int, headers: dict[str, str] | None = None) -> urllib.error.HTTPError:
    message = email.message.Message()
    for key, value in (headers or {}).items():
        message[key] = value
    return urllib.error.HTTPError("http://x", status, "failing", message, None)


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    assert [retry_delay(t, None, rng=lambda: 1.0) for t in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert [retry_delay(t, None, rng=lambda: 0.0) for t in range(3)] == [0.25, 0.5, 1.0]
    assert retry_delay(30, None, rng=lambda: 1.0) == 30.0  # capped
    assert retry_delay(0, _http_error(429, {"Retry-After": "7"})) == 7.0
    later = formatdate(timeval=__import__("time").time() + 60, usegmt=True)
    assert 55 < retry_delay(0, _http_error(503, {"Retry-After": later})) <= 60


def test_with_retries_retries_what_may_pass_and_keeps_the_cause() -> None:
    slept: list[float] = []
    answers: list[Any] = [_http_error(503), _http_error(429), "ok"]

    def attempt() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    assert collect.with_retries("u", attempt, sleep=slept.append) == "ok"
    assert slept == [0.2, 0.4]
    with pytest.raises(urllib.error.HTTPError):  # an answer: not retried
        collect.with_retries("u", lambda: (_ for _ in ()).throw(_http_error(401)))
    with pytest.raises(OSError, match="giving up after 2 attempts") as failed:
        collect.with_retries(
            "u", lambda: (_ for _ in ()).throw(_http_error(500)), attempts=2, sleep=slept.append
        )
    assert isinstance(failed.value.__cause__, urllib.error.HTTPError)


def test_a_client_retries_then_names_the_endpoint_and_status(tmp_path: Path) -> None:
    tries: dict[str, int] = {}

    def fail(prompt: str) -> tuple[int, dict[str, str]] | None:
        tries[prompt] = tries.get(prompt, 0) + 1
        if prompt == "busy" and tries[prompt] == 1:
            return 429, {"Retry-After": "0"}
        return (500, {}) if prompt == "broken" else None

    with fake_endpoint(fail=fail, token="sesame") as fake:
        slept: list[float] = []
        target = Target(fake.url, "m", "completions", "sesame", max_retries=2)
        client = Client(target, Cache(tmp_path / "c"), sleep=slept.append)
        answer = client.ask("{text}", Ask("busy", 0.0, 8))
        assert answer.text.startswith("about: busy") and not answer.cached
        assert slept == [0.0]  # Retry-After: 0
        with pytest.raises(EndpointError, match=r"completions answered HTTP 500") as failed:
            client.ask("{text}", Ask("broken", 0.0, 8))
        assert failed.value.status == 500 and tries["broken"] == 3
        assert "sesame" not in str(failed.value)
        wrong = Client(Target(fake.url, "m", "chat", "wrong"), Cache(tmp_path / "d"))
        with pytest.raises(EndpointError, match=r"/v1/chat/completions answered HTTP 401"):
            wrong.ask("{text}", Ask("hello", 0.0, 8))
        assert client.ask("{text}", Ask("busy", 0.0, 8)).cached
        assert client.counts["cached"] == 1 and client.counts["answered"] == 1
    unreachable = Client(_target(max_retries=0), Cache(tmp_path / "e"))
    with pytest.raises(EndpointError, match="did not answer"):
        unreachable.ask("{text}", Ask("x", 0.0, 8))


def test_a_request_refused_for_what_it_asks_skips_its_document(tmp_path: Path) -> None:
    """A 400 for one prompt (too long for the model) leaves that document without an answer
    and the slice goes on; a 400 for most prompts says the configuration is wrong and fails."""

    def fail(prompt: str) -> tuple[int, dict[str, str]] | None:
        return (400, {}) if "TOO LONG" in prompt else None

    with fake_endpoint(fail=fail) as fake:
        client = Client(Target(fake.url, "m", "chat", None), Cache(tmp_path / "c"))
        asks = [Ask(f"doc {i}" + (" TOO LONG" if i == 7 else ""), 0.0, 8) for i in range(40)]
        answers = client.ask_all("{text}", asks)
        assert [i for i, a in enumerate(answers) if a.refused] == [7]
        assert answers[7].text == "" and "answered HTTP 400" in (answers[7].refused or "")
        assert client.counts["refused"] == 1 and client.counts["answered"] == 39
        assert sum("TOO LONG" in p for p in fake.prompts()) == 1  # a 400 is not retried

        strict = Client(Target(fake.url, "m", "chat", None), Cache(tmp_path / "d"))
        bad = [Ask(f"x {i} TOO LONG", 0.0, 8) for i in range(6)]
        with pytest.raises(EndpointError, match=r"requests refused \(more than 10%\)"):
            strict.ask_all("{text}", bad)


def test_resolve_reads_what_the_operator_resolved() -> None:
    endpoint = LlmEndpoint.model_validate({"modelDeployment": {"name": "chat"}})
    names = llm_endpoint_env(1)
    target = resolve(
        endpoint, 1, {names.url: "http://chat.ns.svc:8000/v1", names.model: "c", names.api_key: "k"}
    )
    assert (target.url, target.model, target.api_key) == ("http://chat.ns.svc:8000/v1", "c", "k")
    with pytest.raises(ValueError, match="LLMOPS_LLM_1_URL is unset"):
        resolve(endpoint, 1, {})


# -- the engine ------------------------------------------------------------------------------


def _confidence(prompt: str) -> tuple[str, list[float]]:
    """Confident on even question numbers, unsure on odd ones."""
    number = int(prompt.split("number ")[1].split(":")[0]) if "number " in prompt else 0
    return f"The sky is blue ({number}).", [-0.1, -0.3] if number % 2 == 0 else [-2.0, -3.0]


def _records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "docs.jsonl").read_text().splitlines()]


def test_pseudo_labels_and_synthetic_records(tmp_path: Path) -> None:
    with fake_endpoint(reply=_confidence) as fake:
        endpoint = {"url": fake.url, "model": "m", "api": "completions", "concurrency": 3}
        dataset = _dataset(tmp_path, {"endpoint": endpoint})
        manifest = run_local(dataset, tmp_path / "out")
        asked = len(fake.requests)
        # 8 prompts; 4 docs + 4 kept pairs: 2 paraphrases, 1 question, 1 answer each
        assert asked == 8 + 8 * 4
        records = _records(slice_dir(tmp_path / "out" / ".work", 0))
        labelled = [r for r in records if r.get("s") == "pseudo-label"]
        assert len(labelled) == 4 and all(r["lp"] == -0.2 for r in labelled)
        assert all(r["r"].startswith("The sky is blue") for r in labelled)
        docs = [r for r in records if "s" not in r]
        assert all(len(r["g"]) == 3 for r in docs + labelled)
        paraphrase = next(g for g in docs[0]["g"] if g["k"] == "paraphrase")
        assert "r" not in paraphrase  # a plain document's paraphrase stays plain text
        qa = next(g for g in labelled[0]["g"] if g["k"] == "question-answer")
        assert set(qa) == {"t", "r", "k"}

        stats = manifest.stats
        steps = {s["name"]: s for s in stats["steps"]}
        label = steps["pseudo-label"]
        assert label["dropped"] == {"low-confidence": 4}
        assert label["pseudoLabel"] == {"asked": 8, "answered": 8, "kept": 4, "dropped": 4}
        assert steps["augment"]["synthetic"]["paraphrases"] == 16
        assert steps["augment"]["synthetic"]["questionAnswer"] == 8
        assert stats["synthetic"] == {"pseudoLabelled": 4, "paraphrases": 16, "questionAnswer": 8}
        assert stats["syntheticDocuments"] == 28 and stats["documents"] == 8
        assert manifest.supervised and manifest.mixed
        card = (tmp_path / "out" / "README.md").read_text()
        assert "8. Synthetic data (written by language models)" in card
        assert "28 synthetic documents" in card and "pseudo-labelled" in card

        run_local(dataset, tmp_path / "out")  # done: skipped
        assert len(fake.requests) == asked
        # A stricter threshold reruns the slice: every answer comes from the cache.
        stricter = _dataset(tmp_path, {"endpoint": endpoint})
        assert stricter.spec.sources[0].pseudo_label is not None
        stricter.spec.sources[0].pseudo_label.min_mean_logprob = -0.15
        again = run_local(stricter, tmp_path / "out")
        assert len(fake.requests) == asked
        assert again.stats["synthetic"] == {
            "pseudoLabelled": 0,
            "paraphrases": 8,
            "questionAnswer": 4,
        }
        label = {s["name"]: s for s in again.stats["steps"]}["pseudo-label"]
        assert label["pseudoLabel"] == {"asked": 8, "cached": 8, "dropped": 8}


def test_a_failing_endpoint_fails_the_slice_and_keeps_finished_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = {"on": True}

    def fail(prompt: str) -> tuple[int, dict[str, str]] | None:
        return (503, {"Retry-After": "0"}) if broken["on"] and "number 5" in prompt else None

    with fake_endpoint(fail=fail) as fake:
        endpoint = {"url": fake.url, "model": "m", "concurrency": 1, "maxRetries": 1}
        dataset = _dataset(tmp_path, {"endpoint": endpoint})
        config = tmp_path / "dataset.json"
        config.write_text(json.dumps(dataset.to_dict()))
        termination = tmp_path / "termination-log"
        monkeypatch.setenv("LLMOPS_OUTPUT_DIR", str(tmp_path / "out"))
        monkeypatch.setenv("LLMOPS_TERMINATION_LOG", str(termination))
        monkeypatch.setenv("LLMOPS_LLM_CACHE_DIR", str(tmp_path / "cache"))
        assert main(["--config", str(config), "--stage", "slice"]) == 1
        report = FailureReport.model_validate_json(termination.read_text())
        assert report.stage == "slice" and report.reason == LLM_ENDPOINT_FAILED
        assert f"endpoint {fake.url}/chat/completions answered HTTP 503" in report.message
        # Prompts 0-4 were answered (one at a time, in order) and stay cached; 5 was tried
        # twice (maxRetries 1); the worker may have started 6 before it heard, no more.
        answered = len(fake.requests) - 2
        assert len(Cache(tmp_path / "cache")) == answered and 5 <= answered <= 6

        # The Dataset's Failed condition carries the slice's report.
        pod = {
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {"state": {"terminated": {"exitCode": 1, "message": termination.read_text()}}}
                ],
            }
        }
        assert failure_of([pod], "SliceFailed", "1 failed index") == (
            LLM_ENDPOINT_FAILED,
            report.message,
        )

        broken["on"] = False  # the retried slice asks only what it has no answer for
        before = len(fake.requests)
        assert main(["--config", str(config), "--stage", "slice"]) == 0
        resent = fake.prompts()[before:]
        labelled = 8 - answered  # prompt 5 (and 6), 7: asked again; the others not
        assert not any(f"number {i}:" in p for i in range(5) for p in resent[:labelled])
        assert len(resent) == labelled + 12 * 4  # then the augmentation of 12 documents


# -- the operator's side ---------------------------------------------------------------------


def _model_deployment(name: str, port: int = 8000, token: bool = False) -> dict[str, Any]:
    server: dict[str, Any] = {"port": port}
    if token:
        server["authTokenSecret"] = {"name": "chat-token", "key": "token"}
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"model": {"uri": "pvc://models/chat", "servedName": "chat-v1"}, "server": server},
    }


def test_the_operator_resolves_a_deployment_and_passes_keys_by_reference(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, {"endpoint": {"modelDeployment": {"name": "chat"}}})
    resolved, missing = served_models(dataset, "ns", {"chat": None})
    assert missing == ["ModelDeployment 'chat' does not exist"] and not resolved
    status = StatusDraft({"metadata": {"generation": 1}, "status": {}}, "Dataset")
    wait_for_models(status, missing)
    created = next(c for c in status.status["conditions"] if c["type"] == "Created")
    assert created["reason"] == "WaitingForModelDeployment" and "'chat'" in created["message"]

    deploying = _model_deployment("chat", port=9000, token=True)
    _, missing = served_models(dataset, "ns", {"chat": deploying})
    assert missing == ["ModelDeployment 'chat' has no replica Available yet"]
    available = {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}
    found = {"chat": {**deploying, "status": {"conditions": [available]}}}
    resolved, missing = served_models(dataset, "ns", found)
    assert not missing
    assert resolved["chat"].url == "http://chat.ns.svc:9000/v1"
    body = {"apiVersion": "llmops.dev/v1alpha1", "kind": "Dataset", **dataset.to_dict()}
    body["metadata"] = {"name": "synthetic", "namespace": "ns", "uid": "u", "generation": 2}
    job = build.slices_job(body, dataset, 2, deployments=resolved)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for index in (0, 1):
        names = llm_endpoint_env(index)
        assert env[names.url]["value"] == "http://chat.ns.svc:9000/v1"
        assert env[names.model]["value"] == "chat-v1"
        assert env[names.api_key]["valueFrom"] == {
            "secretKeyRef": {"name": "chat-token", "key": "token"}
        }
    assert env["LLMOPS_LLM_CACHE_DIR"]["value"] == f"{build.OUTPUT_DIR}/.llm-cache"
    for job in (build.prepare_job(body, dataset, 2), build.tokenize_job(body, dataset, 2)):
        assert not any(
            e["name"].startswith("LLMOPS_LLM_")
            for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
        )
    with pytest.raises(ValueError, match="ModelDeployment 'chat' is not resolved"):
        build.slices_job(body, dataset, 2)


def test_a_url_endpoint_needs_only_its_key_secret(tmp_path: Path) -> None:
    endpoint = {
        "url": "https://api.example.com/v1",
        "model": "gpt",
        "apiKeySecret": {"name": "openai", "key": "api-key"},
    }
    dataset = _dataset(tmp_path, {"endpoint": endpoint})
    env = build.llm_env(dataset)
    assert {e["name"] for e in env} == {
        "LLMOPS_LLM_CACHE_DIR",
        "LLMOPS_LLM_0_API_KEY",
        "LLMOPS_LLM_1_API_KEY",
    }


def test_the_local_runtime_serves_the_deployment_first(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, {"endpoint": {"modelDeployment": {"name": "chat"}}})
    body = {"apiVersion": "llmops.dev/v1alpha1", "kind": "Dataset", **dataset.to_dict()}
    ordered = order([body, _model_deployment("chat")])
    assert [doc["kind"] for doc in ordered] == ["ModelDeployment", "Dataset"]
