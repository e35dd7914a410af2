"""The generation engine on a tiny random model in the trainer's format: the KV cache against
the trainer's full forward, batched against unbatched decoding, scheduling, and loading."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from serve_support import make_checkpoint, make_model, random_model

from llmops_trainer import checkpoint
from llmops_trainer.model import GPT, GPTConfig
from llmops_trainer.serve import loading
from llmops_trainer.serve.__main__ import build_engine
from llmops_trainer.serve.engine import Delta, Done, Engine, KVCacheModel, Stream
from llmops_trainer.serve.metrics import ServingMetrics
from llmops_trainer.serve.protocol import SamplingParams
from llmops_trainer.serve.settings import ServeSettings

PROMPTS = [[5, 9, 13], [40], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7], [100, 3, 61, 2, 2], [17, 18]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Scaled-up random weights: clear margins between logits, so greedy choices are stable.
    return make_model(tmp_path_factory.mktemp("serve") / "out" / "model", scale=8.0)


def engine(model_dir: Path, max_batch_size: int, capacity: int = 16) -> Engine:
    settings = ServeSettings(
        model_dir, "tiny", max_batch_size=max_batch_size, max_concurrency=capacity,
        device="cpu", dtype="float32",
    )  # fmt: skip
    return build_engine(loading.load(model_dir), settings, ServingMetrics(CollectorRegistry()))


async def generate_all(
    e: Engine, prompts: list[list[int]], params: list[SamplingParams]
) -> list[list[int]]:
    """Submit everything at once to a running engine; the token ids of each generation."""
    streams = [e.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
    assert all(s is not None for s in streams)
    for stream in streams:
        assert stream is not None
        async for _ in stream.events():
            pass
    return [list(s.generation.output_ids) for s in streams if s and s.generation]


def run_engine(
    e: Engine, prompts: list[list[int]], params: list[SamplingParams]
) -> list[list[int]]:
    e.start()
    try:
        return asyncio.run(generate_all(e, prompts, params))
    finally:
        e.stop()


def test_kv_cache_logits_match_the_trainer_forward() -> None:
    config = GPTConfig(vocab_size=97, context_length=24, num_layers=2, num_heads=4, hidden_size=32)
    reference = random_model(config, seed=1).eval()
    cached = KVCacheModel(random_model(config, seed=1), 4, 24, torch.device("cpu"), torch.float32)
    sequences = [[1, 2, 3, 4, 5], [9], [3, 1, 4, 1, 5, 9, 2, 6], [50, 51]]
    logits = cached.prefill(0, sequences).logits
    for _ in range(6):
        with torch.no_grad():
            for row, sequence in enumerate(sequences):
                expected = reference(torch.tensor([sequence]))[0, -1]
                torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)
        for sequence, token in zip(sequences, logits.argmax(-1).tolist(), strict=True):
            sequence.append(token)
        logits = cached.decode([s[-1] for s in sequences], [len(s) - 1 for s in sequences])


def test_batched_greedy_outputs_equal_unbatched(model_dir: Path) -> None:
    params = [GREEDY, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)] * 3
    params = params[: len(PROMPTS)]
    alone = run_engine(engine(model_dir, max_batch_size=1), PROMPTS, params)
    batched = run_engine(engine(model_dir, max_batch_size=4), PROMPTS, params)
    assert batched == alone
    assert [len(tokens) for tokens in batched] == [p.max_tokens for p in params]
    # ...and both equal the trainer's own greedy loop (full recompute, no cache).
    loaded = loading.load(model_dir)
    model = GPT(loaded.config)
    model.load_state_dict(loaded.state_dict, strict=False)
    model.eval()
    for prompt, p, tokens in zip(PROMPTS, params, batched, strict=True):
        out = model.generate(torch.tensor([prompt]), p.max_tokens)[0, len(prompt) :].tolist()
        assert tokens == out


def test_seeded_sampling_does_not_depend_on_the_batch(model_dir: Path) -> None:
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=7)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0]]
    alone = run_engine(engine(model_dir, 1), prompts[:1], [sampled])
    batched = run_engine(engine(model_dir, 4), prompts, [sampled, GREEDY, sampled])
    assert batched[0] == alone[0] == batched[2]
    other = run_engine(engine(model_dir, 1), prompts[:1], [SamplingParams(10, 0.9, seed=8)])
    assert other != alone


@pytest.fixture
def stepped(model_dir: Path) -> Iterator[Engine]:
    """An engine driven step by step by the test (its thread never starts)."""
    yield engine(model_dir, max_batch_size=2, capacity=4)


def test_fifo_admission_and_one_token_per_step(stepped: Engine) -> None:
    async def scenario() -> None:
        long = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        plan = [short, long, long, long]
        streams = [stepped.submit(p, sp) for p, sp in zip(PROMPTS, plan, strict=False)]
        gens = [s.generation for s in streams if s is not None and s.generation is not None]
        assert len(gens) == 4
        assert stepped.submit(PROMPTS[4], long) is None  # capacity 4: refused, not queued
        stepped.step()  # admit 0 and 1: prefill gives one token, decode another
        assert [len(g.output_ids) for g in gens] == [2, 2, 0, 0]
        stepped.step()  # 0 finished (2 tokens); 2 takes its slot
        assert [len(g.output_ids) for g in gens] == [2, 3, 2, 0]
        while stepped.scheduler.running or stepped.scheduler.waiting:
            stepped.step()
        assert [len(g.output_ids) for g in gens] == [2, 6, 6, 6]

    asyncio.run(scenario())


def test_cancelled_generations_free_their_slot(stepped: Engine) -> None:
    async def scenario() -> None:
        forever = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        streams = [stepped.submit(p, forever) for p in PROMPTS[:3]]
        assert all(streams)
        first, second, third = (s for s in streams if s is not None)
        stepped.step()
        stepped.cancel(third)  # still queued: dropped at once
        assert stepped.scheduler.waiting == 0
        stepped.cancel(first)  # running: dropped at the next step
        stepped.step()
        assert stepped.scheduler.running == 1
        assert second.generation is not None and second.generation.slot == 0
        events = await drain(second, stepped)
        assert isinstance(events[-1], Done) and events[-1].completion_tokens == 40
        assert sum(isinstance(e, Delta) for e in events) > 0

    asyncio.run(scenario())


async def drain(stream: Stream, e: Engine) -> list[Delta | Done]:
    while e.scheduler.running:
        e.step()
    await asyncio.sleep(0)
    events: list[Delta | Done] = []
    async for event in stream.events():
        events.append(event)
    return events


def test_stop_strings_and_eos_end_a_generation(model_dir: Path) -> None:
    e = engine(model_dir, 2)
    tokenizer = e.tokenizer
    plain = run_engine(engine(model_dir, 1), [PROMPTS[1]], [GREEDY])[0]
    text = tokenizer.decode(plain)
    stop = text[len(text) // 2 :][:2]
    assert stop.strip(), text

    async def scenario() -> tuple[str, Done]:
        stream = e.submit(PROMPTS[1], SamplingParams(12, 0.0, stop=(stop,), ignore_eos=True))
        assert stream is not None
        parts, done = [], None
        async for event in stream.events():
            if isinstance(event, Delta):
                parts.append(event.text)
            else:
                done = event
        assert done is not None
        return "".join(parts), done

    e.start()
    try:
        out, done = asyncio.run(scenario())
    finally:
        e.stop()
    assert done.finish_reason == "stop" and out == text[: text.find(stop)]
    # The eos token ends a generation unless ignore_eos is set.
    e2 = engine(model_dir, 1)
    e2.eos_token_id = plain[2]
    shorter = run_engine(e2, [PROMPTS[1]], [SamplingParams(12, 0.0)])[0]
    assert shorter == plain[: plain.index(plain[2]) + 1]


# -- loading ----------------------------------------------------------------------------------


def test_loads_output_folder_export_and_checkpoints(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export = loading.load(model_dir)
    assert loading.load(model_dir.parent).label == export.label  # the output folder
    assert export.eos_token_id is not None and export.config.context_length == 64
    root = tmp_path / "checkpoints"
    step = make_checkpoint(root, model_dir, step=30)
    monkeypatch.setenv(loading.TOKENIZER_ENV, str(model_dir / "tokenizer.json"))
    for pointed in (root, step, root / checkpoint.LATEST):
        loaded = loading.load(pointed)
        assert loaded.label == "step-30"
        for name, tensor in export.state_dict.items():
            torch.testing.assert_close(loaded.state_dict[name], tensor)
        assert loaded.tokenizer.encode("the fox") == export.tokenizer.encode("the fox")


def test_refuses_damaged_checkpoints_and_encoders(model_dir: Path, tmp_path: Path) -> None:
    step = make_checkpoint(tmp_path / "ckpt", model_dir)
    (step / checkpoint.STATE).write_text(json.dumps({"model": {}, "zeroStage": 1}))
    with pytest.raises(loading.ModelFolderError, match="checksum mismatch"):
        loading.load(step)
    encoder = tmp_path / "enc" / "model"
    make_model(encoder)
    config = json.loads((encoder / loading.MODEL_CONFIG).read_text())
    (encoder / loading.MODEL_CONFIG).write_text(json.dumps({**config, "causal": False}))
    with pytest.raises(loading.ModelFolderError, match="masked-lm"):
        loading.load(encoder)
    with pytest.raises(loading.ModelFolderError, match="neither"):
        loading.load(tmp_path)


def test_without_a_tokenizer_prompts_are_token_ids(model_dir: Path, tmp_path: Path) -> None:
    step = make_checkpoint(tmp_path / "elsewhere" / "ckpt", model_dir)
    loaded = loading.load(step)
    assert loaded.tokenizer.encode("3 4") == [3, 4]
    assert loaded.eos_token_id is None
