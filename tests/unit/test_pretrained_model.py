"""Open-weights models in the API, the worker pods and the decision: which sources are
accepted, how the initializer is wired, and what a failed initializer does to the run."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError
from test_decide_trainingrun import condition, decided, job, pod, run_body

from llmops.api.trainingrun import TrainingRun
from llmops.api.workload import (
    MODEL_INIT_STAGE,
    Env,
    FailureReport,
    model_init_command,
)
from llmops.builders import trainingrun as build

pytestmark = pytest.mark.unit

SHA = "0" * 64


def run(**spec: Any) -> TrainingRun:
    return TrainingRun.model_validate(run_body(**spec))


def pretrained(uri: str, **fields: Any) -> dict[str, Any]:
    return {"pretrained": {"uri": uri, **fields}}


@pytest.mark.parametrize(
    "uri",
    [
        "/models/llama",
        "pvc://models/llama-3.2-1b",
        "s3://weights/qwen2.5/0.5b",
        "hf://Qwen/Qwen2.5-0.5B-Instruct",
        "hf://meta-llama/Llama-3.2-1B@main",
        "hf://mistralai/Mistral-7B-v0.3@0417f4babd26db0b5ed07c1d0bc85658ab526ea3",
    ],
)
def test_model_sources_accepted(uri: str) -> None:
    assert run(model=pretrained(uri)).spec.model.pretrained is not None


@pytest.mark.parametrize(
    ("model", "spec", "message"),
    [
        (pretrained("ftp://host/model"), {}, "String should match pattern"),
        (pretrained("hf://just-a-name"), {}, "String should match pattern"),
        (pretrained("https://example.com/m"), {}, "lists its files with their sha256"),
        (
            pretrained("s3://bucket/m", files=[{"name": "config.json", "sha256": SHA}]),
            {},
            "files applies only",
        ),
        (pretrained("/m", endpoint="http://mirror"), {}, "endpoint applies to"),
        ({"objective": "masked-lm", **pretrained("/m")}, {}, "masked-lm trains the built-in"),
        ({"architecture": "llama", **pretrained("/m")}, {}, "brings its own architecture"),
        ({"numKeyValueHeads": 2}, {}, "apply to architecture llama"),
        ({"architecture": "llama", "bias": False}, {}, "bias and activation shape a gpt"),
        ({"activation": "gelu", **pretrained("/m")}, {}, "bias and activation shape a gpt"),
        ({"activation": "relu"}, {}, "'gelu-tanh' or 'gelu'"),
        ({"architecture": "llama", "numHeads": 6, "numKeyValueHeads": 4}, {}, "multiple of"),
        ({}, {"adapter": {"rank": 8}}, "set model.pretrained"),
        (
            pretrained("/m"),
            {"adapter": {"quantization": "4bit"}},
            "needs GPUs",
        ),
        (pretrained("/m"), {"init": {"path": "/ckpt"}}, "at most one of model.pretrained"),
    ],
)
def test_bad_model_specs_are_refused_naming_the_problem(
    model: dict[str, Any], spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        run(model=model, **spec)


def worker_pod(body: dict[str, Any]) -> dict[str, Any]:
    training = TrainingRun.model_validate(body)
    pod_spec: dict[str, Any] = build.worker_job(body, training, 0, "pvc://corpus/g1")["spec"][
        "template"
    ]["spec"]
    return pod_spec


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_a_hub_model_is_fetched_once_onto_the_checkpoint_volume() -> None:
    body = run_body(
        model=pretrained(
            "hf://Qwen/Qwen2.5-0.5B@main",
            credentialsSecret={"name": "hub"},
            endpoint="https://hub-mirror.internal",
        )
    )
    pod_spec = worker_pod(body)
    (init,) = pod_spec["initContainers"]
    assert init["name"] == "model-init" and init["command"] == model_init_command()
    env = env_of(init)
    assert env[Env.PRETRAINED_URI] == "hf://Qwen/Qwen2.5-0.5B@main"
    assert env[Env.PRETRAINED_DIR] == "/checkpoints/pretrained"
    assert env[Env.PRETRAINED_SHARED] == "1"  # pod 0 downloads; the others wait for it
    assert env["HF_ENDPOINT"] == "https://hub-mirror.internal"
    # The token is referenced, never copied into the pod spec.
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hub", "key": "HF_TOKEN"}}
    assert "/checkpoints" in {m["mountPath"] for m in init["volumeMounts"]}
    trainer = pod_spec["containers"][0]
    assert env_of(trainer)[Env.PRETRAINED_DIR] == "/checkpoints/pretrained"
    assert "HF_TOKEN" not in env_of(trainer)
    assert init["securityContext"]["readOnlyRootFilesystem"] is True


def test_s3_credentials_are_referenced_and_https_files_are_listed() -> None:
    s3 = env_of(
        worker_pod(
            run_body(
                model=pretrained(
                    "s3://weights/llama",
                    credentialsSecret={"name": "s3"},
                    endpoint="http://minio:9000",
                )
            )
        )["initContainers"][0]
    )
    assert s3["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert s3["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    files = [{"name": "config.json", "sha256": SHA}]
    https = env_of(
        worker_pod(run_body(model=pretrained("https://models.example/tiny", files=files)))[
            "initContainers"
        ][0]
    )
    assert json.loads(https[Env.PRETRAINED_FILES]) == files


def test_a_model_on_a_claim_is_mounted_read_only_and_only_verified() -> None:
    pod_spec = worker_pod(run_body(model=pretrained("pvc://models/llama-3")))
    volume = next(v for v in pod_spec["volumes"] if v["name"] == "pretrained")
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    trainer = pod_spec["containers"][0]
    assert env_of(trainer)[Env.PRETRAINED_DIR] == "/pretrained/llama-3"
    mounts = {m["mountPath"]: m for m in trainer["volumeMounts"]}
    assert mounts["/pretrained"]["readOnly"] is True
    assert env_of(pod_spec["initContainers"][0])[Env.PRETRAINED_DIR] == "/pretrained/llama-3"


def test_without_a_checkpoint_volume_each_pod_fetches_into_scratch() -> None:
    body = run_body(
        model=pretrained("hf://org/model"),
        checkpointing={"storage": {"s3": {"bucket": "ckpts"}}},
    )
    env = env_of(worker_pod(body)["initContainers"][0])
    assert env[Env.PRETRAINED_DIR] == build.SCRATCH_PRETRAINED_DIR
    assert env[Env.PRETRAINED_SHARED] == "0"


def test_the_built_in_model_has_no_initializer() -> None:
    assert "initContainers" not in worker_pod(run_body())


def init_failed(reason: str, message: str) -> dict[str, Any]:
    report = FailureReport(stage=MODEL_INIT_STAGE, reason=reason, message=message)
    terminated = {"exitCode": 1, "message": json.dumps(report.to_dict())}
    return pod(
        0,
        "Failed",
        initContainerStatuses=[{"name": "model-init", "state": {"terminated": terminated}}],
    )


def test_a_bad_model_source_fails_the_run_with_the_initializers_reason() -> None:
    failed = job({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"})
    body = run_body(model=pretrained("hf://org/model"))
    bad = init_failed("ChecksumMismatch", "model.safetensors: expected 00.., got ab..")
    decision = decided(body, job=failed, pods=[bad, pod(1)])
    assert decision.status.phase == "Failed" and not decision.restarted
    assert condition(decision, "Failed") == ("True", "ChecksumMismatch")
    assert "model.safetensors" in next(
        c.message for c in decision.status.conditions if c.type == "Failed"
    )
    # A network failure is worth a restart.
    flaky = decided(body, job=failed, pods=[init_failed("ModelFetchFailed", "timed out")])
    assert flaky.restarted and flaky.status.restart_count == 1


def deployment(**spec: Any) -> Any:
    from llmops.api.modeldeployment import ModelDeployment

    return ModelDeployment.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "chat"},
            "spec": {"model": {"trainingRun": {"name": "ft"}}, **spec},
        }
    )


def test_a_transformers_run_is_served_only_once_exported() -> None:
    from llmops.decide.modeldeployment import resolve_model

    training = {
        "spec": {"model": {"pretrained": {"uri": "/m"}}},
        "status": {
            "phase": "Running",
            "checkpoints": {"latest": {"name": "step-20", "uri": "pvc://ft-checkpoints/step-20"}},
        },
    }
    uri, why = resolve_model(deployment(), "ft", "latest", training)
    assert uri is None and "not exported its final model" in why
    training["status"] = {"phase": "Succeeded", "modelUri": "pvc://ft-checkpoints/output/model"}
    assert resolve_model(deployment(), "ft", "latest", training)[0] == (
        "pvc://ft-checkpoints/output/model"
    )
    # The built-in GPT's checkpoints stay servable while it trains.
    gpt = {"spec": {"model": {}}, "status": {"checkpoints": {"latest": {"uri": "pvc://c/step-5"}}}}
    assert resolve_model(deployment(), "ft", "latest", gpt)[0] == "pvc://c/step-5"
