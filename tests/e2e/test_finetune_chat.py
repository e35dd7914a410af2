"""`llmops run -f examples/finetune-chat.yaml` end to end: a chat Dataset tokenized with an
open-weights model's tokenizer and chat template, a LoRA fine-tune of that model, and the
adapter and merged model loading back in peft and transformers; then the same with a model
folder that is not there, which fails at the initializer with a reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.tiny_llama import build

from llmops.local import state

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "finetune-chat.yaml"
DATASET, RUN = "chats", "chat-lora"


@pytest.fixture
def model_folder() -> Iterator[Path]:
    # Not under /tmp: the pods mount a scratch folder there, as on Kubernetes.
    folder = Path("/var/tmp") / f"llmops-test-model-{uuid.uuid4().hex[:8]}"
    build(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_example(state_dir: Path, model: Path, *settings: str) -> subprocess.CompletedProcess[str]:
    overrides = {
        f"ds/{DATASET}.spec.tokenizer.fromModel.uri": str(model),
        f"tr/{RUN}.spec.model.pretrained.uri": str(model),
        f"tr/{RUN}.spec.hyperparameters.maxSteps": "20",
        f"tr/{RUN}.spec.checkpointing.intervalSteps": "10",
        f"tr/{RUN}.spec.evaluation.intervalSteps": "10",
    }
    flags = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    return subprocess.run(
        [sys.executable, "-m", "llmops", "run", "-f", str(EXAMPLE), "--state-dir",
         str(state_dir), *flags, *settings],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip


def status(state_dir: Path, kind: str, name: str) -> dict[str, object]:
    body = state.load_object(state.Layout(state_dir), kind, "default", name) or {}
    found: dict[str, object] = body.get("status") or {}
    return found


def test_lora_fine_tune_of_a_local_model_on_chats(tmp_path: Path, model_folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    result = run_example(tmp_path, model_folder)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    dataset = status(tmp_path, "Dataset", DATASET)
    assert dataset["phase"] == "Succeeded"
    run = status(tmp_path, "TrainingRun", RUN)
    assert run["phase"] == "Succeeded" and run["step"] == 20
    # The example has no test split: the final evaluation says it used validation.
    assert run["finalEvaluation"]["split"] == "validation"  # type: ignore[index]
    assert "validation perplexity" in result.stdout

    output = next(tmp_path.glob("volumes/**/output/eval_report.json")).parent
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(output / "model"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(output / "model"))
    assert tokenizer.chat_template
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_folder))
    with_adapter = peft.PeftModel.from_pretrained(base, str(output / "adapter"))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is two plus two?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    import torch

    with torch.no_grad():
        torch.testing.assert_close(
            with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=0
        )
    card = json.loads((output / "eval_report.json").read_text())
    assert card["final"]["split"] == "validation"


def test_a_missing_model_folder_fails_at_the_initializer(tmp_path: Path) -> None:
    result = run_example(tmp_path, Path("/var/tmp/llmops-no-such-model"))
    assert result.returncode != 0
    dataset = status(tmp_path, "Dataset", DATASET)
    assert dataset["phase"] == "Failed"
    failed = next(c for c in dataset["conditions"] if c["type"] == "Failed")  # type: ignore[attr-defined]
    assert failed["reason"] == "ModelNotFound", failed
    assert "tokenizer.fromModel" in failed["message"]
