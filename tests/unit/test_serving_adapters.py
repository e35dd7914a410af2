"""LoRA adapters by model name on a ModelDeployment: the API, how the controller resolves
each adapter (a folder, or a LoRA TrainingRun's exported adapter), and what each runtime is
given (the built-in server's env, vLLM's --lora-modules, checked against the pinned release)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError
from test_vllm import VLLM

from llmops.api.modeldeployment import ModelDeployment
from llmops.api.workload import Env
from llmops.builders import modeldeployment as build
from llmops.builders.modeldeployment import ServedAdapter
from llmops.decide.modeldeployment import resolve_adapters

pytestmark = pytest.mark.unit


def md(**spec: Any) -> ModelDeployment:
    return ModelDeployment.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "chat", "namespace": "ml", "uid": "u1", "generation": 1},
            "spec": {"model": {"uri": "pvc://models/qwen"}, **spec},
        }
    )


ADAPTERS = [
    {"name": "support", "trainingRun": {"name": "ft-support"}},
    {"name": "legal", "uri": "pvc://adapters/legal-v2"},
]


@pytest.mark.parametrize(
    ("adapters", "extra", "message"),
    [
        ([{"name": "a", "uri": "/x", "trainingRun": {"name": "r"}}], {}, "exactly one of"),
        ([{"name": "a"}], {}, "exactly one of"),
        ([{"name": "a", "uri": "/x"}, {"name": "a", "uri": "/y"}], {}, "distinct"),
        ([{"name": "chat", "uri": "/x"}], {"servedName": "chat"}, "differ from model.servedName"),
        ([{"name": "-bad", "uri": "/x"}], {}, "pattern"),
        ([{"name": "a", "uri": "s3://bucket/x"}], {}, "pattern"),
    ],
)
def test_bad_adapter_lists_are_refused(
    adapters: list[dict[str, Any]], extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        md(model={"uri": "pvc://models/qwen", **extra}, adapters=adapters)


def lora_run(phase: str, model_uri: str | None = None, rank: int = 32) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if model_uri:
        status["modelUri"] = model_uri
    return {"spec": {"adapter": {"rank": rank}}, "status": status}


def test_adapters_resolve_to_folders_and_unfinished_runs_wait() -> None:
    deployment = md(adapters=ADAPTERS)
    running = {"ft-support": lora_run("Running")}
    ready, waiting = resolve_adapters(deployment, running)
    assert ready == [ServedAdapter("legal", "pvc://adapters/legal-v2")]
    assert waiting == ["adapter support: TrainingRun 'ft-support' has not finished"]

    # A merged run's modelUri is its model/; the adapter sits beside it.
    done = {"ft-support": lora_run("Succeeded", "pvc://ft-support-checkpoints/output/model")}
    ready, waiting = resolve_adapters(deployment, done)
    assert not waiting
    assert ready[0] == ServedAdapter("support", "pvc://ft-support-checkpoints/output/adapter", 32)
    full = {"ft-support": {"spec": {}, "status": {"phase": "Succeeded", "modelUri": "x"}}}
    assert "has no spec.adapter" in resolve_adapters(deployment, full)[1][0]
    assert "not found" in resolve_adapters(deployment, {"ft-support": None})[1][0]


def served(deployment: ModelDeployment, adapters: list[ServedAdapter]) -> dict[str, Any]:
    body = deployment.to_dict() | {"metadata": {"name": "chat", "namespace": "ml", "uid": "u"}}
    manifest = build.deployment(body, deployment, 1, "pvc://models/qwen", adapters)
    return dict(manifest["spec"]["template"]["spec"])


READY = [
    ServedAdapter("support", "pvc://ft-support-checkpoints/output/adapter", 32),
    ServedAdapter("legal", "pvc://adapters/legal-v2"),
]


def test_the_builtin_server_gets_each_adapter_mounted_read_only_by_name() -> None:
    pod = served(md(adapters=ADAPTERS), READY)
    (server,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert json.loads(env[Env.ADAPTERS]) == ["support", "legal"]
    assert env[f"{Env.ADAPTER_PATH}0"] == "/adapters/0/output/adapter"
    assert env[f"{Env.ADAPTER_PATH}1"] == "/adapters/1/legal-v2"
    claims = {
        v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "adapter" in v["name"]
    }
    assert claims == {
        "adapter-0": {"claimName": "ft-support-checkpoints", "readOnly": True},
        "adapter-1": {"claimName": "adapters", "readOnly": True},
    }
    mounts = [m for m in server["volumeMounts"] if m["name"].startswith("adapter-")]
    assert all(m["readOnly"] for m in mounts) and len(mounts) == 2


def test_vllm_serves_the_adapters_with_lora_modules_the_pinned_release_accepts() -> None:
    deployment = md(adapters=ADAPTERS, runtime="vllm", resources={"gpus": 1})
    (server,) = served(deployment, READY)["containers"]
    args = server["args"]
    start = args.index("--lora-modules")
    assert args[start + 1 :] == [
        "support=/adapters/0/output/adapter",
        "legal=/adapters/1/legal-v2",
    ]
    assert args[args.index("--max-loras") + 1] == "2"
    # The run's rank 32 is known; the folder's is not, so room for the default 64.
    assert args[args.index("--max-lora-rank") + 1] == "64"
    only_runs = served(deployment, READY[:1])["containers"][0]["args"]
    assert only_runs[only_runs.index("--max-lora-rank") + 1] == "32"
    flags = {a for a in args if a.startswith("--")}
    assert flags <= VLLM.flags, sorted(flags - VLLM.flags)


def test_no_adapters_changes_nothing() -> None:
    (server,) = served(md(), [])["containers"]
    assert Env.ADAPTERS not in {e["name"] for e in server["env"]}


def test_the_server_reads_the_adapters_the_pod_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from llmops_trainer.serve.settings import ServeSettings

    (server,) = served(md(adapters=ADAPTERS), READY)["containers"]
    for entry in server["env"]:
        if entry["name"].startswith(("LLMOPS_ADAPTER", Env.ADAPTERS)):
            monkeypatch.setenv(entry["name"], entry["value"])
    settings = ServeSettings.from_deployment(md(adapters=ADAPTERS), Path("/model"))
    assert settings.adapters == [
        ("support", Path("/adapters/0/output/adapter")),
        ("legal", Path("/adapters/1/legal-v2")),
    ]


def test_an_s3_model_is_fetched_by_the_initializer_with_the_buckets_credentials() -> None:
    from llmops.api.common import S3Location
    from llmops.api.workload import model_init_command

    bucket = S3Location(
        bucket="checkpoints", endpoint="http://minio:9000", credentialsSecret={"name": "s3"}
    )
    deployment = md(model={"uri": "s3://checkpoints/gpt/step-100"})
    body = deployment.to_dict() | {"metadata": {"name": "chat", "namespace": "ml", "uid": "u"}}
    manifest = build.deployment(body, deployment, 1, "s3://checkpoints/gpt/step-100", (), bucket)
    pod = manifest["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == model_init_command(any_model=True)
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in init["env"]}
    assert env[Env.PRETRAINED_URI] == "s3://checkpoints/gpt/step-100"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    (server,) = pod["containers"]
    served = {e["name"]: e.get("value") for e in server["env"]}
    assert served[Env.MODEL_DIR] == env[Env.PRETRAINED_DIR] == build.SCRATCH_MODEL_DIR
    assert "AWS_SECRET_ACCESS_KEY" not in served
