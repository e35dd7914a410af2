"""A Dataset version's chain of stage Jobs: what the builders make of each stage, and which
Job the controller (and the local runtime) runs next from the Jobs it observes."""

from __future__ import annotations

from typing import Any

from llmops.api.dataset import DATA_STAGES, Dataset, dedup_groups
from llmops.builders import dataset as ds_build
from llmops.decide.dataset import advance, stage_failed, stage_message

BODY: dict[str, Any] = {
    "apiVersion": "llmops.dev/v1alpha1",
    "kind": "Dataset",
    "metadata": {"name": "corpus", "namespace": "ml", "uid": "u2", "generation": 4},
    "spec": {
        "sources": [{"name": "a", "path": "a.txt"}],
        "tokenizer": {"train": {"vocabSize": 512}},
        "parallelism": 4,
    },
}


def _stages(**spec: Any) -> list[tuple[str, dict[str, Any]]]:
    body = {**BODY, "spec": {**BODY["spec"], **spec}}
    return ds_build.stage_jobs(body, Dataset.model_validate(body), 4)


def _job(manifest: dict[str, Any], **status: Any) -> dict[str, Any]:
    conditions = []
    if status.pop("complete", False):
        conditions.append({"type": "Complete", "status": "True"})
    if status.pop("broken", False):
        conditions.append({"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"})
    return {**manifest, "status": {**status, "conditions": conditions}}


def test_stage_jobs_are_a_chain_of_indexed_jobs():
    stages = _stages()
    assert [stage for stage, _ in stages] == list(DATA_STAGES)
    assert list(DATA_STAGES) == ["slice", "dedup", "prepare", "tokenize", "finalize"]
    slices, dedup, prepare, tokenize, final = (job for _, job in stages)
    assert [j["metadata"]["name"] for j in (slices, dedup, prepare, tokenize, final)] == [
        "corpus-slices-g4",
        "corpus-dedup-g4",
        "corpus-prepare-g4",
        "corpus-tokenize-g4",
        "corpus-finalize-g4",
    ]
    assert dedup["spec"]["completionMode"] == "Indexed"
    assert dedup["spec"]["completions"] == 4  # min(parallelism, 16 bands)
    assert dedup["spec"]["backoffLimitPerIndex"] == ds_build.RETRIES_PER_SLICE
    container = dedup["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-2:] == ["--stage", "dedup"]
    assert dedup["spec"]["template"]["metadata"]["labels"]["llmops.dev/stage"] == "dedup"
    assert prepare["spec"]["completions"] == final["spec"]["completions"] == 1
    assert "completionMode" not in prepare["spec"] and "completionMode" not in final["spec"]
    # The tokenize pods: one per slice, each retried alone.
    assert (tokenize["spec"]["completionMode"], tokenize["spec"]["completions"]) == ("Indexed", 4)
    assert tokenize["spec"]["backoffLimitPerIndex"] == ds_build.RETRIES_PER_SLICE
    assert tokenize["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == [
        "--stage",
        "tokenize",
    ]
    # At most one pod per band; with near-dedup off, one per slice (exact hashes only).
    assert (
        _stages(processing={"deduplication": {"near": {"bands": 2, "numPermutations": 64}}})[1][1][
            "spec"
        ]["completions"]
        == 2
    )
    off = Dataset.model_validate(
        {
            **BODY,
            "spec": {**BODY["spec"], "processing": {"deduplication": {"near": {"enabled": False}}}},
        }
    )
    assert dedup_groups(off.spec) == 4


def test_each_stage_starts_after_the_one_before_completes():
    stages = _stages()
    names = [job["metadata"]["name"] for _, job in stages]
    nothing = advance(stages, {})
    assert nothing.stage == "slice" and nothing.create is stages[0][1]
    assert [p.state for p in nothing.progress] == ["Pending"] * 5

    running = advance(stages, {names[0]: _job(stages[0][1], active=3, succeeded=1)})
    assert running.stage == "slice" and running.create is None and running.failure is None
    assert stage_message(running.progress[0]) == "1/4 slices done"
    # A dedup Job that somehow exists already is not looked at before the slices complete.
    early = advance(
        stages,
        {names[0]: _job(stages[0][1], active=1), names[1]: _job(stages[1][1], complete=True)},
    )
    assert early.stage == "slice" and early.progress[1].state == "Pending"

    sliced = {names[0]: _job(stages[0][1], succeeded=4, complete=True)}
    step = advance(stages, sliced)
    assert step.stage == "dedup" and step.create is stages[1][1]
    assert [p.state for p in step.progress] == ["Complete"] + ["Pending"] * 4

    deduped = {**sliced, names[1]: _job(stages[1][1], succeeded=4, complete=True)}
    step = advance(stages, deduped)
    assert step.stage == "prepare" and step.create is stages[2][1]

    prepared = {**deduped, names[2]: _job(stages[2][1], succeeded=1, complete=True)}
    step = advance(stages, prepared)
    assert step.stage == "tokenize" and step.create is stages[3][1]
    tokenizing = {**prepared, names[3]: _job(stages[3][1], active=2, succeeded=2)}
    step = advance(stages, tokenizing)
    assert step.stage == "tokenize" and step.create is None
    assert stage_message(step.progress[3]) == "2/4 tokenize pods done (shards)"

    tokenized = {**prepared, names[3]: _job(stages[3][1], succeeded=4, complete=True)}
    step = advance(stages, tokenized)
    assert step.stage == "finalize" and step.create is stages[4][1]

    done = advance(stages, {**tokenized, names[4]: _job(stages[4][1], succeeded=1, complete=True)})
    assert done.done and done.stage is None and done.create is None
    assert [p.succeeded for p in done.progress] == [4, 4, 1, 4, 1]


def test_a_failed_stage_is_named():
    stages = _stages()
    names = [job["metadata"]["name"] for _, job in stages]
    observed = {
        names[0]: _job(stages[0][1], succeeded=4, complete=True),
        names[1]: _job(stages[1][1], succeeded=3, failed=3, broken=True),
    }
    step = advance(stages, observed)
    assert step.stage == "dedup" and step.failure and not step.done
    assert step.progress[1].state == "Failed"
    reason, message = stage_failed("dedup", step.failure)
    assert reason == "DedupFailed" and message.startswith("stage dedup: ")
