"""The generated CRDs on a real API server: examples are admitted, invalid manifests are
rejected with a message naming the field, and discovery and OpenAPI document the API."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelet import PLURALS
from kubernetes import client
from kubernetes.client.rest import ApiException

from llmops.api import GROUP, VERSION

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((Path(__file__).parent / "invalid").glob("*.yaml"))


def _create(api: client.ApiClient, namespace: str, doc: dict[str, Any]) -> dict[str, Any]:
    # Strict field validation, as kubectl does by default: unknown fields are errors.
    result: dict[str, Any] = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURALS[doc["kind"]], doc, field_validation="Strict"
    )
    return result


def _expectation(path: Path) -> str:
    found = re.search(r"^# expect: (.+)$", path.read_text(), re.MULTILINE)
    assert found, f"{path.name} has no '# expect: <field>' line"
    return found.group(1).strip()


def _get(api: client.ApiClient, path: str, accept: str = "application/json") -> Any:
    """GET a raw API path (discovery, OpenAPI, tables) with the client's credentials."""
    request = api.param_serialize(
        "GET", path, header_params={"Accept": accept}, auth_settings=["BearerToken"]
    )
    response = api.call_api(*request)
    response.read()
    assert response.status == 200, response.data
    return json.loads(response.data)


def test_invalid_corpus_is_large_enough() -> None:
    assert len(INVALID) >= 30
    assert {yaml.safe_load(p.read_text())["kind"] for p in INVALID} == set(PLURALS)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_is_admitted(api_client: client.ApiClient, namespace: str, example: Path) -> None:
    for doc in yaml.safe_load_all(example.read_text()):
        created = _create(api_client, namespace, doc)
        assert created["metadata"]["uid"]
        # The server filled in the defaults the models document.
        if doc["kind"] == "TrainingRun":
            assert created["spec"]["deepspeed"]["offloadOptimizer"] == "none"
            assert created["spec"]["maxRestarts"] == doc["spec"].get("maxRestarts", 3)


def test_invalid_manifests_are_rejected_naming_the_field(
    api_client: client.ApiClient, namespace: str
) -> None:
    failures = []
    for path in INVALID:
        expected = _expectation(path)
        doc = yaml.safe_load(path.read_text())
        try:
            _create(api_client, namespace, doc)
        except ApiException as error:
            message = json.loads(error.body).get("message", "") if error.body else ""
            if error.status not in (400, 422) or expected not in message:
                failures.append(
                    f"{path.name}: HTTP {error.status}, wanted {expected!r} in {message}"
                )
        else:
            failures.append(f"{path.name}: admitted")
    assert not failures, "\n".join(failures)


def test_immutable_fields_cannot_change(api_client: client.ApiClient, namespace: str) -> None:
    doc = yaml.safe_load(next(p for p in INVALID if p.name == "tr-no-stop.yaml").read_text())
    doc["spec"]["hyperparameters"]["maxSteps"] = 10
    _create(api_client, namespace, doc)
    objects = client.CustomObjectsApi(api_client)
    for patch, field in (
        ({"spec": {"datasetRef": {"name": "other"}}}, "spec.datasetRef"),
        ({"spec": {"model": {"numLayers": 12}}}, "spec.model"),
    ):
        with pytest.raises(ApiException) as raised:
            objects.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, "trainingruns", doc["metadata"]["name"], patch
            )
        assert raised.value.status == 422
        assert field in json.loads(raised.value.body)["message"]
    # Everything else may change, e.g. suspending the run.
    objects.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "trainingruns",
        doc["metadata"]["name"],
        {"spec": {"suspend": True}},
    )


def test_discovery_lists_short_names_and_category(api_client: client.ApiClient) -> None:
    resources = {r["name"]: r for r in _get(api_client, f"/apis/{GROUP}/{VERSION}")["resources"]}
    for plural, short in (("datasets", "dset"), ("trainingruns", "tr"), ("modeldeployments", "md")):
        assert resources[plural]["shortNames"] == [short]
        assert resources[plural]["categories"] == ["llmops"]
        assert resources[plural]["namespaced"] is True
        assert f"{plural}/status" in resources
    assert "modeldeployments/scale" in resources


def test_short_names_are_not_taken_by_any_other_served_resource(
    api_client: client.ApiClient,
) -> None:
    """`kubectl get <short>` must reach our kind, not a built-in one of the pinned Kubernetes
    (`ds` is DaemonSets', which once hid Datasets from `kubectl get tr,ds,md`)."""
    ours = {
        short: r["name"]
        for r in _get(api_client, f"/apis/{GROUP}/{VERSION}")["resources"]
        for short in r.get("shortNames") or []
    }
    assert len(ours) == len(PLURALS)
    lists = [_get(api_client, "/api/v1")]
    for group in _get(api_client, "/apis")["groups"]:
        if group["name"] != GROUP:
            lists += [_get(api_client, f"/apis/{v['groupVersion']}") for v in group["versions"]]
    taken = {
        short: f"{r['name']} ({found.get('groupVersion')})"
        for found in lists
        for r in found["resources"]
        for short in r.get("shortNames") or []
    }
    assert "ds" in taken  # the check sees the built-ins
    clashes = {short: taken[short] for short in ours if short in taken}
    assert not clashes, f"short names also served by: {clashes}"


def test_openapi_documents_every_field_in_depth(api_client: client.ApiClient) -> None:
    """What `kubectl explain trainingrun.spec.hyperparameters.learningRate` reads."""
    document = _get(api_client, f"/openapi/v3/apis/{GROUP}/{VERSION}")
    schemas = document["components"]["schemas"]
    for kind in PLURALS:
        schema = schemas[f"dev.llmops.{VERSION}.{kind}"]
        undocumented = list(_undocumented(schema["properties"]["spec"], "spec"))
        undocumented += list(_undocumented(schema["properties"]["status"], "status"))
        assert not undocumented, f"{kind}: {undocumented}"
    spec = schemas[f"dev.llmops.{VERSION}.TrainingRun"]["properties"]["spec"]
    lr = spec["properties"]["hyperparameters"]["properties"]["learningRate"]
    assert lr["description"] == "Peak learning rate."
    assert lr["default"] == 0.0003
    near = schemas[f"dev.llmops.{VERSION}.Dataset"]["properties"]["spec"]["properties"][
        "processing"
    ]["properties"]["deduplication"]["properties"]["near"]["properties"]
    assert "MinHash" in near["numPermutations"]["description"]


def _undocumented(schema: dict[str, Any], path: str) -> Any:
    for name, sub in schema.get("properties", {}).items():
        if not sub.get("description"):
            yield f"{path}.{name}"
        yield from _undocumented(sub, f"{path}.{name}")
    items = schema.get("items")
    if isinstance(items, dict):
        yield from _undocumented(items, f"{path}[]")


def test_printer_columns_read_the_status(api_client: client.ApiClient, namespace: str) -> None:
    """`kubectl get tr` shows phase, progress and loss from the status subresource."""
    doc = yaml.safe_load(next(p for p in INVALID if p.name == "tr-no-stop.yaml").read_text())
    doc["spec"]["hyperparameters"]["maxSteps"] = 10
    _create(api_client, namespace, doc)
    objects = client.CustomObjectsApi(api_client)
    name = doc["metadata"]["name"]
    status = {"phase": "Running", "progress": 40, "metrics": {"trainLoss": 2.5}}
    objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "trainingruns", name, {"status": status}
    )
    parsed = _get(
        api_client,
        f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/trainingruns/{name}",
        accept="application/json;as=Table;v=v1;g=meta.k8s.io",
    )
    columns = [c["name"] for c in parsed["columnDefinitions"]]
    row = dict(zip(columns, parsed["rows"][0]["cells"], strict=True))
    assert row["Phase"] == "Running"
    assert row["Progress"] == 40
    assert row["Loss"] == 2.5


def test_conditions_are_metav1_shaped(api_client: client.ApiClient, namespace: str) -> None:
    """`kubectl wait --for=condition=Complete` reads status.conditions; the schema keeps them
    in metav1.Condition shape, one per type."""
    doc = yaml.safe_load(next(p for p in INVALID if p.name == "tr-no-stop.yaml").read_text())
    doc["spec"]["hyperparameters"]["maxSteps"] = 10
    _create(api_client, namespace, doc)
    objects = client.CustomObjectsApi(api_client)
    name = doc["metadata"]["name"]
    complete = {
        "type": "Complete",
        "status": "True",
        "reason": "TrainingSucceeded",
        "message": "reached maxSteps",
        "lastTransitionTime": "2025-01-01T00:00:00Z",
        "observedGeneration": 1,
    }
    updated = objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "trainingruns", name, {"status": {"conditions": [complete]}}
    )
    assert updated["status"]["conditions"] == [complete]
    for bad, field in (
        ({**complete, "status": "Yes"}, "status.conditions[0].status"),
        ({**complete, "reason": "not a reason"}, "status.conditions[0].reason"),
    ):
        with pytest.raises(ApiException) as raised:
            objects.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, "trainingruns", name, {"status": {"conditions": [bad]}}
            )
        assert raised.value.status == 422
        assert field in json.loads(raised.value.body)["message"]
