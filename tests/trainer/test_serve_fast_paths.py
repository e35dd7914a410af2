"""The engine's fast paths against the general ones: prompts of one length (causal attention
without a mask), decoding steps with every row at one position (no mask, a slice written to
the cache), the fused projections and norms against the models' own forward, the fused
projections against the per-projection path of adapters; merged stream events, and the
templated server-sent events against the general ones."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from serve_support import random_model
from test_serve_engine import PROMPTS, engine, model_dir  # noqa: F401 (a fixture)
from test_serve_open_weights import family_model

from llmops_trainer.model import GPTConfig
from llmops_trainer.serve.adapters import Adapter
from llmops_trainer.serve.decoder_cache import DecoderKVCacheModel, padded
from llmops_trainer.serve.engine import Delta, Done, Engine, KVCacheModel
from llmops_trainer.serve.protocol import SamplingParams
from llmops_trainer.serve.replies import Reply, sse_event

pytest.importorskip("transformers")

SAME_LENGTH = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5], [3, 1, 4, 1, 5], [50, 51, 52, 53, 54]]


def test_prompts_of_one_length_need_no_mask() -> None:
    _, _, _, mask = padded(SAME_LENGTH, torch.device("cpu"))
    assert mask is None
    _, _, _, mask = padded([[1, 2], [3]], torch.device("cpu"))
    assert mask is not None


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_unmasked_prefill_and_decode_match_the_models_own_forward(family: str) -> None:
    model = family_model(family)
    reference = family_model(family)
    cached = DecoderKVCacheModel(model, 4, 64, torch.device("cpu"), torch.float32)
    sequences = [list(s) for s in SAME_LENGTH]
    logits = cached.prefill(0, sequences).logits  # one length: plain causal attention
    for _ in range(5):  # every row at one position: no mask, a slice of the cache
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor(sequences)).logits[:, -1]
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        for sequence, token in zip(sequences, logits.argmax(-1).tolist(), strict=True):
            sequence.append(token)
        logits = cached.decode([s[-1] for s in sequences], [len(s) - 1 for s in sequences])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_unmasked_decode_equals_masked_decode(family: str) -> None:
    """The same rows decoded at one position (no mask) and at their own positions with a
    mask (one row's cache made one position longer by a repeated prefill)."""
    cached = DecoderKVCacheModel(family_model(family), 4, 64, torch.device("cpu"), torch.float32)
    cached.prefill(0, [[*s, 7] for s in SAME_LENGTH])
    unmasked = cached.decode([8] * 4, [6] * 4)
    masked = DecoderKVCacheModel(family_model(family), 4, 64, torch.device("cpu"), torch.float32)
    masked.prefill(0, [[*s, 7] for s in SAME_LENGTH[:3]] + [SAME_LENGTH[3] + [7, 7]])
    # Row 3 sits one position further; rows 0-2 decode under the mask exactly as before.
    got = masked.decode([8, 8, 8, 8], [6, 6, 6, 7])
    torch.testing.assert_close(got[:3], unmasked[:3], rtol=1e-5, atol=1e-5)


def test_fused_projections_equal_the_per_projection_path_of_adapters() -> None:
    """Rows of a zero adapter go through the per-projection path: the same logits as the
    base rows, which use the fused weights."""
    model = family_model("llama")
    updates = {}
    for layer, block in enumerate(model.model.layers):
        for part, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
            for name in (f"{n}_proj" for n in names):
                module = getattr(getattr(block, part), name)
                zero = (torch.zeros(2, module.in_features), torch.zeros(module.out_features, 2))
                updates[(layer, f"{part}.{name}")] = zero
    cached = DecoderKVCacheModel(
        model, 4, 64, torch.device("cpu"), torch.float32, [Adapter("zero", updates)]
    )
    base = cached.prefill(0, SAME_LENGTH[:2], [0, 0]).logits
    adapted = cached.prefill(2, SAME_LENGTH[:2], [1, 1]).logits
    torch.testing.assert_close(adapted, base, rtol=1e-5, atol=1e-5)
    base = cached.decode([8, 8, 8, 8], [5, 5, 5, 5], [0, 0, 0, 0])
    mixed = cached.decode([8, 8, 8, 8], [5, 5, 5, 5], [0, 0, 1, 1])
    torch.testing.assert_close(mixed, base, rtol=1e-5, atol=1e-5)


def test_gpt_unmasked_decode_matches_the_trainer_forward() -> None:
    config = GPTConfig(vocab_size=97, context_length=24, num_layers=2, num_heads=4, hidden_size=32)
    reference = random_model(config, seed=1).eval()
    cached = KVCacheModel(random_model(config, seed=1), 4, 24, torch.device("cpu"), torch.float32)
    sequences = [list(s) for s in SAME_LENGTH]
    logits = cached.prefill(0, sequences).logits
    for _ in range(6):
        with torch.no_grad():
            expected = reference(torch.tensor(sequences))[:, -1]
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        for sequence, token in zip(sequences, logits.argmax(-1).tolist(), strict=True):
            sequence.append(token)
        logits = cached.decode([s[-1] for s in sequences], [len(s) - 1 for s in sequences])


def test_a_reader_behind_the_engine_gets_the_tokens_merged(model_dir: Path) -> None:  # noqa: F811
    e: Engine = engine(model_dir, max_batch_size=2)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def scenario() -> tuple[list[Delta | Done], list[Delta | Done]]:
        behind, live = e.submit(PROMPTS[0], params), e.submit(PROMPTS[0], params)
        assert behind is not None and live is not None
        live_events: list[Delta | Done] = []

        async def read_as_it_comes() -> None:
            async for event in live.events():
                live_events.append(event)

        reader = asyncio.create_task(read_as_it_comes())
        while e.scheduler.running or e.scheduler.waiting:
            e.step()
            for _ in range(3):  # the delivery, then the reader
                await asyncio.sleep(0)
        await reader
        behind_events = [event async for event in behind.events()]  # read at the end
        return behind_events, live_events

    behind_events, live_events = asyncio.run(scenario())
    behind_text = "".join(x.text for x in behind_events if isinstance(x, Delta))
    live_text = "".join(x.text for x in live_events if isinstance(x, Delta))
    assert behind_text == live_text
    assert isinstance(behind_events[-1], Done) and behind_events[-1].completion_tokens == 8
    assert sum(isinstance(x, Delta) for x in live_events) > 1
    assert sum(isinstance(x, Delta) for x in behind_events) == 1  # all caught up at once


@pytest.mark.parametrize("chat", [False, True])
def test_templated_text_events_equal_the_general_ones(chat: bool) -> None:
    reply = Reply('a "model"/\u00e9', chat=chat)
    for index in (0, 3):
        for text in ("plain", ' "quoted" \\ \n', "\u00e9\u4e2d\U0001f600", "\x00"):
            assert reply.text_event(index, text) == sse_event(reply.chunk(index, text, None))
            payload = json.loads(reply.text_event(index, text)[6:])
            assert payload["choices"][0]["index"] == index
