"""Export of a causal LM in the Hugging Face GPT-2 layout (`GPT2LMHeadModel`), and back.

Our parameter names are GPT-2's; the differences are that GPT-2 stores its projections as
`Conv1D` (weight shape (in, out), the transpose of `nn.Linear`) and saves the tied head only
once (as `transformer.wte.weight`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmops_trainer.model import GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# Projections stored as Conv1D in GPT-2.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_TIED_HEAD = "lm_head.weight"
# transformers' names of our activations (GPT2Config.activation_function).
_HF_ACTIVATION = {"gelu-tanh": "gelu_new", "gelu": "gelu"}


def gpt2_config(config: GPTConfig, eos_token_id: int) -> dict[str, Any]:
    """config.json as `transformers.GPT2Config` writes it."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_inner": None,
        "activation_function": _HF_ACTIVATION[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def to_gpt2_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    exported = {}
    for name, tensor in state_dict.items():
        if name == _TIED_HEAD:
            continue
        tensor = tensor.detach().float().cpu()
        if name.endswith(_CONV1D):
            tensor = tensor.t()
        exported[name] = tensor.contiguous()
    return exported


def zero_biases(config: GPTConfig) -> dict[str, torch.Tensor]:
    """The biases GPT-2's layout always has, as zeros, for a model built without biases:
    with them the export computes exactly what the model does."""
    width = config.hidden_size
    sizes = {"ln_1": width, "attn.c_attn": 3 * width, "attn.c_proj": width, "ln_2": width}
    sizes |= {"mlp.c_fc": 4 * width, "mlp.c_proj": width}
    zeros = {
        f"transformer.h.{layer}.{module}.bias": torch.zeros(size)
        for layer in range(config.num_layers)
        for module, size in sizes.items()
    }
    zeros["transformer.ln_f.bias"] = torch.zeros(width)
    return zeros


def from_gpt2_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    restored = {
        name: tensor.t().contiguous() if name.endswith(_CONV1D) else tensor
        for name, tensor in state_dict.items()
        if not name.endswith(".attn.bias") and not name.endswith(".attn.masked_bias")
    }
    restored[_TIED_HEAD] = restored["transformer.wte.weight"]
    return restored


def export(
    state_dict: dict[str, torch.Tensor],
    config: GPTConfig,
    eos_token_id: int,
    folder: Path,
    tokenizer: Path | None = None,
) -> Path:
    """Write `folder` as a GPT-2 checkpoint (config.json, model.safetensors, tokenizer)."""
    if not config.causal:
        raise ValueError("only causal models have a GPT-2 export")
    folder.mkdir(parents=True, exist_ok=True)
    exported = to_gpt2_state_dict(state_dict)
    if not config.bias:
        exported |= zero_biases(config)
    save_file(exported, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(gpt2_config(config, eos_token_id), indent=2))
    generation = {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer is not None and tokenizer.is_file():
        shutil.copyfile(tokenizer, folder / "tokenizer.json")
        write_tokenizer_config(folder, config.context_length)
    return folder


def write_tokenizer_config(folder: Path, context_length: int) -> None:
    """What AutoTokenizer needs beside a bare tokenizer.json."""
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def is_export(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file()


def load_export(folder: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Our model config and state dict from a GPT-2 layout folder."""
    hf = json.loads((folder / CONFIG).read_text())
    config = GPTConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf["n_positions"],
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        hidden_size=hf["n_embd"],
        activation=next(
            ours for ours, name in _HF_ACTIVATION.items() if name == hf["activation_function"]
        ),
    )
    return config, from_gpt2_state_dict(load_file(str(folder / WEIGHTS)))
