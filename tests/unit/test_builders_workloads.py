"""Pure builders of the workload children: gang wiring, data versions, storage, scheduling."""

from __future__ import annotations

import datetime
import json

import pytest

from llmops.api.common import Scheduling
from llmops.api.dataset import Dataset
from llmops.api.trainingrun import TrainingRun, TrainingRunStatus
from llmops.api.workload import (
    PRETRAINED_MOUNT_DIR,
    TOKENIZER_MODEL_DIR,
    TrainerReport,
    TrainingProgress,
    last_progress,
    read_record,
)
from llmops.builders import dataset as ds_build
from llmops.builders import storage
from llmops.builders import trainingrun as tr_build
from llmops.builders.pods import scheduling_fields
from llmops.decide.status import termination_message
from llmops.decide.trainingrun import apply_progress, checkpoints

RUN = {
    "apiVersion": "llmops.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "gpt", "namespace": "ml", "uid": "u1", "generation": 2},
    "spec": {
        "datasetRef": {"name": "corpus"},
        "hyperparameters": {"maxSteps": 10},
        "resources": {"numNodes": 3, "procsPerNode": 2},
        "scheduling": {"spot": True, "nodeSelector": {"pool": "cpu"}},
        "checkpointing": {"storage": {"volume": {"claimName": "shared", "subPath": "runs/gpt"}}},
    },
}
DATASET = {
    "apiVersion": "llmops.dev/v1alpha1",
    "kind": "Dataset",
    "metadata": {"name": "corpus", "namespace": "ml", "uid": "u2", "generation": 4},
    "spec": {
        "sources": [{"name": "a", "path": "a.txt"}],
        "tokenizer": {"train": {"vocabSize": 512}},
        "parallelism": 4,
        "retainPolicy": "Delete",
    },
}


def test_cpu_gang_gets_rendezvous_env_data_version_and_existing_claim():
    run = TrainingRun.model_validate(RUN)
    job = tr_build.worker_job(RUN, run, attempt=2, dataset_uri="pvc://corpus-data/g4")
    pod = job["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert job["metadata"]["name"] == "gpt-workers-2"
    assert env["MASTER_ADDR"] == "gpt-workers-2-0.gpt-headless.ml.svc"
    assert (env["WORLD_SIZE"], env["NNODES"], env["NPROC_PER_NODE"]) == ("6", "3", "2")
    assert env["DS_ACCELERATOR"] == "cpu"  # no GPUs asked for
    assert env["LLMOPS_DATA_DIR"] == "/data/g4"
    assert env["LLMOPS_ATTEMPT"] == "2"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {
        "claimName": "corpus-data",
        "readOnly": True,
    }
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "shared"
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["checkpoints"]["subPath"] == "runs/gpt"
    assert mounts["data"]["readOnly"]
    assert pod["nodeSelector"] == {"pool": "cpu"}
    assert any(t["key"] == "cloud.google.com/gke-spot" for t in pod["tolerations"])
    assert pod["securityContext"]["runAsNonRoot"]
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "nvidia.com/gpu" not in json.dumps(pod["containers"][0]["resources"])
    # The existing claim is the user's: nothing to create.
    assert tr_build.checkpoint_claim(RUN, run) is None


def test_s3_dataset_is_read_from_the_uri():
    volumes, mounts, env = tr_build.dataset_volume("s3://bucket/prefix/g1")
    assert (volumes, mounts) == ([], [])
    assert env == [{"name": "LLMOPS_DATA_URI", "value": "s3://bucket/prefix/g1"}]


def test_config_map_carries_the_resource_for_the_trainer():
    config = json.loads(tr_build.config_map(RUN)["data"]["trainingrun.json"])
    assert TrainingRun.model_validate(config).spec.resources.num_nodes == 3
    assert config["metadata"]["generation"] == 2


def test_dataset_jobs_are_versioned_by_generation_and_claim_follows_retain_policy():
    dataset = Dataset.model_validate(DATASET)
    slices = ds_build.slices_job(DATASET, dataset, 4)
    final = ds_build.finalize_job(DATASET, dataset, 4)
    assert slices["metadata"]["name"] == "corpus-slices-g4"
    assert (slices["spec"]["completionMode"], slices["spec"]["completions"]) == ("Indexed", 4)
    assert final["metadata"]["name"] == "corpus-finalize-g4" and final["spec"]["completions"] == 1
    env = {e["name"]: e["value"] for e in final["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LLMOPS_OUTPUT_DIR"] == "/output/g4"
    assert ds_build.output_uri(dataset, 4) == "pvc://corpus-data/g4"
    claim = ds_build.output_claim(DATASET, dataset)
    assert claim is not None and claim["metadata"]["ownerReferences"][0]["uid"] == "u2"
    retained = Dataset.model_validate(
        {**DATASET, "spec": {**DATASET["spec"], "retainPolicy": "Retain"}}
    )
    claim = ds_build.output_claim(DATASET, retained)
    assert claim is not None and "ownerReferences" not in claim["metadata"]


@pytest.mark.parametrize(
    ("uri", "parts"),
    [
        ("pvc://claim/a/b", ("pvc", "claim", "a/b")),
        ("pvc://claim", ("pvc", "claim", "")),
        ("s3://bucket/prefix", ("s3", "bucket", "prefix")),
    ],
)
def test_storage_uris_parse(uri: str, parts: tuple[str, str, str]):
    assert storage.parse_uri(uri) == parts


def test_storage_uri_rejects_other_schemes():
    with pytest.raises(ValueError, match="not a pvc"):
        storage.parse_uri("http://x/y")


def test_progress_is_read_from_the_last_record_in_the_log():
    log = "\n".join(
        [
            'LLMOPS_PROGRESS {"phase": "Training", "step": 10, "totalSteps": 100, "trainLoss": 5}',
            "some other line",
            'LLMOPS_PROGRESS {"phase": "Training", "step": 40, "totalSteps": 100, '
            '"trainLoss": 3.5, "validation": {"loss": 3.7, "accuracy": 0.25}, '
            '"tokensPerSecond": 1234.5, "mfu": 0.41}',
            "LLMOPS_PROGRESS {truncated",
        ]
    )
    record = last_progress(log)
    assert record is not None and record.step == 40
    started = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    status = TrainingRunStatus(start_time=started)
    apply_progress(status, record, "pvc://c", started + datetime.timedelta(seconds=400))
    assert status.to_dict() == {
        "startTime": "2026-01-01T00:00:00Z",
        "restartCount": 0,
        "preemptionCount": 0,
        "conditions": [],
        "step": 40,
        "totalSteps": 100,
        "progress": 40,
        "estimatedRemainingSeconds": 600,
        "metrics": {
            "trainLoss": 3.5,
            "validationLoss": 3.7,
            "accuracy": 0.25,
            "tokensPerSecond": 1234.5,
            "mfu": 0.41,
        },
    }
    assert last_progress(None) is None and last_progress("nothing here") is None


def test_termination_message_comes_from_a_succeeded_pod_only():
    def pod(phase: str, message: str) -> dict:
        return {
            "status": {
                "phase": phase,
                "containerStatuses": [{"state": {"terminated": {"message": message}}}],
            }
        }

    assert termination_message(pod("Failed", '{"step": 1}')) is None
    assert read_record(TrainerReport, termination_message(pod("Succeeded", "not json"))) is None
    report = read_record(TrainerReport, termination_message(pod("Succeeded", '{"step": 7}')))
    assert report is not None and report.step == 7


def test_checkpoint_names_become_status_entries():
    record = TrainingProgress(phase="Training", latest_checkpoint="step-120")
    found = checkpoints(record, "pvc://ckpt/runs")
    assert found is not None and found.to_dict() == {
        "latest": {"name": "step-120", "step": 120, "uri": "pvc://ckpt/runs/step-120"}
    }


def test_fine_tuning_mounts_the_parent_checkpoint_read_only():
    run = TrainingRun.model_validate(RUN)
    job = tr_build.worker_job(
        RUN, run, 0, "pvc://corpus-data/g4", init_uri="pvc://parent-checkpoints/step-50"
    )
    pod = job["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["LLMOPS_INIT_CHECKPOINT"] == "/init/step-50"
    init = next(v for v in pod["volumes"] if v["name"] == "init")
    assert init["persistentVolumeClaim"] == {"claimName": "parent-checkpoints", "readOnly": True}
    assert pod["containers"][0]["terminationMessagePath"] == env["LLMOPS_TERMINATION_LOG"]


def test_dataset_pods_get_source_claims_credentials_and_a_reference_tokenizer():
    spec = {
        "sources": [
            {"name": "books", "volume": {"claimName": "corpora", "path": "books/"}},
            {
                "name": "web",
                "s3": {
                    "bucket": "crawl",
                    "prefix": "en/",
                    "credentialsSecret": {"name": "crawl-s3"},
                },
            },
        ],
        "tokenizer": {"datasetRef": {"name": "base"}},
    }
    body = {**DATASET, "spec": spec}
    dataset = Dataset.model_validate(body)
    job = ds_build.slices_job(body, dataset, 1, tokenizer_uri="pvc://base-data/g2/tokenizer.json")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["source-0"]["mountPath"] == "/mnt/llmops/volumes/corpora"
    assert mounts["source-0"]["readOnly"]
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "crawl-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert env["LLMOPS_REF_TOKENIZER"]["value"] == "/mnt/llmops/reference/g2/tokenizer.json"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["reference-tokenizer"]["persistentVolumeClaim"]["claimName"] == "base-data"


def _chat_dataset(model: dict[str, object]) -> tuple[dict[str, object], Dataset]:
    spec = {
        "sources": [
            {"name": "chats", "path": "/data/chats", "format": "jsonl", "messagesField": "messages"}
        ],
        "tokenizer": {"fromModel": model},
    }
    body = {**DATASET, "spec": spec}
    return body, Dataset.model_validate(body)


def test_dataset_pods_fetch_a_remote_model_tokenizer_with_an_initializer():
    body, dataset = _chat_dataset(
        {"uri": "hf://org/chat-7b@v1", "credentialsSecret": {"name": "hf-token"}}
    )
    for job in (
        ds_build.slices_job(body, dataset, 4),
        ds_build.prepare_job(body, dataset, 4),
        ds_build.tokenize_job(body, dataset, 4),
        ds_build.finalize_job(body, dataset, 4),
    ):
        pod = job["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["name"] == "model-init"
        assert init["command"] == ["python", "-m", "llmops_trainer.model_init", "--tokenizer-only"]
        init_env = {e["name"]: e for e in init["env"]}
        assert init_env["LLMOPS_PRETRAINED_URI"]["value"] == "hf://org/chat-7b@v1"
        assert init_env["LLMOPS_PRETRAINED_DIR"]["value"] == TOKENIZER_MODEL_DIR
        assert init_env["LLMOPS_PRETRAINED_SHARED"]["value"] == "0"
        # The token is referenced, never copied, and only the initializer gets it.
        assert init_env["HF_TOKEN"] == {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}},
        }
        assert "value" not in init_env["HF_TOKEN"]
        # The download lands in the scratch volume the main container also mounts.
        assert TOKENIZER_MODEL_DIR.startswith("/tmp/")
        init_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
        container = pod["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert init_mounts["/tmp"] == mounts["/tmp"] == "tmp"
        env = {e["name"]: e for e in container["env"]}
        assert env["LLMOPS_PRETRAINED_DIR"]["value"] == TOKENIZER_MODEL_DIR
        assert "HF_TOKEN" not in env and "LLMOPS_PRETRAINED_URI" not in env
        assert "LLMOPS_REF_TOKENIZER" not in env
        assert "hf-token" not in json.dumps(container)
        names = [v["name"] for v in pod["volumes"]]
        assert len(names) == len(set(names))
        assert init["securityContext"]["readOnlyRootFilesystem"]


def test_dataset_pods_read_a_model_tokenizer_on_a_claim_in_place():
    body, dataset = _chat_dataset({"uri": "pvc://models/qwen/instruct"})
    pod = ds_build.tokenize_job(body, dataset, 4)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["pretrained"]["persistentVolumeClaim"] == {
        "claimName": "models",
        "readOnly": True,
    }
    (init,) = pod["initContainers"]
    container = pod["containers"][0]
    for mounts in (init["volumeMounts"], container["volumeMounts"]):
        (mount,) = [m for m in mounts if m["name"] == "pretrained"]
        assert mount["readOnly"] and mount["mountPath"] == PRETRAINED_MOUNT_DIR
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert env["LLMOPS_PRETRAINED_DIR"] == f"{PRETRAINED_MOUNT_DIR}/qwen/instruct"


def test_dataset_pods_without_a_model_tokenizer_have_no_initializer():
    dataset = Dataset.model_validate(DATASET)
    pod = ds_build.slices_job(DATASET, dataset, 4)["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert "LLMOPS_PRETRAINED_DIR" not in env


def test_spot_placement_comes_from_the_chart_values() -> None:
    from llmops import config

    scheduling = Scheduling(spot=True, node_selector={"pool": "gpu"})
    chart_values = {
        "LLMOPS_SPOT_TOLERATIONS": (
            '[{"key": "example.com/spot", "operator": "Exists", "effect": "NoSchedule"}]'
        ),
        "LLMOPS_SPOT_NODE_SELECTOR": '{"example.com/capacity": "spot"}',
    }
    config.configure(config.OperatorConfig.from_env(chart_values))
    try:
        fields = scheduling_fields(scheduling)
    finally:
        config.configure(config.OperatorConfig())
    assert [t["key"] for t in fields["tolerations"]] == ["example.com/spot"]
    # The spec's own selector wins where both name a label.
    assert fields["nodeSelector"] == {"example.com/capacity": "spot", "pool": "gpu"}
    assert {t["key"] for t in scheduling_fields(Scheduling(spot=True))["tolerations"]} == {
        "cloud.google.com/gke-spot",
        "kubernetes.azure.com/scalesetpriority",
        "eks.amazonaws.com/capacityType",
    }
    assert "nodeSelector" not in scheduling_fields(Scheduling(spot=True))
