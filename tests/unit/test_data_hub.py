"""`hf` sources: Hugging Face Hub dataset repositories, from the API rules through the pod
env to listing, pinning and reading files, against a local fake of the Hub."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.fake_hub import COMMIT, FakeHub, Repo, serve

from llmops.api.dataset import Dataset, DatasetSpec, DataSource
from llmops.builders import dataset as ds_build
from llmops.crdgen import openapi_schema
from llmops_trainer.data.collect import list_inputs, open_input, read_documents

REPO = "org/chats"
FILES = {
    ".gitattributes": b"*.parquet filter=lfs\n",
    "README.md": b"---\nlicense: mit\n---\n# Chats\n",
    "data/train.jsonl": b'{"text": "one"}\n{"text": "two"}\n',
    "data/extra/more.jsonl": b'{"text": "three"}\n',
    "scripts/load.py": b"print('not data')\n",
}


def _spec(*sources: dict[str, Any]) -> DatasetSpec:
    return DatasetSpec.model_validate({"sources": list(sources), "tokenizer": {"train": {}}})


def _hf(**hf: Any) -> dict[str, Any]:
    return {"name": "chats", "format": "jsonl", "hf": {"repo": REPO, **hf}}


# -- API -------------------------------------------------------------------------------------


def test_an_hf_source_is_a_fifth_kind_of_location() -> None:
    source = DataSource.model_validate(
        {
            **_hf(revision="refs/convert/parquet", endpoint="https://hub.internal"),
            "include": ["data/**"],
        }
    )
    assert source.hf is not None and source.hf.repo == REPO
    assert source.hf.revision == "refs/convert/parquet"
    with pytest.raises(ValueError, match="exactly one of path, volume, urls, s3 or hf"):
        DataSource.model_validate({**_hf(), "path": "/data"})
    with pytest.raises(ValueError, match="exactly one of path, volume, urls, s3 or hf"):
        DataSource.model_validate({"name": "nothing"})


@pytest.mark.parametrize("repo", ["chats", "org/chats/extra", "-org/chats", "org/chats ", ""])
def test_a_repository_is_org_slash_name(repo: str) -> None:
    with pytest.raises(ValueError, match="repo"):
        DataSource.model_validate({"name": "s", "hf": {"repo": repo}})


@pytest.mark.parametrize(
    ("hf", "field"),
    [
        ({"endpoint": "ftp://mirror"}, "hf.endpoint"),
        ({"revision": "has space"}, "hf.revision"),
        ({"credentialsSecret": {"name": "Not_A_Name"}}, "hf.credentialsSecret.name"),
    ],
)
def test_bad_endpoint_revision_and_secret_are_refused(hf: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DataSource.model_validate(_hf(**hf))


def test_the_crd_counts_hf_among_the_locations() -> None:
    schema = openapi_schema(Dataset)["properties"]["spec"]["properties"]["sources"]["items"]
    rules = {r["message"]: r["rule"] for r in schema["x-kubernetes-validations"]}
    assert (
        "(has(self.hf) ? 1 : 0) == 1"
        in rules["exactly one of path, volume, urls, s3 or hf must be set"]
    )
    assert schema["properties"]["hf"]["required"] == ["repo"]


# -- builder -----------------------------------------------------------------------------------


def _pod_env(*sources: dict[str, Any]) -> dict[str, dict[str, Any]]:
    body = {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "chat", "namespace": "ml", "uid": "u", "generation": 1},
        "spec": {"sources": list(sources), "tokenizer": {"train": {}}},
    }
    dataset = Dataset.model_validate(body)
    env: dict[str, dict[str, Any]] = {}
    for _, job in ds_build.stage_jobs(body, dataset, 1):
        (container,) = job["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert len(env) == len(container["env"])  # no variable twice
    return env


def test_data_pods_get_the_token_by_reference_and_the_mirror() -> None:
    env = _pod_env(
        _hf(endpoint="https://hub.internal", credentialsSecret={"name": "hf-token"}),
        {
            "name": "web",
            "s3": {"bucket": "crawl", "credentialsSecret": {"name": "crawl-s3"}},
        },
    )
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}},
    }
    assert env["HF_ENDPOINT"] == {"name": "HF_ENDPOINT", "value": "https://hub.internal"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "crawl-s3"


def test_a_public_dataset_on_the_hub_needs_no_variables() -> None:
    env = _pod_env(_hf())
    assert "HF_TOKEN" not in env and "HF_ENDPOINT" not in env


def test_one_token_secret_and_one_endpoint_per_dataset() -> None:
    other = {**_hf(), "name": "other"}
    with pytest.raises(ValueError, match=r"one Hub token Secret per Dataset.*\['a', 'b'\]"):
        _pod_env(
            _hf(credentialsSecret={"name": "a"}),
            {**other, "hf": {"repo": "org/x", "credentialsSecret": {"name": "b"}}},
        )
    with pytest.raises(ValueError, match="read from one endpoint"):
        _pod_env(_hf(endpoint="https://hub.internal"), other)


# -- collect -----------------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    for name in ("HF_TOKEN", "HF_ENDPOINT", "LLMOPS_WORK_DIR", "LLMOPS_OUTPUT_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    # huggingface_hub may be imported already, its endpoint read: no telemetry call to it.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY", True)
    private = Repo.of({"train.jsonl": b'{"text": "secret"}\n'}, token="hf_good")
    with serve(FakeHub(datasets={REPO: FILES, "org/private": private})) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _paths(spec: DatasetSpec, work: Path | None = None) -> list[str]:
    return [ref.location.split("@")[1].split("/", 1)[1] for ref in list_inputs(spec, work_dir=work)]


def _texts(spec: DatasetSpec, work: Path | None = None) -> list[str]:
    texts = []
    for ref in list_inputs(spec, work_dir=work):
        with open_input(spec, ref) as (stream, _):
            texts += [d.text for d in read_documents(stream, spec.sources[ref.source])]
    return texts


def test_the_data_files_of_a_repository_are_listed_and_read(hub: FakeHub) -> None:
    spec = _spec(_hf())
    (ref, other) = list_inputs(spec)
    assert ref.kind == "hf"
    assert ref.location == f"hf://datasets/{REPO}@{COMMIT}/data/extra/more.jsonl"
    assert other.location.endswith(f"@{COMMIT}/data/train.jsonl")
    assert _texts(spec) == ["three", "one", "two"]
    assert hub.requests[f"GET /datasets/{REPO}/resolve/{COMMIT}/data/train.jsonl"] == 1


def test_include_and_exclude_select_files_and_name_metadata(hub: FakeHub) -> None:
    assert _paths(_spec({**_hf(), "exclude": ["data/extra/**"]})) == ["data/train.jsonl"]
    # README.md is no data unless a pattern names it; then it is read like the others.
    spec = _spec({**_hf(), "format": "text", "include": ["*.md", "data/train.jsonl"]})
    assert _paths(spec) == ["README.md", "data/train.jsonl"]
    with pytest.raises(FileNotFoundError, match=f"no data file selected in Hub dataset {REPO}"):
        list_inputs(_spec({**_hf(), "include": ["*.parquet"]}))


def test_the_revision_is_pinned_for_every_slice_of_a_version(hub: FakeHub, tmp_path: Path) -> None:
    work = tmp_path / "g1" / ".work"
    first = _paths(_spec(_hf()), work)
    moved = hub.datasets[REPO].push({"data/new.jsonl": b'{"text": "new"}\n'})
    # A later slice of the same version reads the commit the first one saw ...
    assert [ref.location for ref in list_inputs(_spec(_hf()), work_dir=work)] == [
        f"hf://datasets/{REPO}@{COMMIT}/{path}" for path in first
    ]
    assert _texts(_spec(_hf()), work) == ["three", "one", "two"]
    # ... a new version (or a revision that names the commit) the new one.
    assert _texts(_spec(_hf()), tmp_path / "g2" / ".work") == ["new"]
    assert _paths(_spec(_hf(revision=moved)), work) == ["data/new.jsonl"]
    pins = sorted(p.name for p in work.iterdir())
    assert len(pins) == 2 and all(p.startswith("hub-") for p in pins)  # no drafts left


def test_a_private_dataset_needs_the_token(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(_hf(repo="org/private"))
    with pytest.raises(FileNotFoundError, match="if it is private, a token may be needed"):
        list_inputs(spec)
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert _texts(spec) == ["secret"]


def test_unknown_repositories_and_revisions_are_named(hub: FakeHub) -> None:
    message = f"source chats: dataset repository org/none at {hub.url} does not exist"
    with pytest.raises(FileNotFoundError, match=message):
        list_inputs(_spec(_hf(repo="org/none")))
    with pytest.raises(FileNotFoundError, match=f"{REPO} at {hub.url} has no revision 'v9'"):
        list_inputs(_spec(_hf(revision="v9")))
