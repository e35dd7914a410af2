"""Benchmark evaluation (lm-evaluation-harness) without running it: the API's rules, the task
folders the builder gives the pods, the report -> status step, the ModelDeployment gate on a
benchmark score, and the trainer's reading of lm-eval's output."""

from __future__ import annotations

import copy
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from llmops.api.modeldeployment import EvaluationGate, ModelDeployment
from llmops.api.trainingrun import Benchmark, BenchmarkScore, TrainingRun, TrainingRunStatus
from llmops.api.workload import (
    COMPLETION_INDEX_ANNOTATION,
    BenchmarkResult,
    Env,
    FinalReport,
    TrainerReport,
    read_record,
    trainer_env,
)
from llmops.builders import trainingrun as tr_build
from llmops.builders.modeldeployment import gate_verdict
from llmops.crdgen import openapi_schema
from llmops.decide import trainingrun as decide
from llmops_trainer import benchmarks, model_card
from llmops_trainer.progress import ProgressState, trainer_report
from llmops_trainer.termination import LIMIT

pytestmark = pytest.mark.unit

NOW = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.UTC)
BENCHMARKS = [
    {"name": "tiny_mc", "tasks": {"configMap": {"name": "tiny-mc"}}, "numFewshot": 0},
    {"name": "arc_local", "tasks": {"path": "pvc://evals/tasks/arc"}, "limit": 200},
    {
        "name": "mmlu_local",
        "tasks": {
            "path": "s3://evals/mmlu",
            "endpoint": "http://minio:9000",
            "credentialsSecret": {"name": "minio"},
        },
        "metric": "acc_norm",
    },
    {"name": "in_image", "tasks": {"path": "/opt/tasks"}},
]


def run_body(benchmarks: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "gpt", "namespace": "ml", "uid": "u1", "generation": 1},
        "spec": {
            "datasetRef": {"name": "corpus"},
            "hyperparameters": {"maxSteps": 10},
            "evaluation": {
                "benchmarks": copy.deepcopy(BENCHMARKS if benchmarks is None else benchmarks)
            },
            **spec,
        },
    }


# -- API ---------------------------------------------------------------------------------------


def test_benchmarks_parse_with_defaults() -> None:
    run = TrainingRun.model_validate(run_body())
    first, second, third, _ = run.spec.evaluation.benchmarks
    assert first.metric == "acc" and first.num_fewshot == 0 and first.limit is None
    assert first.tasks.config_map is not None and first.tasks.config_map.name == "tiny-mc"
    assert second.limit == 200 and third.metric == "acc_norm"
    assert TrainingRun.model_validate(run.to_dict()) == run  # round trip


@pytest.mark.parametrize(
    ("benchmark", "field", "message"),
    [
        (
            {"name": "x", "tasks": {"path": "/t", "configMap": {"name": "t"}}},
            "tasks",
            "exactly one of path or configMap",
        ),
        ({"name": "x", "tasks": {}}, "tasks", "exactly one of path or configMap"),
        (
            {"name": "x", "tasks": {"path": "/t", "endpoint": "http://minio"}},
            "endpoint",
            "endpoint applies only to an s3:// path",
        ),
        (
            {
                "name": "x",
                "tasks": {"configMap": {"name": "t"}, "credentialsSecret": {"name": "s"}},
            },
            "credentialsSecret",
            "credentialsSecret applies only to an s3:// path",
        ),
        ({"name": "x", "tasks": {"path": "https://example.com/t"}}, "path", "pattern"),
        ({"name": "-x", "tasks": {"path": "/t"}}, "name", "pattern"),
        ({"name": "x", "tasks": {"path": "/t"}, "metric": "acc,none"}, "metric", "pattern"),
        ({"name": "x", "tasks": {"path": "/t"}, "limit": 0}, "limit", "greater than or equal"),
        ({"name": "x", "tasks": {"path": "/t"}, "numFewshot": -1}, "numFewshot", "greater than"),
    ],
)
def test_a_bad_benchmark_is_rejected_naming_the_field(
    benchmark: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        TrainingRun.model_validate(run_body([benchmark]))
    text = str(raised.value)
    assert field in text and message in text, text


def test_benchmark_names_are_distinct() -> None:
    twice = [{"name": "x", "tasks": {"path": "/a"}}, {"name": "x", "tasks": {"path": "/b"}}]
    with pytest.raises(ValidationError, match="benchmarks: benchmark names must be distinct"):
        TrainingRun.model_validate(run_body(twice))


def test_benchmarks_need_a_causal_model() -> None:
    masked = run_body(model={"objective": "masked-lm"})
    with pytest.raises(ValidationError, match=r"evaluation\.benchmarks: benchmarks score a causal"):
        TrainingRun.model_validate(masked)


def test_the_crd_carries_the_rules_and_the_status_field() -> None:
    schema = openapi_schema(TrainingRun)
    spec = schema["properties"]["spec"]
    evaluation = spec["properties"]["evaluation"]
    listing = evaluation["properties"]["benchmarks"]
    assert listing["x-kubernetes-list-type"] == "map" and listing["maxItems"] == 8
    tasks = listing["items"]["properties"]["tasks"]
    assert any(
        "path" in r["rule"] and "configMap" in r["rule"] for r in tasks["x-kubernetes-validations"]
    )
    assert any(
        r.get("fieldPath") == ".evaluation.benchmarks" for r in spec["x-kubernetes-validations"]
    )
    final = schema["properties"]["status"]["properties"]["finalEvaluation"]
    assert final["properties"]["benchmarks"]["items"]["required"] == ["name", "metric", "value"]


# -- builder -----------------------------------------------------------------------------------


def test_the_trainer_pods_get_every_task_folder() -> None:
    body = run_body()
    run = TrainingRun.model_validate(body)
    job = tr_build.worker_job(body, run, attempt=0, dataset_uri="pvc://corpus-data/g1")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    # a ConfigMap: mounted read-only as a folder
    assert volumes["benchmark-0"]["configMap"] == {"name": "tiny-mc"}
    assert mounts["benchmark-0"] == {
        "name": "benchmark-0",
        "mountPath": "/mnt/llmops/benchmarks/0",
        "readOnly": True,
    }
    assert env[f"{Env.BENCHMARK_TASKS}0"]["value"] == "/mnt/llmops/benchmarks/0"
    # a claim: mounted read-only, the folder inside it
    assert volumes["benchmark-1"]["persistentVolumeClaim"] == {
        "claimName": "evals",
        "readOnly": True,
    }
    assert env[f"{Env.BENCHMARK_TASKS}1"]["value"] == "/mnt/llmops/benchmarks/1/tasks/arc"
    # S3: the URI, its endpoint and credentials by reference (the trainer copies it)
    assert "benchmark-2" not in volumes
    assert env[f"{Env.BENCHMARK_TASKS}2"]["value"] == "s3://evals/mmlu"
    assert env[f"{Env.BENCHMARK_S3_ENDPOINT}2"]["value"] == "http://minio:9000"
    secret = env[f"{Env.BENCHMARK_S3_ACCESS_KEY}2"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "minio", "key": "AWS_ACCESS_KEY_ID"}
    assert "value" not in env[f"{Env.BENCHMARK_S3_SECRET_KEY}2"]
    # in the image: the path as it is
    assert env[f"{Env.BENCHMARK_TASKS}3"]["value"] == "/opt/tasks"
    # nothing is downloaded at run time
    assert env["HF_DATASETS_OFFLINE"]["value"] == env["HF_HUB_OFFLINE"]["value"] == "1"


def test_runs_without_benchmarks_are_unchanged() -> None:
    body = run_body([])
    run = TrainingRun.model_validate(body)
    job = tr_build.worker_job(body, run, attempt=0, dataset_uri="pvc://corpus-data/g1")
    pod = job["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if v["name"].startswith("benchmark-")]
    assert "HF_HUB_OFFLINE" not in trainer_env(run.spec)


# -- report -> status ----------------------------------------------------------------------------


def scores(n: int = 2) -> list[BenchmarkScore]:
    return [
        BenchmarkScore(name=f"task_{i}", metric="acc", value=0.25 + i / 10, stderr=0.1, samples=10)
        for i in range(n)
    ]


def test_benchmark_scores_reach_the_status_from_the_trainer_report() -> None:
    final = FinalReport(
        stop_reason="Completed", steps=10, split="test", loss=2.0, benchmarks=scores()
    )
    state = ProgressState(step=10)
    state.checkpointed("step-10")
    report = read_record(TrainerReport, trainer_report(state, final).to_json())
    assert report is not None
    body = run_body()
    done = {
        "spec": {"suspend": False},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }
    pod = {
        "metadata": {"name": "p0", "annotations": {COMPLETION_INDEX_ANNOTATION: "0"}},
        "status": {"phase": "Succeeded"},
    }
    dataset = {
        "kind": "Dataset",
        "metadata": {"name": "corpus"},
        "status": {
            "outputUri": "pvc://corpus-data/g1",
            "conditions": [{"type": "Complete", "status": "True"}],
        },
    }
    observed = decide.Observed(body=body, dataset=dataset, job=done, pods=[pod], report=report)
    decision = decide.decide(TrainingRun.model_validate(body), TrainingRunStatus(), observed, NOW)
    evaluation = decision.status.final_evaluation
    assert decision.status.phase == "Succeeded" and evaluation is not None
    assert evaluation.benchmarks == scores()
    found = evaluation.benchmark("task_1")
    assert found is not None and found.value == pytest.approx(0.35)
    wire = decision.status.to_dict()["finalEvaluation"]["benchmarks"][0]
    assert wire == {
        "name": "task_0",
        "metric": "acc",
        "value": 0.25,
        "stderr": 0.1,
        "higherIsBetter": True,
        "samples": 10,
    }


def test_the_largest_report_fits_a_termination_message() -> None:
    long = [
        BenchmarkScore(name="n" * 128, metric="m" * 64, value=1 / 3, stderr=1 / 7, samples=10**7)
        for _ in range(8)
    ]
    final = FinalReport(
        stop_reason="EarlyStopped",
        steps=10**9,
        split="validation",
        loss=1 / 3,
        perplexity=1 / 3,
        accuracy=1 / 3,
        bleu=1 / 3,
        benchmarks=long,
    )
    state = ProgressState(step=10**9)
    state.checkpointed("step-1000000000")
    text = json.dumps(trainer_report(state, final).to_dict(), separators=(",", ":"))
    assert len(text.encode()) < LIMIT


# -- the gate ----------------------------------------------------------------------------------


def evaluation(value: float | None, higher: bool = True) -> dict[str, Any]:
    found = (
        []
        if value is None
        else [{"name": "mc", "metric": "acc", "value": value, "higherIsBetter": higher}]
    )
    return {"split": "test", "loss": 2.0, "benchmarks": found}


def test_a_gate_compares_a_benchmark_score() -> None:
    gate = EvaluationGate(benchmark="mc", max_regression=0.05)
    assert gate_verdict(gate, evaluation(0.50), evaluation(0.52)) is None  # within 5%
    verdict = gate_verdict(gate, evaluation(0.40), evaluation(0.52))
    assert verdict is not None and "benchmark mc (acc) 0.4 is worse than the served" in verdict
    assert gate_verdict(gate, evaluation(0.1), None) is None  # nothing to compare with
    assert "no benchmark mc yet" in str(gate_verdict(gate, None, evaluation(0.5)))
    missing = gate_verdict(gate, evaluation(None), evaluation(0.5))
    assert missing is not None and "spec.evaluation.benchmarks" in missing
    # lower is better, as lm-eval says of the metric (e.g. perplexity)
    lower = EvaluationGate(benchmark="mc")
    assert gate_verdict(lower, evaluation(9.0, False), evaluation(10.0, False)) is None
    assert gate_verdict(lower, evaluation(11.0, False), evaluation(10.0, False)) is not None


def test_a_gate_threshold_holds_back_even_the_first_model() -> None:
    gate = EvaluationGate(benchmark="mc", threshold=0.6)
    verdict = gate_verdict(gate, evaluation(0.5), None)
    assert verdict is not None and "misses the threshold (at least 0.6)" in verdict
    assert gate_verdict(gate, evaluation(0.7), None) is None
    loss = EvaluationGate(metric="loss", threshold=2.5)
    assert gate_verdict(loss, {"loss": 2.0}, None) is None
    assert "at most 2.5" in str(gate_verdict(loss, {"loss": 3.0}, None))


def test_a_model_deployment_names_a_benchmark_gate_and_keeps_a_served_evaluation() -> None:
    md = ModelDeployment.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "chat"},
            "spec": {
                "model": {
                    "trainingRun": {"name": "gpt"},
                    "gate": {"benchmark": "mc", "threshold": 0.3, "maxRegression": 0.02},
                }
            },
            "status": {"servedEvaluation": evaluation(0.5)},
        }
    )
    gate = md.spec.model.gate
    assert gate is not None and gate.benchmark == "mc" and gate.threshold == 0.3
    served = md.status.served_evaluation
    assert served is not None and served.benchmark("mc") is not None
    with pytest.raises(ValidationError, match="benchmark"):
        EvaluationGate.model_validate({"benchmark": "has space"})


# -- the trainer's side, without a model ---------------------------------------------------------

# What lm_eval.simple_evaluate returns for one multiple-choice task (the fields read here).
LM_EVAL_OUTPUT: dict[str, Any] = {
    "results": {
        "tiny_mc": {
            "alias": "tiny_mc",
            "acc,none": 0.4,
            "acc_stderr,none": 0.163,
            "acc_norm,none": 0.3,
            "acc_norm_stderr,none": "N/A",
        }
    },
    "n-samples": {"tiny_mc": {"original": 12, "effective": 10}},
    "higher_is_better": {"tiny_mc": {"acc": True, "acc_norm": True}},
}


def test_lm_eval_output_becomes_a_score_and_a_report_entry() -> None:
    benchmark = Benchmark.model_validate({"name": "tiny_mc", "tasks": {"path": "/t"}, "limit": 10})
    result = benchmarks.summarize(benchmark, LM_EVAL_OUTPUT)
    assert result.score == BenchmarkScore(
        name="tiny_mc", metric="acc", value=0.4, stderr=0.163, higher_is_better=True, samples=10
    )
    assert result.tasks == {"tiny_mc": {"acc": 0.4, "acc_stderr": 0.163, "acc_norm": 0.3}}
    assert result.samples == {"tiny_mc": 10} and result.limit == 10
    norm = benchmark.model_copy(update={"metric": "acc_norm"})
    assert benchmarks.summarize(norm, LM_EVAL_OUTPUT).score.stderr is None  # "N/A"
    wrong = benchmark.model_copy(update={"metric": "f1"})
    with pytest.raises(
        benchmarks.BenchmarkError, match=r"no metric 'f1' \(it reports: acc, acc_norm\)"
    ):
        benchmarks.summarize(wrong, LM_EVAL_OUTPUT)


def test_a_filtered_metric_is_found_by_its_name() -> None:
    output = {
        "results": {
            "gsm": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01}
        },
        "n-samples": {"gsm": {"original": 5, "effective": 5}},
        "higher_is_better": {"gsm": {"exact_match": True}},
    }
    benchmark = Benchmark.model_validate(
        {"name": "gsm", "tasks": {"path": "/t"}, "metric": "exact_match"}
    )
    score = benchmarks.summarize(benchmark, output).score
    assert (score.metric, score.value, score.stderr) == ("exact_match/strict-match", 0.1, 0.01)


def test_task_folders_are_private_copies_without_configmap_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ConfigMap volume: files are links into a timestamped folder behind `..data`.
    mounted = tmp_path / "mounted"
    (mounted / "..2026_11_01").mkdir(parents=True)
    (mounted / "..2026_11_01" / "task.yaml").write_text("task: t\n")
    (mounted / "..data").symlink_to("..2026_11_01")
    (mounted / "task.yaml").symlink_to("..data/task.yaml")
    monkeypatch.setenv(f"{Env.BENCHMARK_TASKS}0", str(mounted))
    benchmark = Benchmark.model_validate({"name": "t", "tasks": {"configMap": {"name": "t"}}})
    copy_ = benchmarks.task_folder(0, benchmark, tmp_path / "scratch")
    assert sorted(p.name for p in copy_.iterdir()) == ["task.yaml"]
    monkeypatch.delenv(f"{Env.BENCHMARK_TASKS}0")
    with pytest.raises(benchmarks.BenchmarkError, match="set by the operator"):
        benchmarks.task_folder(0, benchmark, tmp_path / "scratch")
    empty = Benchmark.model_validate(
        {"name": "t", "tasks": {"path": str(tmp_path / "scratch" / "none")}}
    )
    with pytest.raises(benchmarks.BenchmarkError, match="no tasks folder"):
        benchmarks.task_folder(1, empty, tmp_path / "scratch")


def test_the_model_card_lists_benchmarks() -> None:
    benchmark = Benchmark.model_validate({"name": "tiny_mc", "tasks": {"path": "/t"}})
    result: BenchmarkResult = benchmarks.summarize(benchmark, LM_EVAL_OUTPUT)
    card = model_card.render(
        "demo",
        {"model": {"objective": "causal-lm"}},
        {"name": "corpus", "fingerprint": "f", "vocab_size": 32, "supervised": False},
        {"num_layers": 2, "hidden_size": 32, "parameters": 1000},
        [],
        {"loss": 2.0},
        [],
        [],
        [result.to_dict()],
    )
    assert "## Benchmarks" in card
    assert "| tiny_mc | acc | 0.4 | 0.163 | 10 | - |" in card
