"""Log-probabilities, echo, n > 1, best_of, lists of prompts, penalties and logit bias through
the official `openai` client, checked against the model's own full forward pass (no cache, no
batching): for the built-in GPT and for a `transformers` Llama with LoRA adapters, with
requests of different adapters and parameters decoded in the same batches."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from fixtures.tiny_llama import build
from serve_support import RunningServer, make_model, running_server
from test_serve_open_weights import random_adapter

from llmops_trainer.model import GPT
from llmops_trainer.serve import loading

IDS = {"return_tokens_as_token_ids": True}
PROMPTS = [[5, 9, 13], [40, 41], [7, 7, 7, 7, 7, 7], [100, 3, 61, 2, 2, 90, 12]]


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Unscaled random weights: spread-out distributions, no log-probability near the floor.
    return make_model(tmp_path_factory.mktemp("logprobs") / "out" / "model")


@pytest.fixture(scope="module")
def gpt(gpt_dir: Path) -> Iterator[RunningServer]:
    with running_server(gpt_dir, max_batch_size=4, max_concurrency=16) as running:
        yield running


def gpt_forward(model_dir: Path) -> Any:
    loaded = loading.load(model_dir)
    assert loaded.config is not None
    model = GPT(loaded.config)
    model.load_state_dict(loaded.state_dict, strict=False)
    model.eval()

    def logits(ids: Sequence[int]) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = model(torch.tensor([list(ids)]))[0]
        return out

    return logits


def log_likelihood(logits: torch.Tensor, ids: Sequence[int], start: int) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= start, from full-sequence logits (length, vocab)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids))]


def token_ids(tokens: Sequence[str]) -> list[int]:
    return [int(token.removeprefix("token_id:")) for token in tokens]


def aclient(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


async def gather(*calls: Any) -> list[Any]:
    return list(await asyncio.gather(*calls))


def test_sampled_tokens_logprobs_are_the_models_log_likelihood(
    gpt: RunningServer, gpt_dir: Path
) -> None:
    """Concurrent sampled requests, decoded in shared batches: each token's log-probability,
    its alternatives and their sum are those of the model's own forward over the sequence."""
    forward = gpt_forward(gpt_dir)

    async def ask() -> list[Any]:
        api = aclient(gpt)
        try:
            return await gather(*(
                api.completions.create(
                    model="tiny", prompt=prompt, max_tokens=10, temperature=1.0, seed=i,
                    logprobs=i, extra_body={"ignore_eos": True, **IDS},
                )
                for i, prompt in enumerate(PROMPTS)
            ), api.completions.create(  # a row without logprobs in the same batches
                model="tiny", prompt=PROMPTS[0], max_tokens=10, extra_body={"ignore_eos": True},
            ))  # fmt: skip
        finally:
            await api.close()

    *replies, plain = asyncio.run(ask())
    assert plain.choices[0].logprobs is None
    for alternatives, (prompt, reply) in enumerate(zip(PROMPTS, replies, strict=True)):
        logprobs = reply.choices[0].logprobs
        assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
        generated = token_ids(logprobs.tokens)
        assert len(generated) == 10
        sequence = prompt + generated
        logits = forward(sequence)
        expected = log_likelihood(logits, sequence, len(prompt))
        given = [float(lp) for lp in logprobs.token_logprobs if lp is not None]
        torch.testing.assert_close(given, expected, rtol=1e-4, atol=1e-4)
        assert sum(given) == pytest.approx(sum(expected), abs=1e-3)
        # Top alternatives (as many as this request asked for): the model's likeliest, plus
        # the chosen token.
        assert logprobs.top_logprobs is not None
        for position, top in enumerate(logprobs.top_logprobs):
            assert top is not None
            row = torch.log_softmax(logits[len(prompt) + position - 1].float(), dim=-1)
            best = torch.topk(row, max(alternatives, 1))
            pairs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
            for token, value in pairs[:alternatives]:
                assert top[f"token_id:{token}"] == pytest.approx(value, abs=1e-4)
            assert f"token_id:{generated[position]}" in top
            assert len(top) in (alternatives, alternatives + 1)
        assert logprobs.text_offset is not None and logprobs.text_offset == sorted(
            logprobs.text_offset
        )


def test_echo_scores_the_prompt_as_an_evaluation_harness_asks(
    gpt: RunningServer, gpt_dir: Path
) -> None:
    """lm-evaluation-harness's log-likelihood request: a batch of token-id prompts, echo,
    logprobs, no new tokens; the prompt tokens' log-probabilities are the model's."""
    forward = gpt_forward(gpt_dir)
    reply = client(gpt).completions.create(
        model="tiny", prompt=PROMPTS, max_tokens=0, echo=True, logprobs=1, temperature=0,
        extra_body=IDS,
    )  # fmt: skip
    assert [choice.index for choice in reply.choices] == list(range(len(PROMPTS)))
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == sum(len(p) for p in PROMPTS)
    assert reply.usage.completion_tokens == 0
    tokenizer = gpt.engine.tokenizer
    for prompt, choice in zip(PROMPTS, reply.choices, strict=True):
        logprobs = choice.logprobs
        assert logprobs is not None and logprobs.token_logprobs is not None
        assert choice.text == tokenizer.decode(prompt)
        assert token_ids(logprobs.tokens or []) == prompt
        assert logprobs.token_logprobs[0] is None  # nothing predicts the first token
        expected = log_likelihood(forward(prompt), prompt, 1)
        torch.testing.assert_close(
            [float(lp) for lp in logprobs.token_logprobs[1:]], expected, rtol=1e-4, atol=1e-4
        )
        # Greedy check as harnesses do it: is each token the likeliest at its position?
        assert logprobs.top_logprobs is not None
        for i, top in enumerate(logprobs.top_logprobs[1:], start=1):
            assert top is not None
            likeliest = max(top, key=lambda name: top[name])
            is_greedy = int(forward(prompt)[i - 1].argmax()) == prompt[i]
            assert (likeliest == f"token_id:{prompt[i]}") == is_greedy


def test_echo_with_generation_streams_the_prompt_first(gpt: RunningServer) -> None:
    api = client(gpt)
    text = "the quick brown fox"
    whole = api.completions.create(
        model="tiny", prompt=text, max_tokens=4, echo=True, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = whole.choices[0]
    assert choice.text.startswith(text) and len(choice.text) > len(text)
    prompt_tokens = len(gpt.engine.tokenizer.encode(text))
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert len(choice.logprobs.tokens) == prompt_tokens + 4
    chunks = list(
        api.completions.create(
            model="tiny", prompt=text, max_tokens=4, echo=True, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].text == text
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text


def test_n_choices_best_of_and_lists_of_prompts(gpt: RunningServer) -> None:
    api = client(gpt)
    common: dict[str, Any] = {"model": "tiny", "max_tokens": 8, "temperature": 1.0,
                              "extra_body": {"ignore_eos": True, **IDS}}  # fmt: skip
    three = api.completions.create(prompt="seven wizards", n=3, seed=5, logprobs=0, **common)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.text for c in three.choices}) > 1  # independent draws
    assert three.usage is not None and three.usage.completion_tokens == 24
    one = api.completions.create(prompt="seven wizards", n=1, seed=5, **common)
    assert one.choices[0].text == three.choices[0].text  # choice i is seeded seed + i
    # best_of=3, n=1: the likeliest of the three draws above.
    best = api.completions.create(prompt="seven wizards", best_of=3, seed=5, logprobs=0, **common)
    scores = [sum(c.logprobs.token_logprobs) for c in three.choices]  # type: ignore[union-attr, arg-type]
    assert len(best.choices) == 1
    assert best.choices[0].text == three.choices[scores.index(max(scores))].text
    # Two prompts x two choices: prompt-major order, as OpenAI's.
    both = api.completions.create(prompt=["the", "a lazy dog"], n=2, seed=1, **common)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    alone = api.completions.create(prompt="a lazy dog", n=2, seed=1, **common)
    assert [c.text for c in both.choices[2:]] == [c.text for c in alone.choices]


def test_streamed_choices_carry_their_index_and_logprobs(gpt: RunningServer) -> None:
    api = client(gpt)
    common: dict[str, Any] = {"model": "tiny", "prompt": "hum songs", "max_tokens": 6,
                              "n": 2, "seed": 3, "logprobs": 1,
                              "extra_body": {"ignore_eos": True}}  # fmt: skip
    whole = api.completions.create(**common)
    texts = ["", ""]
    tokens: list[list[str]] = [[], []]
    finishes: dict[int, str | None] = {}
    for chunk in api.completions.create(stream=True, **common):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.logprobs is not None and choice.logprobs.tokens:
                tokens[choice.index] += choice.logprobs.tokens
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert tokens == [c.logprobs.tokens for c in whole.choices]  # type: ignore[union-attr]
    assert finishes == {0: "length", 1: "length"}


def test_chat_logprobs_and_top_logprobs(gpt: RunningServer, gpt_dir: Path) -> None:
    api = client(gpt)
    reply = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the quick fox"}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        # Greedy: the chosen token is the likeliest.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.token == entry.top_logprobs[0].token
        assert entry.bytes is not None and bytes(entry.bytes).decode(errors="replace")
    streamed = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the quick fox"}], max_tokens=5,
        temperature=0, logprobs=True, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    streamed_entries = [
        entry.logprob
        for chunk in streamed
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content
        for entry in chunk.choices[0].logprobs.content
    ]
    assert streamed_entries == pytest.approx([entry.logprob for entry in content], abs=1e-6)


def greedy_with_penalties(
    forward: Any, prompt: list[int], steps: int, presence: float, frequency: float,
    bias: dict[int, float],
) -> list[int]:  # fmt: skip
    """OpenAI's definition on the full forward: logit[j] - count[j] * frequency
    - (count[j] > 0) * presence + bias[j], greedy."""
    out: list[int] = []
    for _ in range(steps):
        logits = forward(prompt + out)[-1].float().clone()
        for token, value in bias.items():
            logits[token] += value
        for token in set(out):
            logits[token] -= out.count(token) * frequency + presence
        out.append(int(logits.argmax()))
    return out


def test_penalties_and_logit_bias_follow_openais_definition(
    gpt: RunningServer, gpt_dir: Path
) -> None:
    forward = gpt_forward(gpt_dir)
    prompt = [5, 9, 13]
    plain = greedy_with_penalties(forward, prompt, 12, 0.0, 0.0, {})
    cases = [(0.0, 2.0, {}), (2.0, 0.0, {}), (1.0, 1.5, {plain[0]: -100.0, 17: 5.0})]

    async def ask() -> list[Any]:
        api = aclient(gpt)
        try:
            return await gather(*(
                api.completions.create(
                    model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                    presence_penalty=presence, frequency_penalty=frequency,
                    logit_bias={str(t): b for t, b in bias.items()},
                    extra_body={"ignore_eos": True, **IDS},
                )
                for presence, frequency, bias in cases
            ))  # fmt: skip
        finally:
            await api.close()

    replies = asyncio.run(ask())  # decoded together, each row with its own penalties
    outputs = []
    for (presence, frequency, bias), reply in zip(cases, replies, strict=True):
        produced = token_ids(reply.choices[0].logprobs.tokens)
        assert produced == greedy_with_penalties(forward, prompt, 12, presence, frequency, bias)
        outputs.append(produced)
    assert all(output != plain for output in outputs)  # the penalties did change the text
    assert plain[0] not in outputs[2]  # a bias of -100 bans the token


# -- a transformers Llama with LoRA adapters -----------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, Path]]]:
    folder = tmp_path_factory.mktemp("llama-logprobs")
    base = build(folder / "base")
    adapters = [
        ("counting", random_adapter(base, folder / "a", 1, "all-linear")),
        ("attention-only", random_adapter(base, folder / "b", 2, ["q_proj", "v_proj"])),
    ]
    return base, adapters


def test_llama_adapters_logprobs_and_echo_per_row(
    llama: tuple[Path, list[tuple[str, Path]]],
) -> None:
    """Requests for the base and two adapters, batched together, with logprobs and echo:
    each matches its own model's (peft's) full forward."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base, adapters = llama
    prompt = [5, 9, 13, 40, 41]

    def reference(adapter: Path | None) -> Any:
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(str(base))
        if adapter is not None:
            model = peft.PeftModel.from_pretrained(model, str(adapter))
        model.eval()

        def logits(ids: Sequence[int]) -> torch.Tensor:
            with torch.no_grad():
                out: torch.Tensor = model(input_ids=torch.tensor([list(ids)])).logits[0]
            return out

        return logits

    forwards = {"tiny": reference(None), **{name: reference(path) for name, path in adapters}}
    with running_server(base, adapters=adapters, max_batch_size=8, max_concurrency=16) as server:

        async def ask() -> list[Any]:
            api = aclient(server)
            try:
                return await gather(*(
                    api.completions.create(
                        model=name, prompt=prompt, max_tokens=6, temperature=0.8, seed=7,
                        echo=True, logprobs=2, extra_body={"ignore_eos": True, **IDS},
                    )
                    for name in [*forwards, *forwards]
                ))  # fmt: skip
            finally:
                await api.close()

        replies = asyncio.run(ask())
    for name, reply in zip([*forwards, *forwards], replies, strict=True):
        assert reply.model == name
        logprobs = reply.choices[0].logprobs
        ids = token_ids(logprobs.tokens)
        assert ids[: len(prompt)] == prompt and len(ids) == len(prompt) + 6
        expected = log_likelihood(forwards[name](ids), ids, 1)
        given = [float(lp) for lp in logprobs.token_logprobs[1:]]
        torch.testing.assert_close(given, expected, rtol=1e-4, atol=1e-4)
        assert sum(given) == pytest.approx(sum(expected), abs=1e-3)
    # The three models score the same text differently.
    assert len({round(sum(r.choices[0].logprobs.token_logprobs[1:5]), 4) for r in replies}) == 3
