"""The engine with `tokenizer.fromModel`, as the Jobs run it (slice pods, then the later
stages, as processes, with the env the builder gives the pods): chats from jsonl and parquet
rendered with the model's chat template and masked to the assistant's turns, plain text in the
model's vocabulary, and vocabularies too big for uint16 tokens."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from llmops.api.dataset import Dataset, dedup_groups
from llmops.api.workload import FailureReport, read_record
from llmops.builders import dataset as ds_build
from llmops_trainer.shards import Manifest, open_mask, open_tokens, read_manifest, verify

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from data_corpus import document, sentence

SLICES = 2
SYSTEM = "You are a patient teacher and you answer with care."


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures.tiny_llama import build

    return build(tmp_path_factory.mktemp("tiny-llama"))


def _body(sources: list[dict[str, Any]], model: Path, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "chat", "namespace": "ml", "uid": "u", "generation": 1},
        "spec": {
            "sources": sources,
            "tokenizer": {"fromModel": {"uri": str(model)}},
            "split": {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 5},
            "sharding": {"tokensPerShard": 4096},
            "parallelism": SLICES,
            **spec,
        },
    }


def _run(
    tmp_path: Path, body: dict[str, Any], check: bool = True
) -> tuple[Path, list[subprocess.CompletedProcess[bytes]]]:
    """Slice pods (side by side), the dedup pods, the prepare pod, the tokenize pods and the
    finalize pod, each a process with the pod's env."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "dataset.json"
    config.write_text(json.dumps(body))
    output = tmp_path / "out"
    model_input = ds_build.tokenizer_model(Dataset.model_validate(body))
    assert model_input is not None
    env = {
        **os.environ,
        **{e["name"]: e["value"] for e in model_input.env},  # LLMOPS_PRETRAINED_DIR
        "LLMOPS_OUTPUT_DIR": str(output),
        "LLMOPS_NUM_SLICES": str(SLICES),
        "LLMOPS_TERMINATION_LOG": str(tmp_path / "termination-log"),
    }
    command = [sys.executable, "-m", "llmops_trainer.data", "--config", str(config)]
    slices = [
        subprocess.Popen(
            [*command, "--stage", "slice"],
            env={**env, "JOB_COMPLETION_INDEX": str(index)},
            stderr=subprocess.PIPE,
        )
        for index in range(SLICES)
    ]
    done = [
        subprocess.CompletedProcess(p.args, p.wait(timeout=300), None, p.stderr.read())  # type: ignore[union-attr]
        for p in slices
    ]
    if all(p.returncode == 0 for p in done):
        for group in range(dedup_groups(Dataset.model_validate(body).spec)):
            dedup = [*command, "--stage", "dedup"]
            index = {"JOB_COMPLETION_INDEX": str(group)}
            done.append(subprocess.run(dedup, env={**env, **index}, capture_output=True))
    for stage, pods in (("prepare", 1), ("tokenize", SLICES), ("finalize", 1)):
        for pod in range(pods):
            if all(p.returncode == 0 for p in done):
                index = {"JOB_COMPLETION_INDEX": str(pod)}
                run = [*command, "--stage", stage]
                done.append(subprocess.run(run, env={**env, **index}, capture_output=True))
    if check:
        for process in done:
            assert process.returncode == 0, process.stderr.decode()[-3000:]
    return output, done


def _split_stream(
    output: Path, manifest: Manifest, split: str
) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
    shards = manifest.splits[split].shards
    tokens = np.concatenate([np.asarray(open_tokens(output, manifest, s)) for s in shards])
    masks = [open_mask(output, s) for s in shards]
    if any(m is None for m in masks):
        return tokens, None
    return tokens, np.concatenate([np.asarray(m) for m in masks])


def _chat(rng: random.Random, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for _ in range(turns):
        messages.append({"role": "user", "content": sentence(rng)})
        messages.append({"role": "assistant", "content": document(rng, 2)})
    return messages


def test_chats_from_jsonl_and_parquet(model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    rng = random.Random(7)
    jsonl_chats = [_chat(rng, rng.randint(1, 3)) for _ in range(40)]
    parquet_chats = [_chat(rng, rng.randint(1, 3)) for _ in range(30)]
    records = [json.dumps({"id": i, "messages": m}) for i, m in enumerate(jsonl_chats)]
    records += [
        json.dumps({"messages": jsonl_chats[3]}),  # an exact duplicate
        '{"id": 99, "messages": [{"role": "user", "content": "torn li',  # unreadable
        json.dumps({"messages": [{"role": "narrator", "content": sentence(rng)}]}),
        json.dumps({"messages": [{"role": "user", "content": sentence(rng)}]}),  # no answer
    ]
    (tmp_path / "chats.jsonl").write_text("\n".join(records) + "\n")
    # As `datasets.Dataset.to_parquet` writes chat data: a list<struct<role, content>> column.
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    features = {"messages": [{"role": {"dtype": "string", "_type": "Value"}}]}
    table = pa.table(
        {
            "prompt_id": pa.array([f"p{i}" for i in range(31)]),
            "messages": pa.array([*parquet_chats, jsonl_chats[5]], type=pa.list_(message)),
        }
    ).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, tmp_path / "chats.parquet")
    sources = [
        {"name": "jsonl", "path": str(tmp_path / "chats.jsonl"), "format": "jsonl"},
        {"name": "parquet", "path": str(tmp_path / "chats.parquet"), "format": "parquet"},
    ]
    for source in sources:
        source["messagesField"] = "messages"

    output, _ = _run(tmp_path, _body(sources, model))

    manifest = read_manifest(output)
    assert verify(output, manifest) == []
    assert manifest.supervised and manifest.dtype == "uint16"
    hf = AutoTokenizer.from_pretrained(str(model))
    assert manifest.eos_token_id == hf.convert_tokens_to_ids("<|im_end|>")
    assert manifest.vocab_size == len(hf)
    steps = {s["name"]: s for s in manifest.stats["steps"]}
    assert steps["normalize"]["dropped"] == {
        "malformed-chat": 1,
        "no-assistant-turn": 1,
        "unreadable": 1,
    }
    # One copy in the same file, one across slices (the parquet file is the other slice's).
    assert steps["dedup-exact"]["dropped"] == {"exact-duplicate": 2}
    assert steps["chat-template"]["dropped"] == {}
    assert manifest.stats["documents"] == 70
    # The trainer and the server find the model's tokenizer files next to the shards.
    assert (output / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        assert (output / name).read_bytes() == (model / name).read_bytes()
    served = AutoTokenizer.from_pretrained(str(output))
    assert served.apply_chat_template(jsonl_chats[0], tokenize=False) == (
        hf.apply_chat_template(jsonl_chats[0], tokenize=False)
    )

    # Every chat is in exactly one split, in input order, as transformers tokenizes it with
    # the template, followed by the end-of-sequence token; the loss covers exactly the tokens
    # of the {% generation %} blocks of the fixture's template (the answers and their
    # <|im_end|>) and the closing end-of-sequence token.
    expected = []
    for chat in [*jsonl_chats, *parquet_chats]:
        reference = hf.apply_chat_template(
            chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        expected.append((list(reference["input_ids"]), list(reference["assistant_masks"])))
    seen: list[int] = []
    eos = manifest.eos_token_id
    for split in ("train", "validation", "test"):
        tokens, masks = _split_stream(output, manifest, split)
        assert masks is not None and len(masks) == len(tokens)
        position, candidate, found = 0, 0, 0
        while position < len(tokens):
            while True:  # the next chat of this split, in global order
                ids, mask = expected[candidate]
                end = position + len(ids)
                if tokens[position:end].tolist() == ids and tokens[end] == eos:
                    break
                candidate += 1
            assert masks[position : end + 1].tolist() == [*mask, 1]
            text = hf.decode(tokens[position:end].tolist(), skip_special_tokens=False)
            assert text == hf.apply_chat_template(
                [*jsonl_chats, *parquet_chats][candidate], tokenize=False
            )
            seen.append(candidate)
            position, candidate, found = end + 1, candidate + 1, found + 1
        assert found == manifest.splits[split].documents > 0
    assert sorted(seen) == list(range(70))


def test_plain_text_in_the_model_vocabulary(model: Path, tmp_path: Path) -> None:
    rng = random.Random(3)
    documents = [document(rng, 6) for _ in range(60)]
    (tmp_path / "web.txt").write_text("\n\n".join(documents) + "\n")
    sources = [{"name": "web", "path": str(tmp_path / "web.txt")}]
    # Synthetic text lacks stop words; nothing but the tokenizer is under test.
    processing = {"filters": {"minStopWords": 0}}

    output, _ = _run(tmp_path, _body(sources, model, processing=processing))

    manifest = read_manifest(output)
    assert not manifest.supervised and manifest.dtype == "uint16"
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    # The end-of-sequence token is the model's (tokenizer_config.json: <|im_end|>), not the
    # first special token (<|endoftext|>) a trained tokenizer would use.
    assert manifest.eos_token_id == tokenizer.token_to_id("<|im_end|>") == 2
    assert manifest.vocab_size == tokenizer.get_vocab_size() == 384
    assert (output / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    encoded = {tuple(tokenizer.encode(d, add_special_tokens=False).ids): d for d in documents}
    found: list[str] = []
    for split in ("train", "validation", "test"):
        tokens, masks = _split_stream(output, manifest, split)
        assert masks is None
        ends = np.flatnonzero(tokens == manifest.eos_token_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            found.append(encoded[tuple(tokens[start:end].tolist())])
    assert sorted(found) == sorted(documents)


def _big_vocabulary_model(folder: Path, size: int) -> Path:
    """A word-level tokenizer with `size` tokens: ids above 65535 for late words."""
    words = {"<eos>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, size)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return folder


def test_a_vocabulary_over_65536_gets_uint32_tokens(tmp_path: Path) -> None:
    model = _big_vocabulary_model(tmp_path / "model", 70_000)
    rng = random.Random(1)
    lines = [
        " ".join(f"w{rng.randrange(2, 70_000)}" for _ in range(30)) + " w69999" for _ in range(20)
    ]
    (tmp_path / "ids.txt").write_text("\n".join(lines) + "\n")
    sources = [{"name": "ids", "path": str(tmp_path / "ids.txt"), "documentSeparator": "line"}]
    processing = {
        "filters": {"quality": False, "repetition": False},
        "deduplication": {"near": {"enabled": False}},
    }

    output, _ = _run(tmp_path / "auto", _body(sources, model, processing=processing))
    manifest = read_manifest(output)
    assert manifest.dtype == "uint32" and manifest.vocab_size == 70_000
    tokens = np.concatenate(
        [_split_stream(output, manifest, s)[0] for s in ("train", "validation", "test")]
    )
    assert tokens.dtype == np.dtype("<u4") and int(tokens.max()) == 69_999

    # Forcing uint16 fails in the slices already, naming the field to fix.
    forced = _body(sources, model, processing=processing, sharding={"tokenDtype": "uint16"})
    _, done = _run(tmp_path / "forced", forced, check=False)
    assert [p.returncode for p in done] == [1] * SLICES
    report = read_record(
        FailureReport, (tmp_path / "forced" / "termination-log").read_text(encoding="utf-8")
    )
    assert report is not None and report.stage == "slice" and report.reason == "InvalidConfig"
    assert "spec.sharding.tokenDtype" in report.message and "70000" in report.message
