"""The manifests of a run: validated with the API models (errors name the field) and ordered
by their references, Dataset -> TrainingRun and Sweep -> ModelDeployment."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from llmops.api import API_VERSION, KINDS
from llmops.local.state import DEFAULT_NAMESPACE

Key = tuple[str, str, str]
RANK = {"Dataset": 0, "TrainingRun": 1, "Sweep": 1, "ModelDeployment": 2}


class InvalidManifests(ValueError):
    """One or more manifests would be rejected at admission; nothing was started."""


def describe(doc: Mapping[str, Any]) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name', '<no name>')}"


def _errors(error: ValidationError) -> list[str]:
    found = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        found.append(f"{where}: {item['msg']}" if where else item["msg"])
    return found


def validate(documents: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """(llmops resources, descriptions of other objects that are not run locally)."""
    resources: list[dict[str, Any]] = []
    skipped: list[str] = []
    problems: list[str] = []
    seen: set[Key] = set()
    for doc in documents:
        kind = doc.get("kind")
        if str(doc.get("apiVersion", "")).split("/")[0] != API_VERSION.split("/")[0]:
            skipped.append(describe(doc))
            continue
        model = KINDS.get(str(kind))
        if model is None or doc.get("apiVersion") != API_VERSION:
            problems.append(f"{describe(doc)}: no kind {kind!r} in {doc.get('apiVersion')}")
            continue
        if kind not in RANK:
            problems.append(
                f"{describe(doc)}: a {kind} needs a cluster (the local runtime runs "
                f"{', '.join(RANK)}); apply it with kubectl to a cluster running the operator"
            )
            continue
        try:
            model.model_validate(
                {k: doc[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in doc}
            )
        except ValidationError as error:
            problems += [f"{describe(doc)}: {line}" for line in _errors(error)]
            continue
        key = key_of(doc)
        if key in seen:
            problems.append(f"{describe(doc)}: defined twice")
        seen.add(key)
        resources.append(doc)
    if problems:
        raise InvalidManifests("\n".join(problems))
    return resources, skipped


def key_of(doc: Mapping[str, Any]) -> Key:
    meta = doc.get("metadata") or {}
    return str(doc["kind"]), str(meta.get("namespace") or DEFAULT_NAMESPACE), str(meta["name"])


def references(doc: Mapping[str, Any]) -> list[Key]:
    """The resources this one needs finished first."""
    _, namespace, _ = key_of(doc)
    spec = doc.get("spec") or {}
    refs: list[Key] = []
    if doc["kind"] == "Dataset":
        ref = (spec.get("tokenizer") or {}).get("datasetRef")
        if ref:
            refs.append(("Dataset", namespace, ref["name"]))
        # Language models it asks (pseudoLabel, augmentation.llm): served first.
        endpoints = [
            (s.get("pseudoLabel") or {}).get("endpoint") for s in spec.get("sources") or []
        ]
        llm = ((spec.get("processing") or {}).get("augmentation") or {}).get("llm") or {}
        endpoints.append(llm.get("endpoint"))
        for endpoint in endpoints:
            deployment = (endpoint or {}).get("modelDeployment")
            if deployment and ("ModelDeployment", namespace, deployment["name"]) not in refs:
                refs.append(("ModelDeployment", namespace, deployment["name"]))
    elif doc["kind"] == "TrainingRun":
        refs.append(("Dataset", namespace, spec["datasetRef"]["name"]))
        parent = (spec.get("init") or {}).get("trainingRun")
        if parent:
            refs.append(("TrainingRun", namespace, parent["name"]))
    elif doc["kind"] == "Sweep":
        template = spec.get("template") or {}
        refs.append(("Dataset", namespace, template["datasetRef"]["name"]))
        parent = (template.get("init") or {}).get("trainingRun")
        if parent:
            refs.append(("TrainingRun", namespace, parent["name"]))
    elif doc["kind"] == "ModelDeployment":
        run = (spec.get("model") or {}).get("trainingRun")
        if run:
            refs.append(("TrainingRun", namespace, run["name"]))
    return refs


def order(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each resource after those it refers to (references outside the set are looked up in
    the state directory at run time); otherwise by kind, then as written."""
    by_key = {key_of(doc): doc for doc in resources}
    position = {key: i for i, key in enumerate(by_key)}
    done: list[dict[str, Any]] = []
    state: dict[Key, str] = {}

    def visit(key: Key, path: list[Key]) -> None:
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            cycle = " -> ".join(f"{k[0]}/{k[2]}" for k in [*path, key])
            raise InvalidManifests(f"references form a cycle: {cycle}")
        state[key] = "visiting"
        for ref in references(by_key[key]):
            if ref in by_key:
                visit(ref, [*path, key])
        state[key] = "done"
        done.append(by_key[key])

    for key in sorted(by_key, key=lambda k: (RANK[k[0]], position[k])):
        visit(key, [])
    return done


def config_maps(documents: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The ConfigMaps among the documents, by (namespace, name): the local runtime mounts
    them where a resource's pods name one (benchmark task folders, for one)."""
    return {
        key_of(doc)[1:]: doc
        for doc in documents
        if doc.get("apiVersion") == "v1" and doc.get("kind") == "ConfigMap"
    }


def secrets(documents: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, str]]:
    """The Secrets among the documents, by (namespace, name): their keys and decoded values
    (`data` is base64, `stringData` plain, as the API server merges them), for the pods that
    mount them or name them in env."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    for doc in documents:
        if doc.get("apiVersion") != "v1" or doc.get("kind") != "Secret":
            continue
        values = {}
        for key, encoded in (doc.get("data") or {}).items():
            try:
                values[key] = base64.b64decode(str(encoded), validate=True).decode()
            except (ValueError, UnicodeDecodeError) as error:
                raise InvalidManifests(f"{describe(doc)}: data.{key} is not base64 text") from error
        values.update({k: str(v) for k, v in (doc.get("stringData") or {}).items()})
        found[key_of(doc)[1:]] = values
    return found
