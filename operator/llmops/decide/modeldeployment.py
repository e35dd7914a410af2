"""ModelDeployment rules shared by the controller and the local runtime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmops.api.common import S3Location
from llmops.api.modeldeployment import ModelDeployment
from llmops.api.workload import (
    ADAPTER_SUBDIR,
    MODEL_INIT_STAGE,
    SERVER_CRASHED,
    SERVER_STAGE,
    FailureReport,
    read_record,
)
from llmops.builders.modeldeployment import ServedAdapter, gate_verdict
from llmops.decide.status import StatusDraft, failure_report


def resolve_model(
    md: ModelDeployment, run_name: str | None, policy: str, run: Mapping[str, Any] | None
) -> tuple[str | None, str]:
    """(model uri, what to call it in status), or (None, why not yet) for a TrainingRun
    that has nothing to serve."""
    source = md.spec.model
    if source.uri:
        return source.uri, source.uri
    if run is None:
        return None, f"TrainingRun {run_name!r} not found"
    status = run.get("status") or {}
    checkpoints = status.get("checkpoints") or {}
    if policy == "pinned":
        assert source.training_run is not None and source.training_run.checkpoint
        latest = (checkpoints.get("latest") or {}).get("uri") or status.get("modelUri")
        if not latest:
            return None, f"TrainingRun {run_name!r} has no checkpoints yet"
        base = latest.rsplit("/", 1)[0]
        return (
            f"{base}/{source.training_run.checkpoint}",
            f"{run_name}/{source.training_run.checkpoint}",
        )
    if policy == "latest" and status.get("phase") == "Succeeded" and status.get("modelUri"):
        return status["modelUri"], f"{run_name}/final"
    if needs_export(md, run):
        # vLLM, and the built-in engine for a transformers run, load exported models only
        # (config.json and safetensors), never DeepSpeed checkpoints.
        return None, f"TrainingRun {run_name!r} has not exported its final model yet"
    chosen = checkpoints.get(policy)
    if not chosen:
        return None, f"TrainingRun {run_name!r} has no {policy} checkpoint yet"
    return chosen["uri"], f"{run_name}/{chosen.get('name', chosen['uri'].rsplit('/', 1)[-1])}"


def needs_export(md: ModelDeployment, run: Mapping[str, Any]) -> bool:
    """Whether only the run's exported model can be served (not one of its checkpoints)."""
    model = (run.get("spec") or {}).get("model") or {}
    transformers_run = "pretrained" in model or model.get("architecture") == "llama"
    return md.spec.runtime == "vllm" or transformers_run


@dataclass
class Adapters:
    """The adapters to serve now and what the status says of the others."""

    ready: list[ServedAdapter] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # not served yet, and why
    held: list[str] = field(default_factory=list)  # a newer version its gate holds back
    evaluations: dict[str, Any] = field(default_factory=dict)  # name -> served evaluation


def resolve_adapters(
    md: ModelDeployment,
    runs: Mapping[str, Mapping[str, Any] | None],
    served: Sequence[Mapping[str, Any]] = (),
) -> Adapters:
    """The adapters that can be served now, and why the others cannot yet. `runs` holds the
    TrainingRuns the adapters name (None: not found); `served` is status.servedAdapters,
    the versions given to the replicas so far: kept while no newer one can be served, and
    what a gate compares a newer one with."""
    found = Adapters()
    before = {entry["name"]: entry for entry in served}
    for adapter in md.spec.adapters:
        if adapter.uri is not None:
            found.ready.append(ServedAdapter(adapter.name, adapter.uri, None))
            continue
        assert adapter.training_run is not None
        run_name = adapter.training_run.name
        run = runs.get(run_name)
        lora = ((run or {}).get("spec") or {}).get("adapter")
        candidate: tuple[str, str] | None = None
        if run is None:
            why = f"TrainingRun {run_name!r} not found"
        elif lora is None:
            why = f"TrainingRun {run_name!r} has no spec.adapter"
        else:
            candidate, why = _adapter_version(adapter.policy, run_name, run)
        previous = before.get(adapter.name)
        if run is None or lora is None or candidate is None:
            if previous is None:
                found.waiting.append(f"adapter {adapter.name}: {why}")
            else:  # keep what is served until a version shows up
                found.ready.append(_served_again(adapter.name, previous))
                found.evaluations[adapter.name] = previous.get("evaluation")
            continue
        uri, source = candidate
        evaluation = ((run or {}).get("status") or {}).get("finalEvaluation")
        if adapter.gate is not None and previous is not None and previous.get("uri") != uri:
            verdict = gate_verdict(adapter.gate, evaluation, previous.get("evaluation"))
            if verdict:
                found.held.append(f"adapter {adapter.name}: {source}: {verdict}")
                found.ready.append(_served_again(adapter.name, previous))
                found.evaluations[adapter.name] = previous.get("evaluation")
                continue
        rank = int((lora or {}).get("rank") or 8)
        found.ready.append(ServedAdapter(adapter.name, uri, rank, source))
        found.evaluations[adapter.name] = evaluation
    return found


def _adapter_version(
    policy: str, run_name: str, run: Mapping[str, Any]
) -> tuple[tuple[str, str] | None, str]:
    """(folder uri, what to call it) of the run's adapter the policy picks, or (None, why
    there is none yet). A run's output holds adapter/ (beside model/ when merged); each of
    its checkpoints holds the adapter of that step in the same layout."""
    status = run.get("status") or {}
    finished = status.get("phase") == "Succeeded" and status.get("modelUri")
    output = str(status.get("modelUri") or "").rsplit("/", 1)[0]
    final = (f"{output}/{ADAPTER_SUBDIR}", f"{run_name}/final")
    if policy == "final" or (policy == "latest" and finished):
        return (final, "") if finished else (None, f"TrainingRun {run_name!r} has not finished")
    chosen = (status.get("checkpoints") or {}).get(policy)
    if chosen and chosen.get("uri"):
        name = chosen.get("name") or str(chosen["uri"]).rsplit("/", 1)[-1]
        return (f"{chosen['uri']}/{ADAPTER_SUBDIR}", f"{run_name}/{name}"), ""
    if finished:
        return final, ""
    return None, f"TrainingRun {run_name!r} has no {policy} checkpoint yet"


def _served_again(name: str, entry: Mapping[str, Any]) -> ServedAdapter:
    return ServedAdapter(name, str(entry["uri"]), entry.get("rank"), entry.get("source"))


def report_adapters(status: StatusDraft, md: ModelDeployment, adapters: Adapters) -> None:
    """`status.adapters` names what is served and `servedAdapters` which version;
    AdaptersReady says what is still missing or held back (the base and the ready adapters
    are served meanwhile)."""
    if not md.spec.adapters:
        return
    status.set(
        adapters=[a.name for a in adapters.ready],
        servedAdapters=[
            {
                "name": a.name,
                "source": a.source or a.uri,
                "uri": a.uri,
                **({"rank": a.rank} if a.rank else {}),
                **(
                    {"evaluation": adapters.evaluations[a.name]}
                    if adapters.evaluations.get(a.name)
                    else {}
                ),
            }
            for a in adapters.ready
        ],
    )
    if adapters.waiting:
        message = "; ".join(adapters.waiting + adapters.held)
        status.condition("AdaptersReady", "False", "WaitingForAdapter", message)
    elif adapters.held:
        status.condition("AdaptersReady", "True", "HeldBackByGate", "; ".join(adapters.held))
    else:
        count = len(adapters.ready)
        status.condition("AdaptersReady", "True", "AdaptersServed", f"{count} adapter(s)")


def model_store(run: Mapping[str, Any] | None) -> S3Location | None:
    """The bucket (endpoint, credentials) a TrainingRun keeps its checkpoints in, for
    serving an s3:// model of it."""
    storage = (((run or {}).get("spec") or {}).get("checkpointing") or {}).get("storage") or {}
    return S3Location.model_validate(storage["s3"]) if storage.get("s3") else None


LOG_TAIL_CHARS = 600  # of a crashed server's log, in the Degraded condition's message


def server_failure(pods: Sequence[Mapping[str, Any]]) -> FailureReport | None:
    """Why a replica does not serve: its model download failed (the model-init container's
    report), or its server container stopped (now or before its restart) with the
    FailureReport the built-in server left, or else the end of its log (vLLM, an OOM kill)
    as ServerCrashed. A drained server exits 0, and a ready one's old crash is history."""
    fetch = failure_report(pods, MODEL_INIT_STAGE)
    if fetch is not None:
        return fetch
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            if container.get("name") != "server" or container.get("ready"):
                continue
            for state in ("state", "lastState"):
                terminated = (container.get(state) or {}).get("terminated") or {}
                code = terminated.get("exitCode", 0)
                if not code:
                    continue
                message = str(terminated.get("message") or "")
                report = read_record(FailureReport, message)
                if report is not None and report.stage == SERVER_STAGE:
                    return report
                why = f"exit code {code}"
                if terminated.get("reason"):
                    why += f" ({terminated['reason']})"
                tail = message.strip()[-LOG_TAIL_CHARS:]
                return FailureReport(
                    stage=SERVER_STAGE,
                    reason=SERVER_CRASHED,
                    message=f"{why}: {tail}" if tail else why,
                )
    return None


def _deployment_condition(deployment: Mapping[str, Any], type_: str) -> dict[str, Any]:
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_:
            return dict(condition)
    return {}


def report_rollout(
    status: StatusDraft,
    desired: int,
    deployment: Mapping[str, Any],
    described: str,
    held_back: str | None,
    failure: FailureReport | None,
) -> None:
    """Replica counts and the Degraded, Progressing, Available and Ready conditions from the
    server Deployment's status (and why its server stopped, when it did)."""
    observed = deployment.get("status") or {}
    ready = int(observed.get("readyReplicas") or 0)
    updated = int(observed.get("updatedReplicas") or 0)
    status.set(
        replicas=int(observed.get("replicas") or 0),
        readyReplicas=ready,
        updatedReplicas=updated,
        checkpoint=described,
    )
    available = _deployment_condition(deployment, "Available").get("status") == "True"
    progressing = _deployment_condition(deployment, "Progressing")
    rolled_out = (
        updated == desired
        and ready == desired
        and observed.get("observedGeneration") == deployment["metadata"]["generation"]
    )
    if failure is not None:
        status.condition("Degraded", "True", failure.reason, failure.message)
    elif progressing.get("reason") == "ProgressDeadlineExceeded":
        status.condition(
            "Degraded", "True", "ProgressDeadlineExceeded", progressing.get("message", "")
        )
    elif desired and ready < desired and available:
        status.condition("Degraded", "True", "ReplicasUnavailable", f"{ready}/{desired} ready")
    else:
        status.condition("Degraded", "False", "AsExpected")
    if held_back and rolled_out:
        status.condition("Progressing", "False", "HeldBackByGate", held_back)
    elif rolled_out:
        status.condition("Progressing", "False", "RolloutComplete", f"serving {described}")
    else:
        status.condition(
            "Progressing",
            "True",
            "RollingOut",
            f"{updated}/{desired} updated, {ready}/{desired} ready",
        )
    if desired == 0:
        status.set(phase="Ready")
        status.condition("Available", "True", "ScaledToZero", "no replicas requested")
    elif available and ready > 0:
        status.set(phase="Ready" if rolled_out else "Deploying")
        status.condition(
            "Available", "True", "MinimumReplicasAvailable", f"{ready}/{desired} replicas ready"
        )
    else:
        status.set(phase="Deploying")
        status.condition("Available", "False", "WaitingForReplicas", f"{ready}/{desired} ready")
    status.condition(
        "Ready",
        "True" if status.phase == "Ready" else "False",
        "Ready" if status.phase == "Ready" else "NotReady",
    )
