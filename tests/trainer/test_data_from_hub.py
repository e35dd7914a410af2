"""A Dataset whose sources are a Hugging Face Hub dataset repository, as the Jobs run it:
slice pods, then the later stages, as processes, with the Hub variables the builder gives the pods
(HF_ENDPOINT, and HF_TOKEN as the kubelet fills it from the Secret), against a local fake
of the Hub holding a private repository with chats in parquet and jsonl."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.fake_hub import COMMIT, FakeHub, Repo, serve
from fixtures.tiny_llama import build

from llmops.api.dataset import Dataset, dedup_groups
from llmops.api.workload import FailureReport, read_record
from llmops.builders import dataset as ds_build
from llmops_trainer.shards import open_tokens, read_manifest, verify

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from data_corpus import document, sentence

SLICES = 2
REPO = "org/chats"
SECRETS = {"hub-token": {"HF_TOKEN": "hf_secret"}}  # what the kubelet reads for secretKeyRef


def _chat(rng: random.Random) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You answer with care."}]
    for _ in range(rng.randint(1, 3)):
        messages += [
            {"role": "user", "content": sentence(rng)},
            {"role": "assistant", "content": document(rng, 2)},
        ]
    return messages


def _parquet(chats: list[list[dict[str, str]]]) -> bytes:
    """As `datasets.Dataset.to_parquet` writes chats: a list<struct<role, content>> column
    and the features in the schema metadata."""
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    features = {
        "prompt_id": {"dtype": "string", "_type": "Value"},
        "messages": [
            {"role": {"dtype": "string", "_type": "Value"}, "content": {"dtype": "string"}}
        ],
    }
    table = pa.table(
        {
            "prompt_id": pa.array([f"p{i}" for i in range(len(chats))]),
            "messages": pa.array(chats, type=pa.list_(message)),
        }
    ).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


@pytest.fixture(scope="module")
def chats() -> dict[str, list[list[dict[str, str]]]]:
    rng = random.Random(11)
    return {"parquet": [_chat(rng) for _ in range(30)], "jsonl": [_chat(rng) for _ in range(20)]}


@pytest.fixture(scope="module")
def hub(chats: dict[str, list[list[dict[str, str]]]]) -> Iterator[FakeHub]:
    lines = "".join(json.dumps({"messages": c}) + "\n" for c in chats["jsonl"])
    files = {
        ".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n",
        # A dataset card: not data, and not JSON either (reading it would count unreadables).
        "README.md": b"---\nconfigs:\n- config_name: default\n---\n# Chats\n",
        "data/train-00000-of-00001.parquet": _parquet(chats["parquet"]),
        "data/extra.jsonl": lines.encode(),
    }
    private = Repo.of(files, token=SECRETS["hub-token"]["HF_TOKEN"])
    with serve(FakeHub(datasets={REPO: private})) as server:
        yield server


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("tiny-llama"))


def _body(sources: list[dict[str, Any]], tokenizer: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "hub-chats", "namespace": "ml", "uid": "u", "generation": 1},
        "spec": {
            "sources": sources,
            "tokenizer": tokenizer,
            "split": {"train": 0.8, "validation": 0.1, "test": 0.1},
            "sharding": {"tokensPerShard": 4096},
            "parallelism": SLICES,
            # Synthetic sentences lack stop words; the source is under test, not the filters.
            "processing": {"filters": {"minStopWords": 0}},
        },
    }


def _hf_source(name: str, endpoint: str, repo: str = REPO, **fields: Any) -> dict[str, Any]:
    hf = {"repo": repo, "endpoint": endpoint, "credentialsSecret": {"name": "hub-token"}}
    return {"name": name, "hf": hf, **fields}


def _pod_env(body: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """The process env of a data pod: the builder's Hub variables (secretKeyRefs filled in
    as the kubelet does) and the model's folder, with local folders for the rest."""
    dataset = Dataset.model_validate(body)
    (container,) = ds_build.slices_job(body, dataset, 1)["spec"]["template"]["spec"]["containers"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LLMOPS_"))}
    for entry in container["env"]:
        name = entry["name"]
        if name.startswith("HF_") or name == "LLMOPS_PRETRAINED_DIR":
            reference = entry.get("valueFrom", {}).get("secretKeyRef")
            env[name] = (
                SECRETS[reference["name"]][reference["key"]] if reference else entry["value"]
            )
    return {
        **env,
        "HF_HOME": str(tmp_path / "hf-home"),
        "LLMOPS_OUTPUT_DIR": str(tmp_path / "out"),
        "LLMOPS_NUM_SLICES": str(SLICES),
        "LLMOPS_TERMINATION_LOG": str(tmp_path / "termination-log"),
    }


def _run(tmp_path: Path, body: dict[str, Any], *, rest: bool = True) -> list[int]:
    """The slice pods side by side, then (if they all succeed) the dedup pods, the prepare
    pod, the tokenize pods and the finalize pod."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "dataset.json"
    config.write_text(json.dumps(body))
    env = _pod_env(body, tmp_path)
    command = [sys.executable, "-m", "llmops_trainer.data", "--config", str(config)]
    slices = [
        subprocess.Popen(
            [*command, "--stage", "slice"], env={**env, "JOB_COMPLETION_INDEX": str(index)}
        )
        for index in range(SLICES)
    ]
    codes = [p.wait(timeout=300) for p in slices]
    if rest and codes == [0] * SLICES:
        for group in range(dedup_groups(Dataset.model_validate(body).spec)):
            dedup = [*command, "--stage", "dedup"]
            index = {"JOB_COMPLETION_INDEX": str(group)}
            codes.append(subprocess.run(dedup, env={**env, **index}, timeout=300).returncode)
        for stage, pods in (("prepare", 1), ("tokenize", SLICES), ("finalize", 1)):
            for pod in range(pods):
                index = {"JOB_COMPLETION_INDEX": str(pod)}
                run = [*command, "--stage", stage]
                codes.append(subprocess.run(run, env={**env, **index}, timeout=300).returncode)
    return codes


def test_chats_from_a_private_hub_dataset(
    hub: FakeHub, model: Path, chats: dict[str, list[list[dict[str, str]]]], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    sources = [
        _hf_source("parquet", hub.url, format="parquet", include=["**/*.parquet"]),
        _hf_source("jsonl", hub.url, format="jsonl", exclude=["**/*.parquet"]),
    ]
    for source in sources:
        source["messagesField"] = "messages"
    body = _body(sources, {"fromModel": {"uri": str(model)}})

    groups = dedup_groups(Dataset.model_validate(body).spec)
    # slices, dedup groups, prepare, tokenize pods, finalize
    assert _run(tmp_path, body) == [0] * (SLICES + groups + 1 + SLICES + 1)

    output = tmp_path / "out"
    manifest = read_manifest(output)
    assert verify(output, manifest) == [] and manifest.supervised
    stats = manifest.stats
    steps = {s["name"]: s for s in stats["steps"]}
    # Two files were read (not README.md, not .gitattributes), one per slice, every record
    # a chat.
    assert stats["inputs"]["files"] == 2
    assert steps["normalize"]["documentsIn"] == 50 and steps["normalize"]["dropped"] == {}
    assert stats["documents"] == 50
    assert {name: s["documents"] for name, s in stats["sources"].items()} == {
        "parquet": 30,
        "jsonl": 20,
    }
    # Each slice read its file at the commit pinned in the work folder.
    work = output / ".work"
    (pin,) = work.glob("hub-*.json")
    assert json.loads(pin.read_text())["commit"] == COMMIT
    read = [
        i["location"]
        for index in range(SLICES)
        for i in json.loads((work / f"slice-{index:05d}" / "stats.json").read_text())["inputs"]
    ]
    assert sorted(read) == [
        f"hf://datasets/{REPO}@{COMMIT}/data/extra.jsonl",
        f"hf://datasets/{REPO}@{COMMIT}/data/train-00000-of-00001.parquet",
    ]
    assert hub.requests[f"GET /datasets/{REPO}/resolve/{COMMIT}/README.md"] == 0
    # The chats are in the shards, rendered with the model's template.
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    rendered = ""
    for split in manifest.splits.values():
        for shard in split.shards:
            tokens = list(open_tokens(output, manifest, shard))
            rendered += tokenizer.decode(tokens, skip_special_tokens=False)
    for chat in [*chats["parquet"], *chats["jsonl"]]:
        assert tokenizer.apply_chat_template(chat, tokenize=False) in rendered
    assert f"Hub dataset `{REPO}@main`" in (output / "README.md").read_text()


def test_an_unknown_repository_is_the_pod_failure_report(hub: FakeHub, tmp_path: Path) -> None:
    sources = [_hf_source("web", hub.url, repo="org/no-such-data", format="jsonl")]
    body = _body(sources, {"train": {"vocabSize": 300}})

    assert _run(tmp_path, body, rest=False) == [1] * SLICES

    report = read_record(FailureReport, (tmp_path / "termination-log").read_text())
    assert report is not None and report.stage == "slice"
    assert report.reason == "InputNotFound"
    assert report.message == (
        f"source web: dataset repository org/no-such-data at {hub.url} does not exist"
    )
