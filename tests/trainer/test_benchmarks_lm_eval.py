"""Benchmarks for real: a short fine-tune of a tiny Llama checkpoint (2 gloo processes) with
two lm-evaluation-harness multiple-choice tasks defined here (task YAML over a local jsonl,
nothing downloaded), scored by rank 0 on the exported model; the scores reach eval_report.json,
the termination report the operator turns into status, and the model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from fixtures.tiny_llama import CORPUS, build
from helpers import Job, training_run

from llmops.api.workload import EVALUATION_REPORT_FILE, MODEL_CARD_FILE, TrainerReport, read_record
from llmops_trainer.shards import Manifest, ShardWriter, write_manifest

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

QUESTIONS = 10
LIMIT = 4
TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: questions.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]


def write_tasks(folder: Path) -> Path:
    """Two tasks over one jsonl of QUESTIONS counting questions, four choices each."""
    folder.mkdir(parents=True)
    with (folder / "questions.jsonl").open("w") as out:
        for i in range(QUESTIONS):
            choices = [WORDS[i + 1], WORDS[(i + 3) % 10], "the lazy dog", "paris"]
            question = f"count with me: what comes after {WORDS[i]}?"
            out.write(json.dumps({"question": question, "choices": choices, "answer": 0}) + "\n")
    (folder / "count_mc.yaml").write_text(TASK.format(name="count_mc"))
    (folder / "count_mc_fewshot.yaml").write_text(TASK.format(name="count_mc_fewshot"))
    return folder


def make_text_dataset(root: Path, model: Path) -> Path:
    """The fixture's corpus as causal-lm shards in the model's tokenizer."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
    splits = {}
    for split, repeat in (("train", 4), ("validation", 1), ("test", 1)):
        writer = ShardWriter(root, split, "uint16", tokenizer.eos_token_id, tokens_per_shard=4096)
        for text in CORPUS[: 20 * repeat]:
            writer.add(tokenizer(text)["input_ids"])
        splits[split] = writer.close()
    shutil.copyfile(model / "tokenizer.json", root / "tokenizer.json")
    manifest = Manifest("text-fingerprint", "uint16", len(tokenizer), tokenizer.eos_token_id)
    manifest.splits = splits
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory, model: Path) -> Path:
    return make_text_dataset(tmp_path_factory.mktemp("text"), model)


def benchmark_run(model: Path, tasks: Path, names: tuple[str, ...] = ()) -> dict[str, Any]:
    benchmarks = [
        {"name": "count_mc", "tasks": {"path": str(tasks)}, "batchSize": 16},
        {
            "name": "count_mc_fewshot",
            "tasks": {"path": str(tasks)},
            "numFewshot": 2,
            "limit": LIMIT,
            "metric": "acc_norm",
            "batchSize": 16,
        },
    ]
    if names:
        benchmarks = [{"name": name, "tasks": {"path": str(tasks)}} for name in names]
    return training_run(
        model={"objective": "causal-lm", "contextLength": 64, "pretrained": {"uri": str(model)}},
        hyperparameters={"maxSteps": 4, "warmupSteps": 1, "learningRate": 0.003},
        deepspeed={"zeroStage": 2, "precision": "fp32"},
        checkpointing={"intervalSteps": 4, "keepLast": 1},
        evaluation={
            "intervalSteps": 4,
            "batches": 1,
            "atStart": False,
            "metrics": ["perplexity"],
            "benchmarks": benchmarks,
        },
    )


def test_benchmarks_score_the_final_model(
    tmp_path: Path, model: Path, text_data: Path, job: Any
) -> None:
    tasks = write_tasks(tmp_path / "tasks")
    run: Job = job(benchmark_run(model, tasks), data=text_data)
    termination = tmp_path / "termination-log"
    run.env["LLMOPS_TERMINATION_LOG"] = str(termination)
    assert run.run(timeout=240) == 0, run.log.read_text()[-4000:]

    report = json.loads((run.output / EVALUATION_REPORT_FILE).read_text())
    results = {r["name"]: r for r in report["benchmarks"]}
    assert list(results) == ["count_mc", "count_mc_fewshot"]
    full, fewshot = results["count_mc"], results["count_mc_fewshot"]
    assert full["score"]["metric"] == "acc" and fewshot["score"]["metric"] == "acc_norm"
    assert full["score"]["samples"] == QUESTIONS  # every question written
    assert fewshot["score"]["samples"] == LIMIT and fewshot["numFewshot"] == 2
    for result in results.values():
        assert 0.0 <= result["score"]["value"] <= 1.0
        assert set(result["tasks"][result["name"]]) >= {"acc", "acc_norm"}

    # What the operator reads: the termination report carries the scores to the status.
    trainer = read_record(TrainerReport, termination.read_text())
    assert trainer is not None and trainer.final_evaluation is not None
    scores = trainer.final_evaluation.benchmarks or []
    assert [(s.name, s.samples) for s in scores] == [
        ("count_mc", QUESTIONS),
        ("count_mc_fewshot", LIMIT),
    ]
    assert scores[0].value == full["score"]["value"]

    card = (run.output / MODEL_CARD_FILE).read_text()
    assert "## Benchmarks" in card and "| count_mc | acc |" in card


def test_an_unknown_task_fails_the_run_before_training(
    tmp_path: Path, model: Path, text_data: Path, job: Any
) -> None:
    tasks = write_tasks(tmp_path / "tasks")
    run: Job = job(benchmark_run(model, tasks, names=("no_such_task",)), data=text_data)
    termination = tmp_path / "termination-log"
    run.env["LLMOPS_TERMINATION_LOG"] = str(termination)
    assert run.run(timeout=240) != 0
    failure = json.loads(termination.read_text())
    assert failure["reason"] == "InvalidTrainingSetup"
    assert "no_such_task" in failure["message"] and "count_mc" in failure["message"]
    assert not run.steps()  # nothing was trained
