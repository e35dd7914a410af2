"""The TrainingRun rules as pure decisions, and the contract's promise that every status field
the operator shows is produced by the trainer's records."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from llmops.api.trainingrun import (
    BenchmarkScore,
    CheckpointInfo,
    FinalEvaluation,
    TrainingMetrics,
    TrainingRun,
    TrainingRunStatus,
)
from llmops.api.workload import (
    COMPLETION_INDEX_ANNOTATION,
    FinalReport,
    TrainerReport,
    ValidationScores,
    parse_progress_line,
    progress_log_line,
    read_record,
)
from llmops.builders import sweep as sweep_build
from llmops.decide import trainingrun as decide
from llmops_trainer.progress import ProgressState, progress_record, trainer_report

pytestmark = pytest.mark.unit

NOW = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.UTC)
DATASET = {
    "kind": "Dataset",
    "metadata": {"name": "corpus"},
    "status": {
        "outputUri": "pvc://corpus-data/g1",
        "conditions": [{"type": "Complete", "status": "True"}],
    },
}


def run_body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "gpt", "namespace": "ml", "uid": "u1", "generation": 1},
        "spec": {
            "datasetRef": {"name": "corpus"},
            "hyperparameters": {"maxSteps": 10},
            "resources": {"numNodes": 2},
            **spec,
        },
    }


def job(*conditions: dict[str, str], suspend: bool = False) -> dict[str, Any]:
    return {"spec": {"suspend": suspend}, "status": {"conditions": list(conditions)}}


def pod(index: int, phase: str = "Running", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": f"p{index}", "annotations": {COMPLETION_INDEX_ANNOTATION: str(index)}},
        "status": {"phase": phase, **status},
    }


def decided(
    body: dict[str, Any], status: TrainingRunStatus | None = None, **observed: Any
) -> decide.Decision:
    run = TrainingRun.model_validate(body)
    found = decide.Observed(body=body, dataset=observed.pop("dataset", DATASET), **observed)
    return decide.decide(run, status or TrainingRunStatus(), found, NOW)


def condition(decision: decide.Decision, type_: str) -> tuple[str, str]:
    found = next(c for c in decision.status.conditions if c.type == type_)
    return found.status, found.reason


def full_state() -> ProgressState:
    """A trainer that logged a step (of a Dataset mixing plain text and supervised records),
    validated with every metric and checkpointed."""
    state = ProgressState(step=20, consumed_samples=160)
    state.history.append(
        {"step": 20, "trainLoss": 2.0, "learningRate": 1e-3, "gradNorm": 0.5,
         "tokensPerSecond": 900.0, "mfu": 0.3, "trainLossText": 2.2,
         "trainLossSupervised": 1.8}
    )  # fmt: skip
    state.validation = ValidationScores(
        loss=2.1, perplexity=8.2, accuracy=0.4, bleu=12.0, loss_text=2.3, loss_supervised=1.9
    )
    state.checkpointed("step-20")
    return state


def test_every_metric_and_checkpoint_field_is_produced_by_the_trainer_records() -> None:
    record = progress_record(full_state(), "Training", total_steps=100, num_samples=1000)
    # The record crosses the boundary as a log line and is read back by the same model.
    wire = parse_progress_line(progress_log_line(record))
    assert wire == record
    decision = decided(run_body(), job=job(), pods=[pod(0), pod(1)], progress=wire)
    status = decision.status
    assert status.metrics is not None and status.checkpoints is not None
    for name in TrainingMetrics.model_fields:
        assert getattr(status.metrics, name) is not None, f"metrics.{name} is never produced"
    for info in (status.checkpoints.latest, status.checkpoints.best):
        assert info is not None
        for name in CheckpointInfo.model_fields:
            assert getattr(info, name) is not None, f"checkpoint {name} is never produced"


def test_every_final_evaluation_field_is_produced_by_the_trainer_report() -> None:
    final = FinalReport(
        stop_reason="Completed",
        steps=20,
        split="test",
        loss=2.0,
        perplexity=7.4,
        accuracy=0.41,
        bleu=13.0,
        benchmarks=[BenchmarkScore(name="mc", metric="acc", value=0.5, samples=10)],
    )
    report = read_record(TrainerReport, trainer_report(full_state(), final).to_json())
    assert report is not None
    complete = job({"type": "Complete", "status": "True"})
    decision = decided(run_body(), job=complete, pods=[pod(0, "Succeeded")], report=report)
    evaluation = decision.status.final_evaluation
    assert decision.status.phase == "Succeeded" and evaluation is not None
    for name in FinalEvaluation.model_fields:
        assert getattr(evaluation, name) is not None, f"finalEvaluation.{name} is never produced"
    assert decision.status.model_uri == "pvc://gpt-checkpoints/output/model"


@pytest.mark.parametrize("metric", ["accuracy", "validationLoss", "perplexity", "trainLoss"])
def test_a_sweep_objective_reads_a_value_the_trainer_reported(metric: str) -> None:
    record = progress_record(full_state(), "Completed", total_steps=20, num_samples=1000)
    decision = decided(run_body(), job=job(), pods=[pod(0), pod(1)], progress=record)
    trial = run_body()
    trial["metadata"]["labels"] = {sweep_build.INDEX_LABEL: "0"}
    trial["status"] = {**decision.status.to_dict(), "phase": "Succeeded"}
    trial["status"]["conditions"] = [{"type": "Complete", "status": "True"}]
    assert sweep_build.observe(trial, metric, None).trial.value is not None


def test_waits_for_the_dataset_and_creates_nothing() -> None:
    decision = decided(run_body(), dataset=None)
    assert decision.children == [] and decision.status.phase == "Pending"
    assert condition(decision, "Created") == ("False", "DatasetNotFound")


def test_a_run_suspended_while_waiting_says_suspended_and_resumes_waiting() -> None:
    """A sweep that stops suspends trials that never started: they must not look Pending."""
    suspended = decided(run_body(suspend=True), dataset=None)
    assert suspended.children == [] and suspended.status.phase == "Suspended"
    assert condition(suspended, "Suspended") == ("True", "Suspended")
    assert condition(suspended, "Created") == ("False", "DatasetNotFound")

    resumed = decided(run_body(), suspended.status, dataset=None)
    assert resumed.status.phase == "Pending"
    assert condition(resumed, "Suspended") == ("False", "Resumed")


def test_creates_the_gang_then_runs_with_the_leaders_progress() -> None:
    first = decided(run_body())
    kinds = [c.manifest["kind"] for c in first.children]
    assert kinds == ["ConfigMap", "Service", "PersistentVolumeClaim", "Job"]
    assert first.job_name == "gpt-workers-0" and condition(first, "Running")[1] == "WaitingForGang"
    running = decided(run_body(), first.status, job=job(), pods=[pod(0), pod(1)])
    assert running.status.phase == "Running" and running.status.accounted_until == NOW


def test_a_failed_member_restarts_the_gang_and_a_preempted_one_is_not_counted() -> None:
    failed = job({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"})
    crash = decided(run_body(), job=failed, pods=[pod(0, "Failed")])
    assert crash.delete_job and crash.restarted and crash.status.restart_count == 1
    assert decide.job_name(TrainingRun.model_validate(run_body()), crash.status) == "gpt-workers-1"
    evicted = pod(1, "Failed", conditions=[{"type": "DisruptionTarget", "status": "True"}])
    preempted = decided(run_body(), job=failed, pods=[pod(0), evicted])
    assert preempted.status.preemption_count == 1 and preempted.status.restart_count == 0
    assert condition(preempted, "Restarting") == ("True", "Preempted")
    assert ("Warning", "Preempted") in [(e.type, e.reason) for e in preempted.events]
    spent = TrainingRunStatus(restart_count=3)
    final = decided(run_body(maxRestarts=3), spent, job=failed, pods=[pod(0, "Failed")])
    assert final.status.phase == "Failed" and not final.delete_job
    assert condition(final, "Failed") == ("True", "MaxRestartsExceeded")


def test_budget_suspends_the_job_and_a_deadline_deletes_it() -> None:
    started = TrainingRunStatus(start_time=NOW - datetime.timedelta(hours=2))
    body = run_body(budget={"maxWallTimeSeconds": 3600})
    budget = decided(body, started, job=job(), pods=[pod(0), pod(1)])
    assert budget.suspend_job is True and not budget.delete_job
    assert condition(budget, "Failed") == ("True", "BudgetExhausted")
    deadline = decided(run_body(activeDeadlineSeconds=60), started, job=job(), pods=[pod(0)])
    assert deadline.delete_job and condition(deadline, "Failed") == ("True", "DeadlineExceeded")


def test_kueue_admission_is_left_to_kueue() -> None:
    body = run_body(scheduling={"queueName": "team-a"})
    first = decided(body)
    gang = next(c.manifest for c in first.children if c.manifest["kind"] == "Job")
    assert gang["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    held = decided(body, first.status, job=job(suspend=True))  # suspended by Kueue's webhook
    assert held.suspend_job is None  # never unsuspended by the operator
    assert condition(held, "Running") == ("False", "WaitingForAdmission")
    assert held.status.phase == "Queued"
    why = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu"
    told = decided(body, first.status, job=job(suspend=True), workload=workload(pending=why))
    message = next(c.message for c in told.status.conditions if c.type == "Running")
    assert message == f"queued in Kueue LocalQueue 'team-a': {why}"
    assert told.workload_active is None and told.suspend_job is None
    # Without Kueue's Workload (no Kueue installed) the Job's own suspension is used.
    stop = run_body(scheduling={"queueName": "team-a"}, suspend=True)
    assert decided(stop, first.status, job=job(suspend=False)).suspend_job is True
    # A suspension the operator made (spec.suspend) is the operator's to lift.
    ours = job(suspend=True)
    ours["metadata"] = {"annotations": {decide.SUSPENDED_ANNOTATION: "true"}}
    assert decided(body, first.status, job=ours).suspend_job is False
    assert decide.job_patch(False)["metadata"]["annotations"] == {decide.SUSPENDED_ANNOTATION: None}


def workload(active: bool = True, pending: str = "", evicted: str = "") -> dict[str, Any]:
    """Kueue's Workload for the gang's Job."""
    conditions = [{"type": "QuotaReserved", "status": "False", "message": pending}]
    if evicted:
        conditions.append({"type": "Evicted", "status": "True", "message": evicted})
    return {
        "metadata": {"name": "job-gpt-workers-0-1a2b3"},
        "spec": {"active": active},
        "status": {"conditions": conditions},
    }


def test_a_kueue_managed_gang_is_suspended_through_its_workload() -> None:
    """Kueue unsuspends the Job of an admitted Workload whoever suspended it: a queued run
    is stopped and resumed by deactivating and activating its Workload, never its Job."""
    queued = {"queueName": "team-a"}
    running = decided(run_body(scheduling=queued), job=job(), pods=[pod(0), pod(1)]).status
    stop = decided(
        run_body(scheduling=queued, suspend=True), running, job=job(), workload=workload()
    )
    assert stop.suspend_job is None
    assert (stop.workload_name, stop.workload_active) == ("job-gpt-workers-0-1a2b3", False)
    # Kueue evicted it and suspended the Job: suspended, not queued, and not a preemption.
    evicted = workload(active=False, evicted="The workload is deactivated")
    stopped = decided(
        run_body(scheduling=queued, suspend=True), stop.status, job=job(suspend=True),
        workload=evicted,
    )  # fmt: skip
    assert stopped.status.phase == "Suspended" and stopped.workload_active is None
    assert not stopped.delete_job and stopped.status.preemption_count == 0
    resumed = decided(
        run_body(scheduling=queued), stopped.status, job=job(suspend=True), workload=evicted
    )
    assert resumed.workload_active is True and resumed.suspend_job is None
    assert resumed.status.phase == "Queued" and not resumed.delete_job
    # A spent budget stops a Kueue-managed gang the same way.
    budget = {"maxAcceleratorHours": 1.0}
    spent = TrainingRunStatus(phase="Running", accounted_until=NOW, accelerator_hours=1.0)
    over = decided(
        run_body(scheduling=queued, budget=budget), spent, job=job(), workload=workload()
    )
    assert over.status.phase == "Failed" and over.suspend_job is None
    assert over.workload_active is False


def test_kueue_taking_a_running_gang_back_is_a_preemption() -> None:
    """Kueue preempts (or evicts) an admitted gang by suspending its Job again: a restart
    from the latest checkpoint that spends no restart, the next attempt queued anew."""
    body = run_body(scheduling={"queueName": "team-a"}, maxRestarts=0)
    running = decided(body, job=job(), pods=[pod(0), pod(1)]).status
    assert running.phase == "Running"
    why = "Preempted to accommodate a workload (UID: 1234) due to prioritization"
    taken = decided(
        body, running, job=job(suspend=True), pods=[pod(0), pod(1)], workload=workload(evicted=why)
    )
    assert taken.delete_job and taken.restarted and taken.suspend_job is None
    assert (taken.status.preemption_count, taken.status.restart_count) == (1, 0)
    assert taken.status.phase == "Restarting"
    assert condition(taken, "Restarting") == ("True", "Preempted")
    assert why in next(c.message for c in taken.status.conditions if c.type == "Restarting")
    # The next attempt's Job, held by Kueue's webhook: queued, not preempted again.
    requeued = decided(body, taken.status, job=job(suspend=True))
    assert requeued.job_name == "gpt-workers-1" and not requeued.delete_job
    assert requeued.status.phase == "Queued" and requeued.status.preemption_count == 1


def test_a_finished_run_is_left_alone() -> None:
    done = TrainingRunStatus(phase="Succeeded")
    decision = decided(run_body(), done, job=job())
    assert decision.children == [] and decision.status == done and decision.events == []


def test_a_gang_that_ends_without_a_report_has_not_succeeded() -> None:
    complete = job({"type": "Complete", "status": "True"})
    decision = decided(run_body(), job=complete, pods=[pod(0, "Succeeded")], report=None)
    assert decision.status.phase == "Failed" and decision.status.model_uri is None
    assert condition(decision, "Failed") == ("True", "NoFinalReport")


def test_accelerator_hours_are_written_once_a_minute_and_when_the_gang_stops() -> None:
    running_job = job()
    pods = [pod(0), pod(1)]
    start = TrainingRunStatus(phase="Running", accounted_until=NOW, accelerator_hours=1.0)
    later = NOW + datetime.timedelta(seconds=20)
    run = TrainingRun.model_validate(run_body())
    found = decide.Observed(body=run_body(), dataset=DATASET, job=running_job, pods=pods)
    quiet = decide.decide(run, start, found, later)
    # 20 s in: nothing rewritten (the status stays as it was).
    assert quiet.status.accelerator_hours == 1.0 and quiet.status.accounted_until == NOW
    minute = decide.decide(run, start, found, NOW + datetime.timedelta(seconds=60))
    assert minute.status.accelerator_hours == pytest.approx(1.0 + 2 / 60)  # 2 pods, 1 min
    # The gang stops 20 s in: those 20 s are counted at once.
    failed = job({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"})
    done = decide.Observed(body=run_body(maxRestarts=0), dataset=DATASET, job=failed, pods=pods)
    stopped = decide.decide(TrainingRun.model_validate(run_body(maxRestarts=0)), start, done, later)
    assert stopped.status.phase == "Failed"
    assert stopped.status.accelerator_hours == pytest.approx(1.0 + 2 * 20 / 3600)


def test_pods_that_cannot_run_are_named_in_the_running_condition() -> None:
    unschedulable = pod(
        1,
        "Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": '0/3 nodes are available: persistentvolumeclaim "corpora" not found.',
            }
        ],
    )
    stuck = pod(
        0,
        "Pending",
        containerStatuses=[
            {
                "name": "trainer",
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "x"}},
            }
        ],
    )
    decision = decided(run_body(), job=job(), pods=[stuck, unschedulable])
    running = next(c for c in decision.status.conditions if c.type == "Running")
    assert running.reason == "GangNotSchedulable"
    assert "p0: ImagePullBackOff" in running.message and '"corpora" not found' in running.message
    found = decide.Observed(
        body=run_body(), dataset=DATASET, job=job(), job_warnings=["no PriorityClass x"]
    )
    created = decide.decide(TrainingRun.model_validate(run_body()), TrainingRunStatus(), found, NOW)
    assert "Job: no PriorityClass x" in condition_message(created, "Running")


def condition_message(decision: decide.Decision, type_: str) -> str:
    return next(c.message for c in decision.status.conditions if c.type == type_)


def test_an_error_a_restart_would_repeat_fails_at_once_and_a_crash_restarts() -> None:
    failed = job({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"})

    def crashed(message: str) -> dict[str, Any]:
        terminated = {"exitCode": 1, "message": message}
        return pod(0, "Failed", containerStatuses=[{"state": {"terminated": terminated}}])

    report = '{"stage": "train", "reason": "FinalEvaluationFailed", "message": "ValueError: x"}'
    decision = decided(run_body(), job=failed, pods=[crashed(report)])
    assert decision.status.phase == "Failed" and not decision.restarted
    assert condition(decision, "Failed") == ("True", "FinalEvaluationFailed")
    # No report (a killed process, a lost peer): the gang restarts.
    decision = decided(run_body(), job=failed, pods=[crashed("")])
    assert decision.restarted and decision.status.restart_count == 1


BIG_MODEL = {"numLayers": 32, "numHeads": 32, "hiddenSize": 4096, "contextLength": 2048}
DATASET_WITH_VOCAB = {**DATASET, "status": {**DATASET["status"], "vocabSize": 32000}}


def test_the_plan_is_a_condition_and_a_run_that_cannot_fit_its_named_gpus_never_starts() -> None:
    small = decided(run_body(), dataset=DATASET_WITH_VOCAB)
    assert condition(small, "Planned") == ("True", "Fits")
    assert "parameters" in condition_message(small, "Planned")

    # A 6.5B-parameter model, ZeRO-0 on one H100 named by the node selector: refused, with
    # the numbers, before any pod exists.
    h100 = {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    big = {
        "model": BIG_MODEL,
        "resources": {"numNodes": 1, "procsPerNode": 1, "gpusPerNode": 1},
        "deepspeed": {"zeroStage": 0},
    }
    refused = decided(run_body(**big, scheduling=h100), dataset=DATASET_WITH_VOCAB)
    assert refused.status.phase == "Failed" and refused.children == []
    assert condition(refused, "Failed") == ("True", "WillNotFit")
    assert "GiB" in condition_message(refused, "Failed")
    assert condition(refused, "Planned") == ("False", "DoesNotFit")

    # Without a named GPU the estimate only warns: the cluster's GPUs are not known here.
    warned = decided(run_body(**big), dataset=DATASET_WITH_VOCAB)
    assert warned.status.phase != "Failed" and warned.children
    assert condition(warned, "Planned") == ("False", "DoesNotFit")

    # A vocabulary not known yet leaves the size unknown, and the run goes ahead.
    unknown = decided(run_body(**big, scheduling=h100))
    assert condition(unknown, "Planned") == ("False", "SizeUnknown") and unknown.children


def test_a_small_cpu_run_in_a_small_pod_is_never_refused_by_the_estimate() -> None:
    cpu = {"resources": {"numNodes": 1, "cpu": "1", "memory": "1Gi"}}
    decision = decided(run_body(**cpu), dataset=DATASET_WITH_VOCAB)
    assert decision.status.phase != "Failed" and decision.children


def test_finishing_announces_the_transition_once() -> None:
    """Complete and Ready turn True with the same reason: one event, not two."""
    from llmops.decide.status import StatusDraft

    body = {"metadata": {"generation": 1}, "status": {"phase": "Running"}}
    draft = StatusDraft(body, "Sweep")
    draft.finish("Succeeded", "TrialsFinished", "4 trial(s) finished", NOW)
    assert [e.reason for e in draft.events] == ["TrialsFinished"]

    final = FinalReport(stop_reason="Completed", steps=20, split="test", loss=2.0)
    report = read_record(TrainerReport, trainer_report(full_state(), final).to_json())
    running = decided(run_body(), dataset=DATASET_WITH_VOCAB, job=job()).status
    complete = job({"type": "Complete", "status": "True"})
    done = decided(run_body(), running, job=complete, pods=[pod(0, "Succeeded")], report=report)
    assert done.status.phase == "Succeeded"
    assert [e.reason for e in done.events].count("TrainingComplete") == 1
