"""Models from `transformers`: an open-weights checkpoint (model.pretrained) or a Llama-class
model built from the spec (architecture: llama), optionally with LoRA adapters from `peft`.

`CausalLM` puts them behind the built-in GPT's interface (logits from token ids, greedy
generation, a parameter count), so the training loop, evaluation and checkpoints treat both
alike. Everything here runs on every rank except `export`, which rank 0 runs on CPU from the
consolidated weights of the final checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmops.api.trainingrun import Adapter, ModelArchitecture

# The files a tokenizer may consist of, copied next to an exported model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)


class CausalLM(nn.Module):
    """A transformers causal LM (or a peft model around one) as the trainer sees a model."""

    def __init__(self, model: nn.Module, context_length: int) -> None:
        super().__init__()
        self.model = model
        self.context_length = context_length

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=idx, use_cache=False).logits
        return logits

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation with exactly `new_tokens` forwards (ZeRO-3 needs every rank to
        take part in the same number), as the built-in model does."""
        for _ in range(new_tokens):
            window = idx[:, -self.context_length :]
            next_token = self(window)[:, -1, :].argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, next_token], dim=1)
        return idx

    def num_parameters(self) -> int:
        # ZeRO-3 leaves each rank a shard; ds_numel is the full size.
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())

    def num_trainable_parameters(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters() if p.requires_grad)


@dataclass(frozen=True)
class Shape:
    """What FLOP counting and the model card need to know of a transformers model."""

    architecture: str
    layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int | None

    @classmethod
    def of(cls, config: Any) -> Shape:
        return cls(
            architecture=(config.architectures or [config.model_type])[0],
            layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            vocab_size=int(config.vocab_size),
            max_positions=getattr(config, "max_position_embeddings", None),
        )


def llama_config(model: ModelArchitecture, vocab_size: int) -> Any:
    """A LlamaConfig from the spec (architecture: llama)."""
    from transformers import LlamaConfig

    hidden = model.hidden_size
    # Llama's 8/3 expansion of SwiGLU, rounded up to a multiple of 64 for efficient matmuls.
    intermediate = model.intermediate_size or 64 * -(-(8 * hidden // 3) // 64)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_key_value_heads or model.num_heads,
        max_position_embeddings=model.context_length,
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
        attention_dropout=model.dropout,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def build(
    model: ModelArchitecture,
    vocab_size: int,
    pretrained: Path | None,
    ds_config: Mapping[str, Any],
) -> nn.Module:
    """The transformers model of the spec: loaded from `pretrained`, or a llama from config.

    Under ZeRO-3 the parameters are created already partitioned (`HfDeepSpeedConfig` makes
    `from_pretrained` use `deepspeed.zero.Init`), so no rank ever holds the whole model.
    """
    import deepspeed
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    # Must stay alive while the model is created: transformers looks it up through a weakref.
    keep_alive = HfDeepSpeedConfig(dict(ds_config)) if zero3 else None  # type: ignore[no-untyped-call]
    try:
        if pretrained is not None:
            loaded: nn.Module = AutoModelForCausalLM.from_pretrained(
                str(pretrained), dtype=torch.float32, attn_implementation="sdpa"
            )
        else:
            config = llama_config(model, vocab_size)
            config._attn_implementation = "sdpa"
            if zero3:
                with deepspeed.zero.Init(config_dict_or_path=dict(ds_config)):
                    loaded = LlamaForCausalLM(config)
            else:
                loaded = LlamaForCausalLM(config)
    finally:
        del keep_alive
    if model.dropout and pretrained is not None:
        _set_dropout(loaded, model.dropout)
    return loaded


def _set_dropout(model: nn.Module, probability: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = probability
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "attention_dropout"):
        config.attention_dropout = probability


def check_compatible(shape: Shape, dataset_vocab: int, context_length: int) -> None:
    """Refuse data the model cannot read, before the first step rather than as a CUDA
    assert or silently wrong positions."""
    if dataset_vocab > shape.vocab_size:
        raise ValueError(
            f"the dataset's vocabulary ({dataset_vocab} tokens) is larger than the model's "
            f"({shape.vocab_size}): tokenize the Dataset with the model's tokenizer "
            "(spec.tokenizer.fromModel)"
        )
    if shape.max_positions is not None and context_length > shape.max_positions:
        raise ValueError(
            f"model.contextLength {context_length} exceeds the model's "
            f"{shape.max_positions} positions"
        )


def lora_config(adapter: Adapter) -> Any:
    from peft import LoraConfig

    targets: Any = list(adapter.target_modules) or "all-linear"
    return LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,  # type: ignore[arg-type]  # peft scales by any float
        lora_dropout=adapter.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def add_adapter(model: nn.Module, adapter: Adapter, device: torch.device) -> nn.Module:
    """Wrap `model` with LoRA adapters: only they train, the base stays frozen."""
    from peft import get_peft_model

    if adapter.quantization == "4bit":
        raise ValueError(
            quantization_problem(device)
            or "adapter.quantization 4bit (QLoRA) is not supported by this trainer yet"
        )
    wrapped: nn.Module = get_peft_model(model, lora_config(adapter))
    return wrapped


def quantization_problem(device: torch.device) -> str | None:
    """Why QLoRA cannot run here, or None."""
    if device.type != "cuda":
        return "adapter.quantization 4bit (QLoRA) needs CUDA GPUs; this pod has none"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "adapter.quantization 4bit (QLoRA) needs bitsandbytes in the trainer image"
    return None


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant, which also
    works with frozen inputs under LoRA)."""
    base: Any = model
    if hasattr(model, "get_base_model"):  # a peft model: the transformers model inside
        base = getattr(model, "get_base_model")()  # noqa: B009
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_trained(module: CausalLM, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load weights saved from a CausalLM: all of them (full training), or only the trained
    ones (a LoRA checkpoint leaves the frozen base out). Anything else missing is an error."""
    result = module.load_state_dict(dict(state_dict), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint has weights the model lacks: {result.unexpected_keys[:5]}")
    parameters = dict(module.named_parameters(remove_duplicate=False))
    loaded = {parameters[k].data_ptr() for k in state_dict if k in parameters}
    missing = [
        key
        for key in result.missing_keys
        if key in parameters
        and parameters[key].requires_grad
        and parameters[key].data_ptr() not in loaded  # a tied weight loaded under its twin
    ]
    if missing:
        raise ValueError(f"checkpoint lacks trained weights: {missing[:5]}")


def flops_per_token(shape: Shape, parameters: int, context: int, adapter: bool) -> float:
    """Training FLOPs per token: 6N (2N forward, 4N backward), or 4N with adapters (no weight
    gradients for the frozen base), plus attention scores (PaLM appendix B)."""
    weights = (4.0 if adapter else 6.0) * parameters
    return weights + 12.0 * shape.layers * shape.hidden_size * context


def describe(shape: Shape, source: str | None, adapter: Adapter | None) -> dict[str, Any]:
    """The model section of state.json and the model card."""
    described: dict[str, Any] = {
        "architecture": shape.architecture,
        "num_layers": shape.layers,
        "hidden_size": shape.hidden_size,
        "vocab_size": shape.vocab_size,
    }
    if source is not None:
        described["pretrained"] = source
    if adapter is not None:
        described["adapter"] = adapter.to_dict()
    return described


def copy_tokenizer(sources: list[Path], folder: Path) -> None:
    """The first source folder holding tokenizer files gives them all."""
    for source in sources:
        present = [name for name in TOKENIZER_FILES if (source / name).is_file()]
        if present:
            for name in present:
                shutil.copyfile(source / name, folder / name)
            return


def save_checkpoint_adapter(
    module: CausalLM, checkpoint_dir: Path, adapter_subdir: str, tokenizer_sources: list[Path]
) -> Path:
    """A LoRA checkpoint's adapter in peft's layout, beside the DeepSpeed files: what a
    ModelDeployment serves when it follows the run's latest or best checkpoint. Built from
    the checkpoint's consolidated weights, so it is the same for every ZeRO stage; small,
    since a LoRA checkpoint holds the adapter only."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from llmops_trainer.weights import consolidated_state_dict

    network: Any = module.model
    prefix = "model."  # CausalLM's attribute holding the peft model
    trained = {
        key.removeprefix(prefix): tensor
        for key, tensor in consolidated_state_dict(checkpoint_dir).items()
        if key.startswith(prefix)
    }
    weights = get_peft_model_state_dict(network, state_dict=trained)
    folder = checkpoint_dir / adapter_subdir
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(folder / "adapter_model.safetensors")
    )
    network.peft_config["default"].save_pretrained(str(folder))
    copy_tokenizer(tokenizer_sources, folder)
    return folder


def export(
    model: ModelArchitecture,
    adapter: Adapter | None,
    pretrained: Path | None,
    vocab_size: int,
    weights: Mapping[str, torch.Tensor],
    output: Path,
    model_subdir: str,
    adapter_subdir: str,
    tokenizer_sources: list[Path],
) -> list[Path]:
    """Write what `from_pretrained` loads: the full model (full training, or merged LoRA on
    request) under `model_subdir`, the adapter (peft layout) under `adapter_subdir`."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if pretrained is not None:
        base: nn.Module = AutoModelForCausalLM.from_pretrained(str(pretrained), dtype=torch.float32)
    else:
        base = LlamaForCausalLM(llama_config(model, vocab_size))
    network: Any = base if adapter is None else get_peft_model(base, lora_config(adapter))
    # The same module tree as in training (peft freezes the base here too), so the
    # checkpoint's names and its set of trained weights match.
    load_trained(CausalLM(network, model.context_length), weights)
    written: list[Path] = []
    if adapter is not None:
        adapter_dir = output / adapter_subdir
        network.save_pretrained(str(adapter_dir))
        copy_tokenizer(tokenizer_sources, adapter_dir)
        written.append(adapter_dir)
        if not adapter.merge:
            return written
        network = network.merge_and_unload()
    model_dir = output / model_subdir
    network.save_pretrained(str(model_dir), safe_serialization=True)
    copy_tokenizer(tokenizer_sources, model_dir)
    written.append(model_dir)
    return written
