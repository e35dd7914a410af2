"""`llmops run -f examples/finetune-chat.yaml` end to end: a chat Dataset tokenized with an
open-weights model's tokenizer and chat template, a LoRA fine-tune of that model, the
adapter and merged model loading back in peft and transformers, and the base served with
the adapter by name through the `openai` client; then the same with a model folder that is
not there, which fails at the initializer with a reason."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fixtures.tiny_llama import build

from llmops.local import state

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "finetune-chat.yaml"
DATASET, RUN, SERVED = "chats", "chat-lora", "chat"


@pytest.fixture
def model_folder() -> Iterator[Path]:
    # Not under /tmp: the pods mount a scratch folder there, as on Kubernetes.
    folder = Path("/var/tmp") / f"llmops-test-model-{uuid.uuid4().hex[:8]}"
    build(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def flags(model: Path) -> list[str]:
    overrides = {
        f"ds/{DATASET}.spec.tokenizer.fromModel.uri": str(model),
        f"tr/{RUN}.spec.model.pretrained.uri": str(model),
        f"md/{SERVED}.spec.model.uri": str(model),
        f"tr/{RUN}.spec.hyperparameters.maxSteps": "20",
        f"tr/{RUN}.spec.checkpointing.intervalSteps": "10",
        f"tr/{RUN}.spec.evaluation.intervalSteps": "10",
    }
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def command(state_dir: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "llmops", "run", "-f", str(EXAMPLE), "--state-dir",
            str(state_dir), *flags(model)]  # fmt: skip


def status(state_dir: Path, kind: str, name: str) -> dict[str, object]:
    body = state.load_object(state.Layout(state_dir), kind, "default", name) or {}
    found: dict[str, object] = body.get("status") or {}
    return found


def test_lora_fine_tune_of_a_local_model_on_chats_served_by_name(
    tmp_path: Path, model_folder: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    openai = pytest.importorskip("openai")
    process = subprocess.Popen(
        command(tmp_path, model_folder),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    lines: list[str] = []
    assert process.stdout is not None
    try:
        for line in process.stdout:
            lines.append(line)
            if "serving until Ctrl-C" in line:
                break
        output = "".join(lines)
        assert process.poll() is None, output

        dataset = status(tmp_path, "Dataset", DATASET)
        assert dataset["phase"] == "Succeeded"
        run = status(tmp_path, "TrainingRun", RUN)
        assert run["phase"] == "Succeeded" and run["step"] == 20
        # The example has no test split: the final evaluation says it used validation.
        assert run["finalEvaluation"]["split"] == "validation"  # type: ignore[index]
        assert "validation perplexity" in output

        output_dir = next(tmp_path.glob("volumes/**/output/eval_report.json")).parent
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(output_dir / "model"))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(output_dir / "model"))
        assert tokenizer.chat_template
        base = transformers.AutoModelForCausalLM.from_pretrained(str(model_folder))
        with_adapter = peft.PeftModel.from_pretrained(base, str(output_dir / "adapter"))
        messages = [{"role": "user", "content": "What is two plus two?"}]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(
                with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4,
                rtol=0,
            )  # fmt: skip
        report = json.loads((output_dir / "eval_report.json").read_text())
        assert report["final"]["split"] == "validation"

        served = status(tmp_path, "ModelDeployment", SERVED)
        assert served["phase"] == "Ready" and served["adapters"] == [RUN]
        client = openai.OpenAI(base_url=str(served["url"]), api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-llama", RUN]
        # PeftModel.from_pretrained put the adapter into `base`: load the base afresh.
        plain = transformers.AutoModelForCausalLM.from_pretrained(str(model_folder))
        for name, model in (("tiny-llama", plain), (RUN, merged)):
            reply = client.chat.completions.create(
                model=name,
                messages=messages,
                max_tokens=6,
                temperature=0,  # type: ignore[arg-type]
            )
            expected = model.generate(
                ids, max_new_tokens=6, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1] :].tolist()  # fmt: skip
            if tokenizer.eos_token_id in expected:
                expected = expected[: expected.index(tokenizer.eos_token_id)]
            assert reply.choices[0].message.content == tokenizer.decode(
                expected, skip_special_tokens=True
            ), name
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)


def test_a_missing_model_folder_fails_at_the_initializer(tmp_path: Path) -> None:
    result = subprocess.run(
        command(tmp_path, Path("/var/tmp/llmops-no-such-model")),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode != 0
    dataset = status(tmp_path, "Dataset", DATASET)
    assert dataset["phase"] == "Failed"
    failed = next(c for c in dataset["conditions"] if c["type"] == "Failed")  # type: ignore[attr-defined]
    assert failed["reason"] == "ModelNotFound", failed
    assert "tokenizer.fromModel" in failed["message"]
