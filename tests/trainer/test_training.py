"""The trainer for real: DeepSpeed on CPU (gloo), 2 processes started by torchrun, as in a pod."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REFERENCE_STEPS, reference_run
from helpers import Job, make_dataset, training_run

from llmops.api.workload import parse_progress_line
from llmops_trainer import checkpoint
from llmops_trainer.progress import read_progress

LOSS_TOLERANCE = 1e-4  # same computation, same order: only float noise


def assert_same_curve(job: Job, reference: Job, steps: range, tolerance: float) -> None:
    losses, expected = job.losses(), reference.losses()
    for step in steps:
        assert losses[step] == pytest.approx(expected[step], abs=tolerance), f"step {step}"


def test_loss_goes_down_and_the_run_leaves_a_model(reference: Job) -> None:
    losses = reference.losses()
    assert sorted(losses) == list(range(1, REFERENCE_STEPS + 1))
    assert losses[REFERENCE_STEPS] < losses[1] - 1.0
    # Validation at every interval and at step 0, before the first update (evaluation.atStart).
    metrics = reference.metrics()
    validation = {m["step"]: m["valLoss"] for m in metrics if "valLoss" in m}
    assert sorted(validation) == [0, 10, 20, 30, 40]
    assert metrics[0]["step"] == 0 and "valLoss" in metrics[0]  # before any training entry
    assert validation[40] < validation[10] < validation[0]

    progress = read_progress(reference.output)
    assert progress is not None
    assert progress.phase == "Completed"
    assert (progress.step, progress.total_steps) == (REFERENCE_STEPS, REFERENCE_STEPS)
    assert progress.latest_checkpoint == f"step-{REFERENCE_STEPS}"
    assert progress.grad_norm and progress.grad_norm > 0
    assert progress.learning_rate and progress.learning_rate > 0
    assert progress.validation is not None and progress.validation.accuracy is not None
    logged = [parse_progress_line(line) for line in reference.log.read_text().splitlines()]
    assert [p.step for p in logged if p and p.phase == "Training"][-1] == REFERENCE_STEPS

    # Retention: the last two plus the best; `latest` names the newest.
    kept = [path.name for _, path in checkpoint.published(reference.checkpoints)]
    assert kept[:2] == ["step-40", "step-30"]
    assert checkpoint.read_pointer(reference.checkpoints, "best") in kept
    assert checkpoint.read_pointer(reference.checkpoints, "latest") == "step-40"

    report = json.loads((reference.output / "eval_report.json").read_text())
    final = report["final"]
    assert final["perplexity"] < 32 and 0 < final["accuracy"] <= 1  # better than uniform
    assert final["perplexity"] < final["unigramPerplexity"]  # and than token frequencies
    assert final["bleu"] is not None and final["bleuTask"] == "continuation"
    assert len(report["worstPassages"]) == 10
    losses_of_worst = [w["loss"] for w in report["worstPassages"]]
    assert losses_of_worst == sorted(losses_of_worst, reverse=True)
    card = (reference.output / "model_card.md").read_text()
    assert "test-fingerprint" in card and "## Final evaluation" in card
    model = reference.output / "model"
    assert json.loads((model / "config.json").read_text())["model_type"] == "gpt2"
    assert (model / "model.safetensors").is_file()


def test_no_sample_is_seen_twice_within_an_epoch(reference: Job) -> None:
    samples = reference.samples()
    seen = [s for step in sorted(samples) for s in samples[step]]
    assert len(seen) == REFERENCE_STEPS * 8
    assert len(set(seen)) == len(seen)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_agree_with_stage_0(
    stage: int, reference: Job, job: Callable[..., Job]
) -> None:
    run = job(reference_run(deepspeed={"zeroStage": stage, "precision": "fp32"}))
    assert run.run() == 0, run.log.read_text()[-4000:]
    # Sharded optimizers reduce in a different order: agreement up to float rounding.
    assert_same_curve(run, reference, range(1, REFERENCE_STEPS + 1), tolerance=2e-3)


def test_killed_rank_restarts_from_checkpoint_with_the_same_curve(
    reference: Job, job: Callable[..., Job]
) -> None:
    run = job(reference_run())
    run.start()
    # Just past the step-10 checkpoint, polled often: 40 small steps take about a second.
    run.wait_for_step(11, poll=0.01)
    os.kill(run.worker_pids()[1], signal.SIGKILL)  # one of the two trainer processes
    assert run.wait() != 0
    killed_at = max(run.steps())
    assert killed_at < REFERENCE_STEPS
    assert checkpoint.read_pointer(run.checkpoints, "latest") in ("step-10", "step-20", "step-30")

    assert run.run() == 0, run.log.read_text()[-4000:]
    assert "resuming from step-" in run.log.read_text()
    assert_same_curve(run, reference, range(1, REFERENCE_STEPS + 1), LOSS_TOLERANCE)
    # The re-run steps took exactly the samples the uninterrupted run took.
    assert run.samples() == reference.samples()


def test_sigterm_saves_a_valid_checkpoint_and_resume_continues(
    reference: Job, job: Callable[..., Job]
) -> None:
    run = job(reference_run(checkpointing={"intervalSteps": 1000}))
    run.start()
    run.wait_for_step(5, poll=0.01)
    run.signal(signal.SIGTERM)
    assert run.wait() != 0  # preempted, not complete

    latest = checkpoint.read_pointer(run.checkpoints, "latest")
    assert latest is not None
    folder = run.checkpoints / latest
    assert checkpoint.problems(folder) == []
    state = checkpoint.read_state(folder)
    assert state["reason"] == "SIGTERM" and 5 <= state["step"] < REFERENCE_STEPS
    progress = read_progress(run.output)
    assert progress is not None and progress.phase == "Interrupted"

    assert run.run() == 0, run.log.read_text()[-4000:]
    assert f"resuming from {latest}" in run.log.read_text()
    assert_same_curve(run, reference, range(state["step"] + 1, REFERENCE_STEPS + 1), LOSS_TOLERANCE)


def test_corrupt_latest_checkpoint_falls_back_to_an_older_one(
    reference: Job, job: Callable[..., Job]
) -> None:
    run = job(reference_run())
    shutil.copytree(reference.checkpoints, run.checkpoints)
    newest = run.checkpoints / "step-40" / "mp_rank_00_model_states.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    (run.checkpoints / ".partial-step-50").mkdir()  # debris of a crash mid-save

    run.env["LLMOPS_SAMPLE_LOG"] = "0"
    assert run.run() == 0, run.log.read_text()[-4000:]
    log = run.log.read_text()
    assert "skipping damaged checkpoint: step-40/mp_rank_00_model_states.pt" in log
    assert "resuming from step-30" in log
    assert sorted(run.losses()) == list(range(31, REFERENCE_STEPS + 1))
    assert_same_curve(run, reference, range(31, REFERENCE_STEPS + 1), LOSS_TOLERANCE)
    assert not (run.checkpoints / ".partial-step-50").exists()
    assert checkpoint.problems(run.checkpoints / "step-40") == []  # rewritten, sound


def test_resume_on_a_different_world_size(reference: Job, job: Callable[..., Job]) -> None:
    # Same global batch on one process: accumulation 2 instead of 2 ranks.
    run = job(reference_run(resources={"numNodes": 1, "procsPerNode": 1}))
    run.resume_from(reference, 30)

    assert run.run() == 0, run.log.read_text()[-4000:]
    assert "world size 2 -> 1" in run.log.read_text()
    losses, expected = run.losses(), reference.losses()
    assert sorted(losses) == list(range(31, REFERENCE_STEPS + 1))
    # Step 31's loss is computed before any update: same weights, same samples.
    assert losses[31] == pytest.approx(expected[31], abs=LOSS_TOLERANCE)
    # Afterwards the optimizer moments restart from zero, so only closeness is expected.
    for step in range(32, REFERENCE_STEPS + 1):
        assert losses[step] == pytest.approx(expected[step], abs=0.25)
    samples = run.samples()
    assert all(sorted(samples[s]) == sorted(reference.samples()[s]) for s in range(30, 40))


def test_one_process_steps_like_two_ranks_and_resumes_exactly(
    reference: Job, job: Callable[..., Job]
) -> None:
    # One fp32 process without ZeRO steps the module and the optimizer itself (not through
    # DeepSpeed's engine). Accumulating the global batch over 2 micro-batches must give the
    # 2-rank curve, and a resume from its own checkpoint must continue it exactly (the
    # optimizer moments, the schedule and the engine's step counter were saved).
    single = reference_run(resources={"numNodes": 1, "procsPerNode": 1})
    run = job(single)
    assert run.run() == 0, run.log.read_text()[-4000:]
    assert_same_curve(run, reference, range(1, REFERENCE_STEPS + 1), LOSS_TOLERANCE)
    assert run.samples() == reference.samples()
    # Adam hides a gradient's scale from the loss; the clipped norm does not (the mean over
    # the micro-batches, not their sum).
    norms = {m["step"]: m["gradNorm"] for m in run.metrics() if "gradNorm" in m}
    expected = {m["step"]: m["gradNorm"] for m in reference.metrics() if "gradNorm" in m}
    assert norms.keys() == expected.keys() and norms
    for step, norm in expected.items():
        assert norms[step] == pytest.approx(norm, rel=1e-3), f"step {step}"

    resumed = job(single, name="resumed")
    resumed.resume_from(run, 30)  # checkpoints keep the last 2: steps 30 and 40
    assert resumed.run() == 0, resumed.log.read_text()[-4000:]
    assert "resuming from step-30" in resumed.log.read_text()
    assert sorted(resumed.losses()) == list(range(31, REFERENCE_STEPS + 1))
    assert_same_curve(resumed, run, range(31, REFERENCE_STEPS + 1), LOSS_TOLERANCE)


def test_fine_tune_starts_at_the_parent_loss(reference: Job, job: Callable[..., Job]) -> None:
    parent_final = reference.losses()[REFERENCE_STEPS]
    scratch_first = reference.losses()[1]
    child = job(
        training_run(hyperparameters={"maxSteps": 4, "learningRate": 0.001}),
        init=reference.checkpoints / "latest",
    )
    assert child.run() == 0, child.log.read_text()[-4000:]
    assert "initialised weights from" in child.log.read_text()
    first = child.losses()[1]
    assert first == pytest.approx(parent_final, abs=0.3)
    assert first < scratch_first - 1.0
    assert sorted(child.losses()) == [1, 2, 3, 4]  # its own step count: weights only


def test_a_model_in_nanogpts_layout_learns_and_exports_for_transformers(
    reference: Job, job: Callable[..., Job]
) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    from llmops_trainer.model import GPT, GPTConfig
    from llmops_trainer.train import load_weights
    from llmops_trainer.weights import consolidated_state_dict

    model = {"bias": False, "activation": "gelu"}
    run = job(training_run(model=model, hyperparameters={"maxSteps": 20}))
    assert run.run() == 0, run.log.read_text()[-4000:]
    losses = run.losses()
    assert losses[20] < losses[1] - 1.0
    trained = consolidated_state_dict(checkpoint.resolve(run.checkpoints / "latest"))
    assert not [name for name in trained if name.endswith(".bias")]
    with_biases = consolidated_state_dict(checkpoint.resolve(reference.checkpoints / "latest"))
    assert len(trained) < len(with_biases)

    # The export (GPT-2's layout with zero biases, exact GELU) computes what training left.
    spec = training_run()["spec"]["model"]
    config = GPTConfig(
        vocab_size=trained["transformer.wte.weight"].shape[0],
        context_length=spec["contextLength"],
        num_layers=spec["numLayers"],
        num_heads=spec["numHeads"],
        hidden_size=spec["hiddenSize"],
        bias=False,
        activation="gelu",
    )
    ours = GPT(config).eval()
    load_weights(ours, trained)
    exported = GPT2LMHeadModel.from_pretrained(run.output / "model").eval()
    tokens = torch.randint(config.vocab_size, (2, config.context_length))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), exported(tokens).logits, atol=1e-4)


# masked-lm learns from 15% of the tokens only: a wider model, bigger batches, more steps.
OBJECTIVES = {
    "sft": ({}, {"maxSteps": 30}),
    "masked-lm": (
        {"hiddenSize": 64, "numHeads": 4},
        {"maxSteps": 100, "microBatchSize": 16, "learningRate": 0.003, "minLearningRate": 3e-4},
    ),
}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_other_objectives_learn(objective: str, tmp_path: Path, job: Callable[..., Job]) -> None:
    data = make_dataset(tmp_path / "data", supervised=objective == "sft")
    metrics = ["perplexity", "accuracy", "bleu"] if objective == "sft" else ["accuracy"]
    model, hyperparameters = OBJECTIVES[objective]
    steps = hyperparameters["maxSteps"]
    run = job(
        training_run(
            model={"objective": objective, **model},
            hyperparameters=hyperparameters,
            deepspeed={"zeroStage": 2, "precision": "bf16"},
            checkpointing={"intervalSteps": steps},
            evaluation={"intervalSteps": steps // 2, "batches": 2, "metrics": metrics},
        ),
        data=data,
    )
    assert run.run() == 0, run.log.read_text()[-4000:]
    losses = [run.losses()[step] for step in range(1, steps + 1)]
    first, last = losses[: steps // 10], losses[-(steps // 10) :]
    assert sum(last) / len(last) < sum(first) / len(first) - 0.5
    report = json.loads((run.output / "eval_report.json").read_text())
    if objective == "sft":
        assert report["final"]["bleuTask"] == "responses"
        assert report["final"]["bleu"] is not None
        assert (run.output / "model" / "config.json").is_file()
    else:
        assert report["final"].get("bleu") is None  # an encoder does not generate
        native = json.loads((run.output / "model" / "llmops_model.json").read_text())
        assert native["causal"] is False and native["vocab_size"] == 33  # + the mask token
