from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from llmops_trainer import hf_export  # noqa: E402
from llmops_trainer.model import GPT, GPTConfig, flops_per_token, lm_loss  # noqa: E402

CONFIG = GPTConfig(vocab_size=50, context_length=12, num_layers=2, num_heads=2, hidden_size=16)


def test_head_is_tied_to_the_embedding() -> None:
    model = GPT(CONFIG)
    assert model.lm_head.weight is model.transformer.wte.weight
    names = dict(model.named_parameters())
    assert "lm_head.weight" not in names  # counted once


def test_causal_model_does_not_look_ahead_and_encoder_does() -> None:
    torch.manual_seed(0)
    idx = torch.randint(50, (1, 12))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 50
    for causal in (True, False):
        model = GPT(GPTConfig(**{**CONFIG.to_dict(), "causal": causal})).eval()
        same = torch.allclose(model(idx)[0, :-1], model(changed)[0, :-1], atol=1e-6)
        assert same is causal


def test_loss_starts_near_uniform_and_flops_formula() -> None:
    model = GPT(CONFIG)
    idx = torch.randint(50, (4, 12))
    assert lm_loss(model(idx), idx).item() == pytest.approx(
        torch.log(torch.tensor(50.0)).item(), abs=0.3
    )
    n = model.num_parameters()
    assert flops_per_token(CONFIG, n) == 6 * n + 12 * 2 * 16 * 12


def test_gpt2_export_has_gpt2_names_shapes_and_config(tmp_path: Path) -> None:
    model = GPT(CONFIG)
    hf_export.export(model.state_dict(), CONFIG, eos_token_id=0, folder=tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    h, v = CONFIG.hidden_size, CONFIG.vocab_size
    expected = {
        "transformer.wte.weight": (v, h),
        "transformer.wpe.weight": (CONFIG.context_length, h),
        "transformer.ln_f.weight": (h,),
        "transformer.ln_f.bias": (h,),
    }
    for i in range(CONFIG.num_layers):
        p = f"transformer.h.{i}."
        expected |= {
            p + "ln_1.weight": (h,), p + "ln_1.bias": (h,),
            p + "attn.c_attn.weight": (h, 3 * h), p + "attn.c_attn.bias": (3 * h,),
            p + "attn.c_proj.weight": (h, h), p + "attn.c_proj.bias": (h,),
            p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
            p + "mlp.c_fc.weight": (h, 4 * h), p + "mlp.c_fc.bias": (4 * h,),
            p + "mlp.c_proj.weight": (4 * h, h), p + "mlp.c_proj.bias": (h,),
        }  # fmt: skip
    assert {k: tuple(t.shape) for k, t in tensors.items()} == expected
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["n_embd"], config["n_layer"], config["n_head"]) == (16, 2, 2)
    assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"]


def test_export_round_trips_to_the_same_logits(tmp_path: Path) -> None:
    model = GPT(CONFIG).eval()
    hf_export.export(model.state_dict(), CONFIG, eos_token_id=0, folder=tmp_path)
    config, state = hf_export.load_export(tmp_path)
    again = GPT(config).eval()
    again.load_state_dict(state)
    idx = torch.randint(50, (2, 12))
    assert torch.allclose(model(idx), again(idx), atol=1e-6)


def test_encoders_are_not_exported_as_gpt2(tmp_path: Path) -> None:
    encoder = GPTConfig(**{**CONFIG.to_dict(), "causal": False})
    with pytest.raises(ValueError, match="causal"):
        hf_export.export(GPT(encoder).state_dict(), encoder, 0, tmp_path)


NANOGPT_STYLE = GPTConfig(**{**CONFIG.to_dict(), "bias": False, "activation": "gelu"})


def test_a_model_without_biases_has_none_and_uses_the_exact_gelu() -> None:
    model = GPT(NANOGPT_STYLE)
    assert not [name for name, _ in model.named_parameters() if name.endswith(".bias")]
    assert model.transformer.h[0].mlp.act.approximate == "none"
    assert GPT(CONFIG).transformer.h[0].mlp.act.approximate == "tanh"
    with pytest.raises(ValueError, match="activation 'relu'"):
        GPT(GPTConfig(**{**CONFIG.to_dict(), "activation": "relu"}))


def test_export_of_a_model_without_biases_computes_the_same_in_transformers(
    tmp_path: Path,
) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(NANOGPT_STYLE).eval()
    hf_export.export(model.state_dict(), NANOGPT_STYLE, eos_token_id=0, folder=tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["activation_function"] == "gelu"
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(50, (2, 12))
    assert torch.allclose(model(idx), hf(idx).logits, atol=1e-5)
    # Back in our layout: the zero biases make it a biased model with the same logits.
    loaded, state = hf_export.load_export(tmp_path)
    assert loaded.activation == "gelu" and loaded.bias
    again = GPT(loaded).eval()
    again.load_state_dict(state)
    assert torch.allclose(model(idx), again(idx), atol=1e-6)


def test_fine_tuning_a_model_without_biases_from_its_export(tmp_path: Path) -> None:
    from llmops_trainer.train import load_weights

    model = GPT(NANOGPT_STYLE)
    hf_export.export(model.state_dict(), NANOGPT_STYLE, eos_token_id=0, folder=tmp_path)
    _, state = hf_export.load_export(tmp_path)
    again = GPT(NANOGPT_STYLE)
    load_weights(again, state)  # the export's zero biases are dropped
    pairs = zip(model.parameters(), again.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    state["transformer.ln_f.bias"] = torch.ones(CONFIG.hidden_size)
    with pytest.raises(ValueError, match=r"transformer\.ln_f\.bias is not zero"):
        load_weights(GPT(NANOGPT_STYLE), state)
