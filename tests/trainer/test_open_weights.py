"""Open-weights models for real: a tiny Llama checkpoint in Hugging Face format (built here,
the stand-in for a downloaded model), fine-tuned in full and with LoRA on chat data by the
trainer under DeepSpeed (2 gloo processes), exported and loaded back with transformers/peft."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fixtures.tiny_llama import build
from helpers import Job, make_dataset, training_run
from safetensors.torch import load_file

from llmops_trainer import checkpoint
from llmops_trainer.shards import Manifest, ShardWriter, write_manifest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

STEPS = 16
CONTEXT = 64
TOLERANCE = 1e-4
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("tiny-llama"))


def chats(count: int, seed: int) -> list[list[dict[str, str]]]:
    """The assistant counts on from the user's number: learnable, multi-turn, with a system
    prompt in half of them."""
    rng = np.random.default_rng(seed)
    conversations = []
    for i in range(count):
        messages = [{"role": "system", "content": "you count"}] if i % 2 else []
        for _ in range(int(rng.integers(1, 3))):
            start = int(rng.integers(0, 7))
            messages.append({"role": "user", "content": WORDS[start]})
            messages.append({"role": "assistant", "content": " ".join(WORDS[start : start + 4])})
        conversations.append(messages)
    return conversations


def make_chat_dataset(root: Path, model: Path, test_split: bool = True) -> Path:
    """Shards as a Dataset with tokenizer.fromModel writes them: chat-template tokens, loss
    mask on assistant turns (the fixture's template marks them for transformers)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
    splits = {}
    counts = {"train": 240, "validation": 32, **({"test": 32} if test_split else {})}
    for seed, (split, count) in enumerate(counts.items()):
        writer = ShardWriter(
            root, split, "uint16", tokenizer.eos_token_id, tokens_per_shard=4096, supervised=True
        )
        for messages in chats(count, seed):
            rendered = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            writer.add(rendered["input_ids"], rendered["assistant_masks"])
        splits[split] = writer.close()
    shutil.copyfile(model / "tokenizer.json", root / "tokenizer.json")
    manifest = Manifest(
        "chat-fingerprint", "uint16", len(tokenizer), tokenizer.eos_token_id, supervised=True
    )
    manifest.splits = splits
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory, base_model: Path) -> Path:
    return make_chat_dataset(tmp_path_factory.mktemp("chat"), base_model)


def fine_tune(model: Path, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"objective": "sft", "contextLength": CONTEXT, "pretrained": {"uri": str(model)}},
        "hyperparameters": {
            "learningRate": 0.003,
            "minLearningRate": 0.0003,
            "warmupSteps": 2,
            "microBatchSize": 4,
            "globalBatchSize": 8,
            "maxSteps": STEPS,
            "seed": 3,
        },
        "deepspeed": {"zeroStage": 2, "precision": "fp32"},
        "checkpointing": {"intervalSteps": 8, "keepLast": 2},
        "evaluation": {"intervalSteps": 8, "batches": 2, "metrics": ["perplexity", "accuracy"]},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return training_run(**spec)


LORA = {"rank": 8, "alpha": 16, "dropout": 0.0, "merge": True}
LORA_RATES = {"learningRate": 0.03, "minLearningRate": 0.003}  # adapters like larger steps


def lora_run(model: Path, **overrides: Any) -> dict[str, Any]:
    return fine_tune(model, adapter=LORA, hyperparameters=LORA_RATES, **overrides)


@pytest.fixture(scope="module")
def lora_reference(
    tmp_path_factory: pytest.TempPathFactory, base_model: Path, chat_data: Path
) -> Job:
    """A LoRA fine-tune, never interrupted: what the failure tests compare against."""
    from conftest import free_port

    job = Job(
        lora_run(base_model),
        chat_data,
        tmp_path_factory.mktemp("lora"),
        port=free_port(),
    )
    assert job.run() == 0, job.log.read_text()[-4000:]
    return job


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
        return out


def sample_ids(model: Path) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
    messages = [{"role": "user", "content": "three"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return torch.tensor([ids["input_ids"]])


@pytest.mark.parametrize("stage", [2, 3])
def test_full_fine_tune_lowers_loss_and_exports_a_transformers_model(
    stage: int, base_model: Path, chat_data: Path, job: Callable[..., Job]
) -> None:
    run = job(fine_tune(base_model, deepspeed={"zeroStage": stage}), data=chat_data)
    assert run.run() == 0, run.log.read_text()[-4000:]
    losses = run.losses()
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 1.0, losses

    exported = run.output / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported))
    assert type(model).__name__ == "LlamaForCausalLM"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported))
    assert tokenizer.chat_template  # the chat template travels with the model
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_model))
    ids = sample_ids(exported)
    assert not torch.allclose(logits(model, ids), logits(base, ids))  # it trained
    assert (exported / "README.md").is_file()
    state = checkpoint.read_state(run.checkpoints / "step-16")
    assert state["model"]["architecture"] == "LlamaForCausalLM"
    assert state["model"]["pretrained"] == str(base_model)


FAMILY_CLASSES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


@pytest.mark.parametrize("family", sorted(FAMILY_CLASSES))
def test_every_supported_family_fine_tunes_in_full_and_with_lora(
    family: str, tmp_path_factory: pytest.TempPathFactory, job: Callable[..., Job]
) -> None:
    """Qwen2/3, Mistral and GPT-2 checkpoints (Llama is the fixture of every other test) go
    through the same path: full fine-tune under ZeRO-2 and a LoRA run (its default target
    modules found for the family), each lowers the loss and exports a model transformers
    loads as the family's class, with the trained weights."""
    base = build(tmp_path_factory.mktemp(family), family=family)
    data = make_chat_dataset(tmp_path_factory.mktemp(f"{family}-chat"), base, test_split=False)
    steps = 8
    short = {"maxSteps": steps, "warmupSteps": 1}
    full = job(fine_tune(base, hyperparameters=short), name="full", data=data)
    lora_spec = fine_tune(base, adapter=LORA, hyperparameters={**LORA_RATES, **short})
    lora = job(lora_spec, name="lora", data=data)
    for run in (full, lora):
        assert run.run() == 0, run.log.read_text()[-4000:]
        losses = run.losses()
        assert sorted(losses) == list(range(1, steps + 1))
        assert losses[steps] < losses[1] - 0.25, losses
        exported = transformers.AutoModelForCausalLM.from_pretrained(str(run.output / "model"))
        assert type(exported).__name__ == FAMILY_CLASSES[family]
        original = transformers.AutoModelForCausalLM.from_pretrained(str(base))
        ids = sample_ids(base)
        assert not torch.allclose(logits(exported, ids), logits(original, ids))
    assert (lora.output / "adapter" / "adapter_config.json").is_file()


def test_lora_trains_only_the_adapter_and_exports_adapter_and_merged_model(
    lora_reference: Job, base_model: Path
) -> None:
    losses = lora_reference.losses()
    # A random base with frozen embeddings and head learns slowly through rank-8 adapters;
    # what matters is that the adapters alone move the loss, well beyond noise.
    last = sum(losses[s] for s in range(STEPS - 2, STEPS + 1)) / 3
    assert last < losses[1] - 0.25, losses
    log = lora_reference.log.read_text()
    assert "trained" in log

    # Checkpoints hold the adapter only: every saved weight is a LoRA matrix.
    saved = torch.load(
        lora_reference.checkpoints / "step-16" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )["module"]
    assert saved and all("lora_" in name for name in saved), list(saved)[:5]

    adapter_dir = lora_reference.output / "adapter"
    adapter_weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert adapter_weights and all("lora_" in name for name in adapter_weights)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"

    # Each checkpoint carries its adapter in peft's layout too (what a deployment following
    # the run's latest or best checkpoint serves): the last one is the exported adapter.
    last_checkpoint = load_file(
        str(lora_reference.checkpoints / "step-16" / "adapter" / "adapter_model.safetensors")
    )
    assert sorted(last_checkpoint) == sorted(adapter_weights)
    for name, tensor in adapter_weights.items():
        torch.testing.assert_close(last_checkpoint[name], tensor, atol=1e-6, rtol=0)
    earlier = load_file(
        str(lora_reference.checkpoints / "step-8" / "adapter" / "adapter_model.safetensors")
    )
    assert any(not torch.equal(earlier[n], adapter_weights[n]) for n in adapter_weights)
    assert (
        json.loads(
            (lora_reference.checkpoints / "step-8" / "adapter" / "adapter_config.json").read_text()
        )["r"]
        == 8
    )
    assert not checkpoint.problems(lora_reference.checkpoints / "step-8")  # sealed with it

    # base + adapter in peft == the exported merged model in transformers.
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_model))
    with_adapter = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(lora_reference.output / "model"))
    ids = sample_ids(base_model)
    torch.testing.assert_close(logits(with_adapter, ids), logits(merged, ids), atol=1e-4, rtol=0)

    # What LoRA does not adapt (embeddings, norms, head) is the base's, bit for bit.
    original = load_file(str(base_model / "model.safetensors"))
    exported = load_file(str(lora_reference.output / "model" / "model.safetensors"))
    untouched = [n for n in original if "proj" not in n]
    assert untouched
    for name in untouched:
        assert torch.equal(original[name], exported[name]), name
    adapted = [n for n in original if "q_proj" in n]
    assert any(not torch.equal(original[n], exported[n]) for n in adapted)


def test_lora_under_zero_3_checkpoints_the_adapter_it_trained(
    base_model: Path, chat_data: Path, job: Callable[..., Job]
) -> None:
    """ZeRO-3 shards even the adapter: the checkpoint's peft folder is gathered from the
    shards, and equals the exported adapter of the same step."""
    short = {**LORA_RATES, "maxSteps": 8}
    run = job(
        fine_tune(base_model, adapter=LORA, hyperparameters=short, deepspeed={"zeroStage": 3}),
        data=chat_data,
    )
    assert run.run() == 0, run.log.read_text()[-4000:]
    exported = load_file(str(run.output / "adapter" / "adapter_model.safetensors"))
    saved = load_file(str(run.checkpoints / "step-8" / "adapter" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(exported) and exported
    for name, tensor in exported.items():
        torch.testing.assert_close(saved[name], tensor, atol=1e-6, rtol=0)


def test_lora_run_killed_mid_way_resumes_with_the_same_curve(
    lora_reference: Job, base_model: Path, chat_data: Path, job: Callable[..., Job]
) -> None:
    run = job(lora_run(base_model), data=chat_data)
    run.start()
    # Steps of this tiny model take milliseconds: poll fast and kill at the first step after
    # the step-8 checkpoint, so the kill lands well before the next one (step 16).
    run.wait_for_step(9, poll=0.01)
    os.kill(run.worker_pids()[1], signal.SIGKILL)
    assert run.wait() != 0
    assert checkpoint.read_pointer(run.checkpoints, "latest") == "step-8"

    assert run.run() == 0, run.log.read_text()[-4000:]
    assert "resuming from step-8" in run.log.read_text()
    expected = lora_reference.losses()
    for step, loss in run.losses().items():
        assert loss == pytest.approx(expected[step], abs=TOLERANCE), f"step {step}"
    assert run.samples() == lora_reference.samples()


def test_lora_resumes_on_another_world_size(
    lora_reference: Job, base_model: Path, chat_data: Path, job: Callable[..., Job]
) -> None:
    run = job(
        lora_run(base_model, resources={"numNodes": 1, "procsPerNode": 1}),
        data=chat_data,
    )
    run.resume_from(lora_reference, 8)

    assert run.run() == 0, run.log.read_text()[-4000:]
    assert "world size 2 -> 1" in run.log.read_text()
    losses, expected = run.losses(), lora_reference.losses()
    assert sorted(losses) == list(range(9, STEPS + 1))
    # Same adapter weights, same samples: the first step's loss is the reference's.
    assert losses[9] == pytest.approx(expected[9], abs=TOLERANCE)


def test_activation_checkpointing_gives_the_same_losses(
    base_model: Path, chat_data: Path, job: Callable[..., Job]
) -> None:
    short = {"maxSteps": 4}
    plain = job(fine_tune(base_model, hyperparameters=short), "plain", data=chat_data)
    checkpointed = job(
        fine_tune(
            base_model,
            hyperparameters=short,
            deepspeed={"zeroStage": 2, "activationCheckpointing": True},
        ),
        "checkpointed",
        data=chat_data,
    )
    assert plain.run() == 0, plain.log.read_text()[-4000:]
    assert checkpointed.run() == 0, checkpointed.log.read_text()[-4000:]
    expected = plain.losses()
    for step, loss in checkpointed.losses().items():
        assert loss == pytest.approx(expected[step], abs=TOLERANCE), f"step {step}"


def test_llama_from_scratch_learns_and_a_run_without_a_test_split_finishes(
    tmp_path: Path, base_model: Path, job: Callable[..., Job]
) -> None:
    data = make_dataset(tmp_path / "data")
    shutil.rmtree(data / "test")
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["splits"]["test"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    model = {
        "architecture": "llama",
        "numLayers": 2,
        "numHeads": 4,
        "numKeyValueHeads": 2,
        "hiddenSize": 32,
        "contextLength": 16,
    }
    run = job(training_run(model=model, hyperparameters={"maxSteps": 24}), data=data)
    assert run.run() == 0, run.log.read_text()[-4000:]
    losses = run.losses()
    assert losses[24] < losses[1] - 1.0, losses
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(run.output / "model"))
    assert exported.config.num_key_value_heads == 2
    report = json.loads((run.output / "eval_report.json").read_text())
    assert report["final"]["split"] == "validation"


def test_a_spec_the_model_cannot_take_fails_with_a_report_not_a_restart(
    base_model: Path, chat_data: Path, job: Callable[..., Job], tmp_path: Path
) -> None:
    """contextLength beyond the model's positions: the set-up refuses it, and says so in the
    termination message the operator reads (InvalidTrainingSetup: fail, do not restart)."""
    from llmops.api.workload import FailureReport, read_record

    spec = fine_tune(base_model)
    spec["spec"]["model"]["contextLength"] = 512
    run = job(spec, data=chat_data)
    termination = tmp_path / "termination-log"
    run.env["LLMOPS_TERMINATION_LOG"] = str(termination)
    assert run.run() != 0
    report = read_record(FailureReport, termination.read_text())
    assert report is not None and report.stage == "train"
    assert report.reason == "InvalidTrainingSetup"
    assert "contextLength 512 exceeds the model's 256 positions" in report.message
