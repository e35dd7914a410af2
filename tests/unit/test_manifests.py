from __future__ import annotations

from pathlib import Path

import pytest

from llmops.manifests import ManifestError, load_manifests

DATASET = "apiVersion: llmops.dev/v1alpha1\nkind: Dataset\nmetadata: {name: a}\n"
RUN = "apiVersion: llmops.dev/v1alpha1\nkind: TrainingRun\nmetadata: {name: b}\n"


def test_reads_multi_document_files_and_folders_in_order(tmp_path: Path):
    (tmp_path / "one.yaml").write_text(DATASET + "---\n---\n" + RUN)
    nested = tmp_path / "more"
    nested.mkdir()
    (nested / "two.yml").write_text(RUN.replace("name: b", "name: c"))
    (nested / "notes.txt").write_text("not a manifest")

    docs = load_manifests([tmp_path])

    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("TrainingRun", "c"),  # more/two.yml sorts before one.yaml
        ("Dataset", "a"),
        ("TrainingRun", "b"),
    ]


def test_missing_path_names_the_path(tmp_path: Path):
    with pytest.raises(ManifestError, match=r"nope\.yaml: no such file"):
        load_manifests([tmp_path / "nope.yaml"])


def test_invalid_yaml_names_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed\n")
    with pytest.raises(ManifestError, match=r"bad\.yaml: not valid YAML"):
        load_manifests([bad])


def test_document_without_kind_is_rejected(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DATASET + "---\njust: data\n")
    with pytest.raises(ManifestError, match="document 1 is not a Kubernetes object"):
        load_manifests([bad])
