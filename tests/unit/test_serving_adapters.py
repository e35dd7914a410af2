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
        ([{"name": "a", "uri": "/x", "policy": "latest"}], {}, "policy and gate follow"),
        ([{"name": "a", "uri": "/x", "gate": {}}], {}, "policy and gate follow"),
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
    found = resolve_adapters(deployment, running)
    assert found.ready == [ServedAdapter("legal", "pvc://adapters/legal-v2")]
    assert found.waiting == ["adapter support: TrainingRun 'ft-support' has not finished"]

    # A merged run's modelUri is its model/; the adapter sits beside it.
    done = {"ft-support": lora_run("Succeeded", "pvc://ft-support-checkpoints/output/model")}
    found = resolve_adapters(deployment, done)
    assert not found.waiting
    assert found.ready[0] == ServedAdapter(
        "support", "pvc://ft-support-checkpoints/output/adapter", 32, "ft-support/final"
    )
    full = {"ft-support": {"spec": {}, "status": {"phase": "Succeeded", "modelUri": "x"}}}
    assert "has no spec.adapter" in resolve_adapters(deployment, full).waiting[0]
    assert "not found" in resolve_adapters(deployment, {"ft-support": None}).waiting[0]


CHECKPOINTS = {
    "latest": {"name": "step-300", "uri": "pvc://ft-support-checkpoints/step-300"},
    "best": {"name": "step-200", "uri": "pvc://ft-support-checkpoints/step-200"},
}


def run_with(phase: str, evaluation: dict[str, Any] | None = None, **status: Any) -> Any:
    run = lora_run(
        phase, "pvc://ft-support-checkpoints/output/model" if phase == "Succeeded" else None
    )
    run["status"].update(checkpoints=CHECKPOINTS, **status)
    if evaluation is not None:
        run["status"]["finalEvaluation"] = evaluation
    return {"ft-support": run}


@pytest.mark.parametrize(
    ("policy", "phase", "source"),
    [
        ("latest", "Running", "ft-support/step-300"),
        ("best", "Running", "ft-support/step-200"),
        ("latest", "Succeeded", "ft-support/final"),
        ("best", "Succeeded", "ft-support/step-200"),
    ],
)
def test_an_adapter_follows_its_runs_latest_or_best_checkpoint(
    policy: str, phase: str, source: str
) -> None:
    deployment = md(
        adapters=[{"name": "support", "trainingRun": {"name": "ft-support"}, "policy": policy}]
    )
    (chosen,) = resolve_adapters(deployment, run_with(phase)).ready
    assert chosen.source == source
    folder = "output" if source.endswith("final") else source.split("/")[1]
    assert chosen.uri == f"pvc://ft-support-checkpoints/{folder}/adapter"


def test_a_gated_adapter_keeps_its_served_version_until_a_better_one() -> None:
    from llmops.decide.modeldeployment import report_adapters
    from llmops.decide.status import StatusDraft

    spec = {"name": "support", "trainingRun": {"name": "ft-support"}, "gate": {"metric": "loss"}}
    deployment = md(adapters=[spec])
    served = [
        {
            "name": "support",
            "source": "ft-support/final",
            "uri": "pvc://old/output/adapter",
            "rank": 32,
            "evaluation": {"loss": 1.0},
        }
    ]
    worse = resolve_adapters(deployment, run_with("Succeeded", {"loss": 1.3}), served)
    assert [a.uri for a in worse.ready] == ["pvc://old/output/adapter"]
    assert "worse than the served model's" in worse.held[0]
    status = StatusDraft(deployment.to_dict(), "ModelDeployment")
    report_adapters(status, deployment, worse)
    (condition,) = [c for c in status.status["conditions"] if c["type"] == "AdaptersReady"]
    assert condition["reason"] == "HeldBackByGate" and condition["status"] == "True"
    assert status.status["servedAdapters"][0]["evaluation"] == {"loss": 1.0}

    better = resolve_adapters(deployment, run_with("Succeeded", {"loss": 0.9}), served)
    assert [a.uri for a in better.ready] == ["pvc://ft-support-checkpoints/output/adapter"]
    assert not better.held and better.evaluations["support"] == {"loss": 0.9}
    # A run that went away: the served version stays.
    gone = resolve_adapters(deployment, {"ft-support": None}, served)
    assert [a.uri for a in gone.ready] == ["pvc://old/output/adapter"] and not gone.waiting


def served(deployment: ModelDeployment, adapters: list[ServedAdapter]) -> dict[str, Any]:
    body = deployment.to_dict() | {"metadata": {"name": "chat", "namespace": "ml", "uid": "u"}}
    manifest = build.deployment(body, deployment, 1, "pvc://models/qwen", adapters)
    return dict(manifest["spec"]["template"]["spec"])


READY = [
    ServedAdapter("support", "pvc://ft-support-checkpoints/output/adapter", 32),
    ServedAdapter("legal", "pvc://adapters/legal-v2"),
]


def adapter_entries(deployment: ModelDeployment, adapters: list[ServedAdapter]) -> Any:
    body = deployment.to_dict() | {"metadata": {"name": "chat", "namespace": "ml", "uid": "u"}}
    config = build.adapters_config_map(body, adapters)
    assert config["metadata"]["name"] == "chat-adapters"
    return json.loads(config["data"]["adapters.json"])


def test_the_builtin_server_gets_each_adapter_mounted_read_only_by_name() -> None:
    pod = served(md(adapters=ADAPTERS), READY)
    (server,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env[Env.ADAPTERS_FILE] == "/var/run/llmops/adapters/adapters.json"
    assert adapter_entries(md(adapters=ADAPTERS), READY) == [
        {"name": "support", "path": "/adapters/0/output/adapter", "source": READY[0].uri},
        {"name": "legal", "path": "/adapters/1/legal-v2", "source": READY[1].uri},
    ]
    config = next(v for v in pod["volumes"] if v["name"] == "adapters-config")
    assert config["configMap"] == {"name": "chat-adapters"}
    claims = {
        v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "adapter-" in v["name"]
    }
    assert claims == {
        "adapter-0": {"claimName": "ft-support-checkpoints", "readOnly": True},
        "adapter-1": {"claimName": "adapters", "readOnly": True},
    }
    mounts = [m for m in server["volumeMounts"] if m["name"].startswith("adapter-")]
    assert all(m["readOnly"] for m in mounts) and len(mounts) == 2


def test_a_new_adapter_version_changes_the_config_map_not_the_pod_template() -> None:
    """A newer checkpoint of the same run is a folder on the same claim: the server loads it
    from the rewritten ConfigMap; the Deployment does not roll."""
    deployment = md(adapters=ADAPTERS)
    older = [
        ServedAdapter("support", "pvc://ft-support-checkpoints/step-100/adapter", 32),
        READY[1],
    ]
    newer = [
        ServedAdapter("support", "pvc://ft-support-checkpoints/step-200/adapter", 32),
        READY[1],
    ]
    assert served(deployment, older) == served(deployment, newer)
    assert adapter_entries(deployment, older) != adapter_entries(deployment, newer)
    assert adapter_entries(deployment, newer)[0]["path"] == "/adapters/0/step-200/adapter"
    # Two adapters on one claim share its volume.
    both = [ServedAdapter("a", "pvc://shared/a"), ServedAdapter("b", "pvc://shared/b")]
    pod = served(md(adapters=[{"name": "a", "uri": "/a"}, {"name": "b", "uri": "/b"}]), both)
    assert [v["name"] for v in pod["volumes"] if v["name"].startswith("adapter-")] == ["adapter-0"]


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
    pod = served(md(), [])
    (server,) = pod["containers"]
    assert Env.ADAPTERS_FILE not in {e["name"] for e in server["env"]}
    assert "adapters-config" not in {v["name"] for v in pod["volumes"]}


def test_the_server_reads_the_adapters_the_pod_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from llmops_trainer.serve.settings import ServeSettings

    (server,) = served(md(adapters=ADAPTERS), READY)["containers"]
    for entry in server["env"]:
        if entry["name"].startswith("LLMOPS_ADAPTER"):
            monkeypatch.setenv(entry["name"], entry["value"])
    settings = ServeSettings.from_deployment(md(adapters=ADAPTERS), Path("/model"))
    assert settings.adapters_file == Path("/var/run/llmops/adapters/adapters.json")
    from llmops.api.workload import read_adapter_entries

    entries = read_adapter_entries(json.dumps(adapter_entries(md(adapters=ADAPTERS), READY)))
    assert [(e.name, e.path) for e in entries] == [
        ("support", "/adapters/0/output/adapter"),
        ("legal", "/adapters/1/legal-v2"),
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
