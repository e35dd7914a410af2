"""Validating and ordering the manifests of a local run."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from llmops.cli import main
from llmops.local.resources import (
    InvalidManifests,
    config_maps,
    order,
    references,
    secrets,
    validate,
)
from llmops.manifests import ManifestError, apply_overrides

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = list(yaml.safe_load_all((ROOT / "examples" / "quickstart.yaml").read_text()))


def names(docs: list[dict]) -> list[str]:
    return [f"{d['kind']}/{d['metadata']['name']}" for d in docs]


def test_quickstart_orders_dataset_training_deployment_whatever_the_input_order() -> None:
    resources, skipped = validate(list(reversed(QUICKSTART)))
    assert skipped == []
    assert names(order(resources)) == [
        "Dataset/python-stdlib",
        "TrainingRun/stdlib-gpt",
        "ModelDeployment/stdlib-gpt",
    ]


def test_references_decide_the_order_within_a_kind() -> None:
    base, fine = copy.deepcopy(QUICKSTART[1]), copy.deepcopy(QUICKSTART[1])
    fine["metadata"]["name"] = "fine"
    fine["spec"]["init"] = {"trainingRun": {"name": "stdlib-gpt", "checkpoint": "latest"}}
    reuse = copy.deepcopy(QUICKSTART[0])
    reuse["metadata"]["name"] = "reuse"
    reuse["spec"]["tokenizer"] = {"datasetRef": {"name": "python-stdlib"}}
    resources, _ = validate([fine, reuse, base, QUICKSTART[0]])
    assert names(order(resources)) == [
        "Dataset/python-stdlib",
        "Dataset/reuse",
        "TrainingRun/stdlib-gpt",
        "TrainingRun/fine",
    ]
    assert references(fine) == [
        ("Dataset", "default", "python-stdlib"),
        ("TrainingRun", "default", "stdlib-gpt"),
    ]


def test_cycles_are_refused() -> None:
    a, b = copy.deepcopy(QUICKSTART[1]), copy.deepcopy(QUICKSTART[1])
    a["metadata"]["name"], b["metadata"]["name"] = "a", "b"
    a["spec"]["init"] = {"trainingRun": {"name": "b"}}
    b["spec"]["init"] = {"trainingRun": {"name": "a"}}
    with pytest.raises(InvalidManifests, match="cycle"):
        order(validate([a, b])[0])


def test_invalid_fields_are_named_and_all_reported() -> None:
    bad_dataset = copy.deepcopy(QUICKSTART[0])
    bad_dataset["spec"]["split"]["train"] = "most"
    bad_run = copy.deepcopy(QUICKSTART[1])
    bad_run["spec"]["resources"]["numNodes"] = 0
    with pytest.raises(InvalidManifests) as error:
        validate([bad_dataset, bad_run])
    message = str(error.value)
    assert "Dataset/python-stdlib: spec.split.train" in message
    assert "TrainingRun/stdlib-gpt: spec.resources.numNodes" in message


def test_duplicates_unknown_kinds_and_foreign_objects() -> None:
    with pytest.raises(InvalidManifests, match="defined twice"):
        validate([QUICKSTART[0], QUICKSTART[0]])
    unknown = {"apiVersion": "llmops.dev/v1alpha1", "kind": "Model", "metadata": {"name": "m"}}
    with pytest.raises(InvalidManifests, match="no kind 'Model'"):
        validate([unknown])
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
    assert validate([config, QUICKSTART[0]])[1] == ["ConfigMap/c"]


def test_configmaps_in_the_files_are_kept_for_the_pods_that_mount_them() -> None:
    tasks = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tasks"}}
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "t", "namespace": "ml"}}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}
    found = config_maps([tasks, QUICKSTART[0], other, secret])
    assert found == {("default", "tasks"): tasks, ("ml", "t"): other}


def test_a_training_schedule_is_refused_as_needing_a_cluster() -> None:
    docs = yaml.safe_load_all((ROOT / "examples" / "retraining.yaml").read_text())
    schedule = next(d for d in docs if d["kind"] == "TrainingSchedule")
    with pytest.raises(InvalidManifests) as error:
        validate([QUICKSTART[0], schedule])
    name = schedule["metadata"]["name"]
    assert str(error.value).startswith(
        f"TrainingSchedule/{name}: a TrainingSchedule needs a cluster"
    )


def test_a_sweep_runs_locally_after_the_dataset_it_trains_on() -> None:
    docs = list(yaml.safe_load_all((ROOT / "examples" / "cross-validation.yaml").read_text()))
    resources, _ = validate(list(reversed(docs)))
    assert [d["kind"] for d in order(resources)] == ["Dataset", "Sweep"]


def test_cli_refuses_invalid_manifests_before_anything_starts(tmp_path: Path, capsys) -> None:
    bad = copy.deepcopy(QUICKSTART[1])
    bad["spec"]["hyperparameters"]["learningRate"] = -1
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump_all([QUICKSTART[0], bad]))
    state_dir = tmp_path / "state"
    assert main(["run", "-f", str(manifest), "--state-dir", str(state_dir)]) == 2
    assert "spec.hyperparameters.learningRate" in capsys.readouterr().err
    assert not state_dir.exists()


def test_set_overrides_fields_by_kind_name_and_path() -> None:
    docs = copy.deepcopy(QUICKSTART)
    run, dataset = docs[1]["metadata"]["name"], docs[0]["metadata"]["name"]
    apply_overrides(
        docs,
        [
            f"tr/{run}.spec.hyperparameters.maxSteps=40",
            f"Dataset/{dataset}.spec.sources.0.include=[a*.py, b*.py]",
            f"tr/{run}.spec.scheduling.priorityClassName=low",  # creates missing mappings
        ],
    )
    assert docs[1]["spec"]["hyperparameters"]["maxSteps"] == 40
    assert docs[0]["spec"]["sources"][0]["include"] == ["a*.py", "b*.py"]
    assert docs[1]["spec"]["scheduling"] == {"priorityClassName": "low"}
    assert docs[2]["spec"] == QUICKSTART[2]["spec"]  # same name, other kind: untouched


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tr/stdlib-gpt.spec.maxSteps", "expected KIND/NAME.field.path=VALUE"),
        ("tr/nope.spec.x=1", "no TrainingRun named 'nope'"),
        ("ds/python-stdlib.spec.sources.5.path=x", "no item 5 in the list"),
        ("tr/stdlib-gpt.spec.hyperparameters.maxSteps.x=1", "inside a scalar"),
    ],
)
def test_bad_overrides_are_named(override: str, message: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(message)):
        apply_overrides(copy.deepcopy(QUICKSTART), [override])


def test_cli_overrides_are_validated_like_the_manifest(tmp_path: Path, capsys) -> None:
    state_dir = tmp_path / "state"
    quickstart = str(ROOT / "examples" / "quickstart.yaml")
    args = ["run", "-f", quickstart, "--state-dir", str(state_dir)]
    assert main([*args, "--set", "tr/stdlib-gpt.spec.hyperparameters.maxSteps=-5"]) == 2
    assert "spec.hyperparameters.maxSteps" in capsys.readouterr().err
    assert not state_dir.exists()


def test_secrets_in_the_files_are_decoded_for_the_pods() -> None:
    import base64

    encoded = base64.b64encode(b"hf_abc").decode()
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hub"},
              "data": {"HF_TOKEN": encoded, "both": base64.b64encode(b"old").decode()},
              "stringData": {"both": "new"}}  # fmt: skip
    assert secrets([secret, QUICKSTART[0]]) == {
        ("default", "hub"): {"HF_TOKEN": "hf_abc", "both": "new"}  # stringData wins
    }
    bad = {**secret, "data": {"x": "not base64!"}}
    with pytest.raises(InvalidManifests, match=r"Secret/hub: data\.x is not base64"):
        secrets([bad])
