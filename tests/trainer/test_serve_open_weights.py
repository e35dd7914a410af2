"""The built-in engine serving `transformers` models: the KV cache against the models' own
forward for each supported family, batched greedy against unbatched against `generate`, and
chat requests through the official `openai` client rendered with the model's chat template."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from fixtures.tiny_llama import build
from serve_support import running_server
from test_serve_engine import GREEDY, run_engine

from llmops_trainer.serve import loading
from llmops_trainer.serve.__main__ import build_engine
from llmops_trainer.serve.decoder_cache import DecoderKVCacheModel
from llmops_trainer.serve.engine import Engine
from llmops_trainer.serve.metrics import ServingMetrics
from llmops_trainer.serve.settings import ServeSettings

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 9, 13], [40], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7], [100, 3, 61, 2, 2], [17, 18]]
SMALL = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("tiny-llama"))


def family_model(family: str) -> Any:
    """A random model of each family the engine claims, with its quirks switched on: Qwen2's
    projection biases, Qwen3's per-head norms and explicit head_dim, Mistral's window."""
    configs = {
        "llama": transformers.LlamaConfig(**SMALL),
        "mistral": transformers.MistralConfig(**SMALL, sliding_window=64),
        "qwen2": transformers.Qwen2Config(**SMALL),
        "qwen3": transformers.Qwen3Config(**SMALL, head_dim=16),
    }
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[family]).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_kv_cache_logits_match_the_models_own_forward(family: str) -> None:
    model = family_model(family)
    reference = family_model(family)
    cached = DecoderKVCacheModel(model, 4, 64, torch.device("cpu"), torch.float32)
    sequences = [[1, 2, 3, 4, 5], [9], [3, 1, 4, 1, 5, 9, 2, 6], [50, 51]]
    logits = cached.prefill(0, sequences).logits
    for _ in range(5):
        with torch.no_grad():
            for row, sequence in enumerate(sequences):
                expected = reference(input_ids=torch.tensor([sequence])).logits[0, -1]
                torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)
        for sequence, token in zip(sequences, logits.argmax(-1).tolist(), strict=True):
            sequence.append(token)
        logits = cached.decode([s[-1] for s in sequences], [len(s) - 1 for s in sequences])


def engine(folder: Path, max_batch_size: int) -> Engine:
    settings = ServeSettings(
        folder, "tiny", max_batch_size=max_batch_size, max_concurrency=16,
        device="cpu", dtype="float32",
    )  # fmt: skip
    metrics = ServingMetrics(__import__("prometheus_client").CollectorRegistry())
    return build_engine(loading.load(folder), settings, metrics)


def test_batched_greedy_equals_unbatched_equals_transformers_generate(llama: Path) -> None:
    batched = run_engine(engine(llama, 4), PROMPTS, [GREEDY] * len(PROMPTS))
    one_at_a_time = run_engine(engine(llama, 1), PROMPTS, [GREEDY] * len(PROMPTS))
    assert batched == one_at_a_time
    model = transformers.AutoModelForCausalLM.from_pretrained(str(llama)).eval()
    for prompt, produced in zip(PROMPTS, batched, strict=True):
        generated = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=GREEDY.max_tokens,
            do_sample=False,
            eos_token_id=None,  # GREEDY ignores end of text, so generate must too
            pad_token_id=0,
        )
        assert generated[0, len(prompt) :].tolist() == produced


def test_chat_uses_the_models_template_and_stops_at_its_end_of_turn(llama: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(llama))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(llama)).eval()
    messages = [
        {"role": "system", "content": "you count"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "three four five"},
        {"role": "user", "content": "seven"},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "keys"):
        prompt = prompt["input_ids"]
    expected = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )[0, len(prompt) :].tolist()
    with running_server(llama, max_new_tokens=20) as server:
        assert server.engine.chat is not None
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=20,
            temperature=0,  # type: ignore[arg-type]
        )
        # The prompt the server built is apply_chat_template's, token for token.
        assert reply.usage is not None and reply.usage.prompt_tokens == len(prompt)
        ended = tokenizer.eos_token_id in expected
        produced = expected[: expected.index(tokenizer.eos_token_id)] if ended else expected
        assert reply.choices[0].message.content == tokenizer.decode(
            produced, skip_special_tokens=True
        )
        assert reply.choices[0].finish_reason == ("stop" if ended else "length")
        streamed = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
        assert text == reply.choices[0].message.content
        models = client.models.list().data
        assert [m.id for m in models] == ["tiny"]


def test_an_unsupported_family_is_refused_naming_vllm(tmp_path: Path) -> None:
    config = transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(loading.ModelFolderError, match="runtime vllm"):
        loading.load(tmp_path)


def random_adapter(base: Path, folder: Path, seed: int, targets: Any) -> Path:
    """A LoRA adapter with random (non-zero) updates, saved as peft saves a fine-tune's."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(str(folder))
    return folder


def test_adapters_by_model_name_give_their_own_models_outputs(llama: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    adapters = [
        ("counting", random_adapter(llama, tmp_path / "a", 1, "all-linear")),
        ("attention-only", random_adapter(llama, tmp_path / "b", 2, ["q_proj", "v_proj"])),
    ]
    prompt = [5, 9, 13, 40]

    def expected(adapter: Path | None) -> list[int]:
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(str(llama))
        if adapter is not None:
            model = peft.PeftModel.from_pretrained(model, str(adapter))
        out = model.eval().generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
        return [int(t) for t in out[0, len(prompt) :]]

    wanted = {"tiny": expected(None), **{name: expected(folder) for name, folder in adapters}}
    assert len({tuple(v) for v in wanted.values()}) == 3  # three different models

    with running_server(llama, adapters=adapters, max_batch_size=4, max_concurrency=16) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        listed = client.models.list().data
        assert [m.id for m in listed] == ["tiny", "counting", "attention-only"]

        import concurrent.futures

        def ask(name: str) -> str:
            reply = client.completions.create(
                model=name, prompt=prompt, max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            assert reply.model == name
            return reply.choices[0].text

        # All three at once, several times: sequences of different adapters share batches.
        names = list(wanted) * 3
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            results = list(pool.map(ask, names))
        tokenizer = server.engine.tokenizer
        for name, produced in zip(names, results, strict=True):
            assert produced == tokenizer.decode(wanted[name]), name

        with pytest.raises(openai.NotFoundError, match="counting"):
            client.completions.create(model="nope", prompt="x", max_tokens=1)


def test_an_adapter_of_another_base_is_refused(llama: Path, tmp_path: Path) -> None:
    other = build(tmp_path / "wider", hidden_size=32)
    adapter = random_adapter(other, tmp_path / "adapter", 3, "all-linear")
    settings = ServeSettings(llama, "tiny", device="cpu", dtype="float32",
                             adapters=[("wrong", adapter)])  # fmt: skip
    metrics = ServingMetrics(__import__("prometheus_client").CollectorRegistry())
    with pytest.raises(loading.ModelFolderError, match="another model"):
        build_engine(loading.load(llama), settings, metrics)


def test_a_new_adapter_version_is_served_without_a_restart(llama: Path, tmp_path: Path) -> None:
    """The adapters file changes under a running server (as the controller rewrites its
    ConfigMap): a new version of a name, a new name, a broken folder and a removed name.
    A stream started before the change finishes with the version it started with."""
    peft = pytest.importorskip("peft")
    from serve_support import metric

    from llmops_trainer.serve.adapter_watch import AdapterWatcher

    first = random_adapter(llama, tmp_path / "v1", 1, "all-linear")
    second = random_adapter(llama, tmp_path / "v2", 2, "all-linear")
    prompt = [5, 9, 13, 40]

    def expected(adapter: Path, tokens: int) -> list[int]:
        base: Any = transformers.AutoModelForCausalLM.from_pretrained(str(llama))
        model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
        return [int(t) for t in out[0, len(prompt) :]]

    listing = tmp_path / "adapters.json"

    def serve(entries: dict[str, Path]) -> None:
        listing.write_text(json.dumps([{"name": n, "path": str(p)} for n, p in entries.items()]))

    def slow_decoding(engine: Engine) -> None:  # so the swap lands mid-stream
        decode = engine.model.decode

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.02)
            return decode(*args, **kwargs)

        engine.model.decode = slow  # type: ignore[method-assign]

    serve({"counting": first})
    with running_server(
        llama, adapters=[("counting", first)], max_new_tokens=31, wrap=slow_decoding
    ) as server:
        engine, metrics = server.engine, server.state.metrics
        watcher = AdapterWatcher(listing, engine, metrics, 60.0, served={"counting": first})
        watcher.check()  # unchanged: nothing loaded
        assert metric(server.url, "llmops_serving_adapter_loads_total") == 0
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        tokenizer = engine.tokenizer

        def ask(name: str, tokens: int = 8) -> str:
            reply = client.completions.create(
                model=name, prompt=prompt, max_tokens=tokens, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            return reply.choices[0].text

        assert ask("counting") == tokenizer.decode(expected(first, 8))
        # A long stream on the first version; the swap happens after its first chunk.
        stream = client.completions.create(
            model="counting", prompt=prompt, max_tokens=30, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        assert engine.scheduler.running == 1  # the stream is still being generated
        serve({"counting": second, "extra": first})
        watcher.check()
        assert metric(server.url, "llmops_serving_adapter_loads_total", 'outcome="loaded"') == 2
        text += "".join(chunk.choices[0].text for chunk in chunks)
        assert text == tokenizer.decode(expected(first, 30))  # kept its version throughout
        assert ask("counting") == tokenizer.decode(expected(second, 8))
        assert ask("extra") == tokenizer.decode(expected(first, 8))
        assert [m.id for m in client.models.list().data] == ["tiny", "counting", "extra"]
        # The replaced version's slot is freed once nothing uses it.
        model = engine.model
        assert isinstance(model, DecoderKVCacheModel)
        assert model.adapters[0] is None and sum(a is not None for a in model.adapters) == 2

        # A half-written folder is refused and the served version stays; once it is
        # complete, it is loaded.
        broken = tmp_path / "v3"
        broken.mkdir()
        (broken / "adapter_config.json").write_text((second / "adapter_config.json").read_text())
        serve({"counting": broken, "extra": first})
        watcher.check()
        assert metric(server.url, "llmops_serving_adapter_loads_total", 'outcome="failed"') == 1
        assert ask("counting") == tokenizer.decode(expected(second, 8))
        watcher.check()  # unchanged: not tried again
        assert metric(server.url, "llmops_serving_adapter_loads_total", 'outcome="failed"') == 1
        shutil.copyfile(second / "adapter_model.safetensors", broken / "adapter_model.safetensors")
        watcher.check()
        assert metric(server.url, "llmops_serving_adapter_loads_total", 'outcome="loaded"') == 3

        serve({"extra": first})
        watcher.check()
        with pytest.raises(openai.NotFoundError, match="counting"):
            ask("counting")
        assert [m.id for m in client.models.list().data] == ["tiny", "extra"]
