"""The generated CRDs: committed copies are current, schemas are structural and documented,
and the API server's defaulting yields what pydantic's does."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops.api import KINDS
from llmops.cli import main
from llmops.crdgen import KINDS as CRD_KINDS
from llmops.crdgen import Kind, crd, outputs, render

ROOT = Path(__file__).resolve().parents[2]
MINIMAL: dict[str, dict[str, Any]] = {
    "Dataset": {"sources": [{"name": "a", "path": "a.txt"}], "tokenizer": {"train": {}}},
    "TrainingRun": {"datasetRef": {"name": "c"}, "hyperparameters": {"maxSteps": 10}},
    "ModelDeployment": {"model": {"trainingRun": {"name": "r"}}},
    "TrainingSchedule": {
        "schedule": "@daily",
        "template": {"datasetRef": {"name": "c"}, "hyperparameters": {"maxSteps": 10}},
    },
    "Sweep": {
        "template": {"datasetRef": {"name": "c"}, "hyperparameters": {"maxSteps": 10}},
        "parameters": [
            {
                "name": "lr",
                "path": "hyperparameters.learningRate",
                "type": "float",
                "min": 0.0001,
                "max": 0.01,
            }
        ],
    },
}
ids = [k.name for k in CRD_KINDS]


def _schema(kind: Kind) -> dict[str, Any]:
    schema: dict[str, Any] = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}{{}}")


FOLDERS = ["crds", "helm/llmops/crds"]


def test_generator_writes_crds_and_the_charts_copy() -> None:
    assert outputs(ROOT) == [ROOT / folder for folder in FOLDERS]


@pytest.mark.parametrize("folder", FOLDERS)
def test_committed_crds_are_current(folder: str) -> None:
    """crds/ and the chart's crds/ hold exactly what `llmops crds` writes."""
    committed = ROOT / folder
    assert sorted(p.name for p in committed.glob("*.yaml")) == sorted(
        k.filename for k in CRD_KINDS
    ), f"{folder}/ is stale: run `llmops crds`"
    for kind in CRD_KINDS:
        text = (committed / kind.filename).read_text()
        assert text == render(kind), f"{folder}/{kind.filename} is stale: run `llmops crds`"


def test_cli_writes_both_folders_of_a_source_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "helm" / "llmops").mkdir(parents=True)
    (tmp_path / "helm" / "llmops" / "Chart.yaml").write_text("name: llmops\n")
    stale = tmp_path / "crds" / "llmops.dev_removedkinds.yaml"
    stale.parent.mkdir()
    stale.write_text("kind: CustomResourceDefinition\n")
    monkeypatch.setattr("llmops.cli._source_root", lambda: tmp_path)
    assert main(["crds"]) == 0
    for folder in FOLDERS:
        written = {p.name: p.read_text() for p in (tmp_path / folder).iterdir()}
        assert written == {k.filename: render(k) for k in CRD_KINDS}


def test_cli_writes_one_file_per_kind(tmp_path: Path) -> None:
    assert main(["crds", "--output", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(k.filename for k in CRD_KINDS)
    for kind in CRD_KINDS:
        loaded = yaml.safe_load((tmp_path / kind.filename).read_text())
        assert loaded["spec"]["names"]["shortNames"] == [kind.short_name]
        assert loaded["spec"]["names"]["categories"] == ["llmops"]
        assert loaded["spec"]["scope"] == "Namespaced"
        assert loaded["spec"]["group"] == "llmops.dev"


@pytest.mark.parametrize("kind", CRD_KINDS, ids=ids)
def test_every_field_has_a_description(kind: Kind) -> None:
    schema = _schema(kind)
    missing = [
        path
        for path, node in _nodes(schema["properties"]["spec"], "spec")
        if not path.endswith(("[]", "}")) and not node.get("description")
    ]
    missing += [
        path
        for path, node in _nodes(schema["properties"]["status"], "status")
        if not path.endswith(("[]", "}")) and not node.get("description")
    ]
    assert not missing


@pytest.mark.parametrize("kind", CRD_KINDS, ids=ids)
def test_schema_is_structural(kind: Kind) -> None:
    text = render(kind)
    assert "$ref" not in text and "$defs" not in text and "title:" not in text
    assert "&id" not in text and "*id" not in text  # no YAML anchors
    for path, node in _nodes(_schema(kind)):
        free = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
            "x-kubernetes-int-or-string"
        )
        assert "type" in node or free, f"{path} has no type"
        if "anyOf" in node:  # only the int-or-string form is allowed
            assert node.get("x-kubernetes-int-or-string"), path
            assert all(set(s) == {"type"} for s in node["anyOf"]), path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert not isinstance(node.get("exclusiveMinimum"), float | int) or isinstance(
            node.get("exclusiveMinimum"), bool
        ), path
        if "x-kubernetes-validations" in node:
            assert node.get("type") == "object", path
        if node.get("type") == "array":  # bounds CEL cost and object size
            assert "maxItems" in node, f"{path} has no maxItems"
    # Free-form only where it truly is: affinity and the raw DeepSpeed config (whose sections
    # that declare refused keys stay free-form too).
    free_paths = [
        p for p, n in _nodes(_schema(kind)) if n.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert all(
        p.endswith((".affinity", ".deepspeed.config")) or ".deepspeed.config." in p
        for p in free_paths
    ), free_paths


def test_subresources_and_printer_columns() -> None:
    by_name = {k.name: crd(k)["spec"]["versions"][0] for k in CRD_KINDS}
    for version in by_name.values():
        assert version["subresources"]["status"] == {}
    assert by_name["ModelDeployment"]["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "scale" not in by_name["TrainingRun"]["subresources"]

    def columns(kind: str) -> list[str]:
        return [
            c["name"] for c in by_name[kind]["additionalPrinterColumns"] if not c.get("priority")
        ]

    assert columns("TrainingRun") == ["Phase", "Progress", "Loss", "Age"]
    assert columns("ModelDeployment") == ["Model", "Ready", "Endpoint", "Age"]
    assert columns("Dataset") == ["Phase", "Documents", "Tokens", "Age"]
    assert columns("TrainingSchedule") == ["Schedule", "Active", "Last-Run", "Age"]
    assert columns("Sweep") == ["Phase", "Done", "Max", "Best", "Age"]


def _apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """The API server's structural defaulting, enough for these schemas."""
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = _apply_defaults(value[name], sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_apply_defaults(item, schema["items"]) for item in value]
    return value


@pytest.mark.parametrize("kind", CRD_KINDS, ids=ids)
def test_server_defaults_equal_pydantic_defaults(kind: Kind) -> None:
    spec_schema = _schema(kind)["properties"]["spec"]
    defaulted = _apply_defaults(copy.deepcopy(MINIMAL[kind.name]), spec_schema)
    spec_model = KINDS[kind.name].model_fields["spec"].annotation
    assert spec_model is not None
    parsed = spec_model.model_validate(MINIMAL[kind.name])
    assert _normalize(defaulted) == _normalize(parsed.to_dict())


def _normalize(value: Any) -> Any:
    """JSON numbers: the server stores 0.0 as 0."""
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def test_cel_rules_have_messages() -> None:
    for kind in CRD_KINDS:
        for path, node in _nodes(_schema(kind)):
            for rule in node.get("x-kubernetes-validations", []):
                assert rule["rule"] and rule["message"], path
                if "fieldPath" in rule:  # must name a property of this object
                    first = rule["fieldPath"].lstrip(".").split(".")[0]
                    assert first in node["properties"], (path, rule)
