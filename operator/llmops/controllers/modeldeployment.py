"""ModelDeployment controller: resolves which model to serve, keeps the Deployment, Service,
PodDisruptionBudget and autoscaler in line with the spec, and reports availability."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import kopf

from llmops.api import API_VERSION
from llmops.api.modeldeployment import ModelDeployment
from llmops.api.workload import MODEL_URI_ANNOTATION
from llmops.builders import modeldeployment as build
from llmops.builders.common import user_reference
from llmops.controllers import common
from llmops.decide.modeldeployment import (
    model_store,
    report_adapters,
    report_rollout,
    resolve_adapters,
    resolve_model,
    server_failure,
)

KIND = "ModelDeployment"


def followed_run(md: ModelDeployment, namespace: str) -> tuple[str | None, str, str]:
    """(the TrainingRun to serve from, the checkpoint policy, why there is none yet): a
    schedule is followed to its newest succeeded run, a sweep to its best trial."""
    source = md.spec.model
    if source.training_run is not None:
        return source.training_run.name, source.training_run.policy, ""
    if source.training_schedule is not None:
        name = source.training_schedule.name
        owner = common.read_resource(API_VERSION, "TrainingSchedule", name, namespace)
        if owner is None:
            return None, "latest", f"TrainingSchedule {name!r} not found"
        run = (owner.get("status") or {}).get("lastSucceededRun")
        return run, "latest", "" if run else f"TrainingSchedule {name!r} has no finished run yet"
    # A sweep ranks trials by their final metrics, so the best trial's final model (its
    # latest checkpoint while it still runs) is what those metrics describe.
    assert source.sweep is not None
    name = source.sweep.name
    owner = common.read_resource(API_VERSION, "Sweep", name, namespace)
    if owner is None:
        return None, "latest", f"Sweep {name!r} not found"
    if ((owner.get("spec") or {}).get("crossValidation") or {}).get("folds"):
        # Each fold's model saw part of the data: a trial's score belongs to no one model.
        return (
            None,
            "latest",
            (
                f"Sweep {name!r} cross-validates: its trials have no single model to serve; "
                "train a TrainingRun with the best trial's parameters and serve that"
            ),
        )
    best = ((owner.get("status") or {}).get("bestTrial") or {}).get("name")
    return best, "latest", "" if best else f"Sweep {name!r} has no best trial yet"


def reconcile(body: Mapping[str, Any], patch: kopf.Patch) -> None:
    md = common.parse(ModelDeployment, body)
    status = common.StatusWriter(body, KIND)
    try:
        _reconcile(body, md, status)
    finally:
        status.write(patch)


def _reconcile(body: Mapping[str, Any], md: ModelDeployment, status: common.StatusWriter) -> None:
    namespace: str = body["metadata"]["namespace"]
    status.set(
        selector=build.selector_string(body),
        model=build.served_name(md),
        url=build.url(md, namespace),
    )
    chosen = _choose_model(body, md, status)
    if chosen is None:
        return
    deployment = _ensure_serving_objects(body, md, status, chosen)
    if deployment is None:
        return
    failure = None
    ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
    if md.spec.replicas and ready < md.spec.replicas:
        # Only while replicas are missing: a crash-looping server says why in its pods alone.
        selector = build.selector_string(body)
        pods = common.kube().list("v1", "Pod", namespace, label_selector=selector)
        failure = server_failure(pods)
    desired = md.spec.replicas
    report_rollout(status, desired, deployment, chosen.described, chosen.held_back, failure)


@dataclass
class ChosenModel:
    uri: str
    described: str  # the checkpoint as the status shows it
    run: dict[str, Any] | None  # the TrainingRun it comes from
    held_back: str | None  # why the gate keeps the served model instead of a newer one


def _choose_model(
    body: Mapping[str, Any], md: ModelDeployment, status: common.StatusWriter
) -> ChosenModel | None:
    """The model to serve: the source's (run, schedule, sweep or URI) unless the gate holds
    it back; the served one while none is there yet; None (waiting) before the first."""
    namespace: str = body["metadata"]["namespace"]
    run = None
    run_name, policy, waiting = None, "latest", ""
    if md.spec.model.uri is None:
        run_name, policy, waiting = followed_run(md, namespace)
        if run_name is not None:
            run = common.read_resource(API_VERSION, "TrainingRun", run_name, namespace)
    model_uri, described = (None, waiting) if waiting else resolve_model(md, run_name, policy, run)
    gate = md.spec.model.gate
    # What the Deployment serves now: needed only to keep it or to gate a change.
    serving = _current_model(namespace, md) if model_uri is None or gate else None
    held_back = None
    evaluation = (run or {}).get("status", {}).get("finalEvaluation")
    if model_uri is not None and gate is not None and serving and model_uri != serving:
        held_back = build.gate_verdict(gate, evaluation, status.status.get("servedEvaluation"))
        if held_back:
            held_back = f"{described}: {held_back}"
            if status.status.get("heldBack") != held_back:
                kopf.event(
                    cast(kopf.Body, body),
                    type="Warning",
                    reason="HeldBackByGate",
                    message=held_back,
                )
            model_uri, described = serving, status.status.get("checkpoint") or serving
    status.set(heldBack=held_back)
    if model_uri is None:
        if status.status.get("checkpoint") is None:
            status.set(phase="Pending")
            status.condition("Available", "False", "WaitingForModel", described)
            status.condition("Progressing", "False", "WaitingForModel", described)
            return None
        # Already serving something: keep it until the new model shows up.
        model_uri = serving
        if model_uri is None:
            return None
    elif not held_back:
        # What the gate compares the next model with: the evaluation of what is rolled out.
        status.set(servedRun=run_name, servedEvaluation=evaluation or None)
    return ChosenModel(model_uri, described, run, held_back)


def _ensure_serving_objects(
    body: Mapping[str, Any], md: ModelDeployment, status: common.StatusWriter, chosen: ChosenModel
) -> dict[str, Any] | None:
    """ConfigMap, Deployment, Service, PodDisruptionBudget and autoscaler; the Deployment as
    the API server has it, or None when the model source cannot be served."""
    namespace: str = body["metadata"]["namespace"]
    kube = common.kube()
    common.ensure_child(KIND, build.config_map(body))
    adapter_runs = {
        a.training_run.name: common.read_resource(
            API_VERSION, "TrainingRun", a.training_run.name, namespace
        )
        for a in md.spec.adapters
        if a.training_run is not None
    }
    served = status.status.get("servedAdapters") or ()
    adapters = resolve_adapters(md, adapter_runs, served)
    report_adapters(status, md, adapters)
    try:
        manifest = build.deployment(
            body, md, md.spec.replicas, chosen.uri, adapters.ready, model_store(chosen.run)
        )
    except ValueError as error:
        status.set(phase="Failed")
        status.condition("Degraded", "True", "UnsupportedModelSource", str(error))
        return None
    for uri in (chosen.uri, *(a.uri for a in adapters.ready)):
        keep_claim(body, uri, namespace)
    if md.spec.adapters and md.spec.runtime == "builtin":  # vLLM gets them as arguments
        # Written before the Deployment: a new pod reads the adapters it lists at start.
        common.ensure_child(KIND, build.adapters_config_map(body, adapters.ready))
    deployment = common.ensure_child(KIND, manifest)
    common.ensure_child(KIND, build.service(body, md))
    common.ensure_child(KIND, build.disruption_budget(body))
    scaler = build.autoscaler(body, md)
    for kind, api_version in (
        ("HorizontalPodAutoscaler", "autoscaling/v2"),
        ("ScaledObject", "keda.sh/v1alpha1"),
    ):
        if scaler is None or scaler["kind"] != kind:
            kube.delete(api_version, kind, f"{md.metadata.name}-autoscaler", namespace)
    if scaler is not None:
        common.ensure_child(KIND, scaler)
    return deployment


def _current_model(namespace: str, md: ModelDeployment) -> str | None:
    deployment = common.kube().get("apps/v1", "Deployment", f"{md.metadata.name}-server", namespace)
    if deployment is None:
        return None
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    uri: str | None = annotations.get(MODEL_URI_ANNOTATION)
    return uri


common.register(KIND, "modeldeployments", reconcile)


def keep_claim(body: Mapping[str, Any], uri: str, namespace: str) -> None:
    """A served checkpoint claim gets this ModelDeployment as a second owner: deleting the
    TrainingRun that made it then leaves it (and the model) until the deployment goes too."""
    if not uri.startswith("pvc://"):
        return
    name = uri.removeprefix("pvc://").split("/", 1)[0]
    kube = common.kube()
    claim = kube.get("v1", "PersistentVolumeClaim", name, namespace)
    if claim is None:
        return
    owners = list(claim["metadata"].get("ownerReferences") or [])
    if not owners or any(o.get("uid") == body["metadata"]["uid"] for o in owners):
        return  # not one the operator made (nothing deletes it), or already kept
    owners.append(user_reference(body))
    kube.patch(
        "v1", "PersistentVolumeClaim", name, namespace, {"metadata": {"ownerReferences": owners}}
    )
