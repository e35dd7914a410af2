"""The model folders the server accepts, as the trainer writes them:

- the final model (`<LLMOPS_OUTPUT_DIR>/model`, the GPT-2 layout of `hf_export`, with
  tokenizer.json and llmops_model.json), or the output folder above it;
- a checkpoint folder (`step-<N>`, DeepSpeed files plus trainer_state.json), verified against
  its checkpoint.json before use; or a checkpoint root or pointer file (`latest`, `best`);
- a `transformers` model folder (config.json, safetensors, tokenizer files) of a Llama-family
  architecture: what the trainer exports for open-weights and llama runs, or a downloaded
  model. Its chat template renders chat requests; every end-of-turn id it names stops.

The tokenizer is LLMOPS_TOKENIZER_PATH when set, else a tokenizer.json in the folder or next
to the checkpoint root; without one, prompts are token ids written as numbers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmops.api.workload import Env
from llmops_trainer import checkpoint, hf_export
from llmops_trainer.model import GPTConfig
from llmops_trainer.serve.text import (
    ChatTemplate,
    HFTokenizer,
    NumericTokenizer,
    TextTokenizer,
)

TOKENIZER_ENV = Env.TOKENIZER_PATH
MODEL_CONFIG = "llmops_model.json"  # our full model config, next to the export
log = logging.getLogger("llmops_trainer.serve")


class ModelFolderError(RuntimeError):
    """The folder holds nothing the server can load."""


@dataclass
class LoadedModel:
    config: GPTConfig | None  # the built-in GPT's; None for a transformers model
    state_dict: dict[str, torch.Tensor]
    tokenizer: TextTokenizer
    eos_token_id: int | None
    folder: Path
    label: str  # what is served: the checkpoint name or the folder name
    transformers_model: Any = None  # a transformers *ForCausalLM, loaded on the CPU
    stop_token_ids: frozenset[int] = frozenset()  # besides eos: other end-of-turn ids
    chat: ChatTemplate | None = None  # the model's own chat template

    @property
    def context_length(self) -> int:
        if self.config is not None:
            return self.config.context_length
        return int(self.transformers_model.config.max_position_embeddings)


def model_folder(path: Path) -> Path:
    """The folder to load from what a user or the controller points at."""
    if not path.exists():
        raise ModelFolderError(f"{path} does not exist")
    if path.is_dir() and not hf_export.is_export(path) and hf_export.is_export(path / "model"):
        return path / "model"  # the trainer's output folder
    return checkpoint.resolve(path)


def is_transformers_model(folder: Path) -> bool:
    """A transformers folder other than our GPT-2 layout (which the GPT path loads)."""
    config = folder / hf_export.CONFIG
    if not config.is_file() or (folder / MODEL_CONFIG).is_file():
        return False
    return bool(json.loads(config.read_text()).get("model_type") != "gpt2")


def load(path: Path) -> LoadedModel:
    folder = model_folder(path)
    if is_transformers_model(folder):
        return _load_transformers(folder)
    if hf_export.is_export(folder):
        config, state_dict = hf_export.load_export(folder)
        ours = folder / MODEL_CONFIG
        if ours.is_file():
            config = GPTConfig(**json.loads(ours.read_text()))
        label = folder.name
        if label == "model":
            label = folder.parent.name or label
    elif (folder / checkpoint.STATE).is_file():
        found = checkpoint.problems(folder)
        if found:
            raise ModelFolderError(f"damaged checkpoint {folder}: {'; '.join(found)}")
        config = GPTConfig(**checkpoint.read_state(folder)["model"])
        from llmops_trainer.weights import consolidated_state_dict

        state_dict = consolidated_state_dict(folder)
        label = folder.name
    else:
        raise ModelFolderError(
            f"{folder} is neither an exported model (config.json and model.safetensors) nor a "
            f"checkpoint ({checkpoint.STATE})"
        )
    if not config.causal:
        raise ModelFolderError(f"{folder} holds a masked-lm (encoder) model; it cannot generate")
    tokenizer, eos = _tokenizer(folder, config.vocab_size)
    return LoadedModel(config, state_dict, tokenizer, eos, folder, label)


def _load_transformers(folder: Path) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    from llmops_trainer.serve.decoder_cache import SUPPORTED

    model_type = json.loads((folder / hf_export.CONFIG).read_text()).get("model_type")
    if model_type not in SUPPORTED:
        raise ModelFolderError(
            f"{folder}: the built-in engine serves {', '.join(SUPPORTED)} and llmops GPT "
            f"models, not {model_type!r}; serve it with runtime vllm"
        )
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    vocab = int(model.config.vocab_size)
    tokenizer, eos = _tokenizer(folder, vocab)
    stops = set(_generation_eos_ids(folder))
    if eos is not None:
        stops.add(eos)
    label = folder.parent.name if folder.name == "model" and folder.parent.name else folder.name
    return LoadedModel(
        None,
        {},
        tokenizer,
        eos,
        folder,
        label,
        transformers_model=model,
        stop_token_ids=frozenset(stops),
        chat=ChatTemplate.of(folder),
    )


def _tokenizer_path(folder: Path) -> Path | None:
    explicit = os.environ.get(TOKENIZER_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise ModelFolderError(f"{TOKENIZER_ENV}={explicit} is not a file")
        return Path(explicit)
    # A checkpoint sits in <output>/checkpoints/step-N; the export in <output>/model.
    for candidate in (folder, folder.parent, folder.parent.parent / "model"):
        if (candidate / "tokenizer.json").is_file():
            return candidate / "tokenizer.json"
    return None


def _tokenizer(folder: Path, vocab_size: int) -> tuple[TextTokenizer, int | None]:
    eos = _generation_eos(folder)
    path = _tokenizer_path(folder)
    if path is None:
        log.warning("no tokenizer.json for %s: prompts and outputs are token ids", folder)
        return NumericTokenizer(vocab_size), eos
    from tokenizers import Tokenizer

    from llmops_trainer.data.tokenize import eos_id

    hf = Tokenizer.from_file(str(path))
    if eos is None:
        try:
            eos = eos_id(hf)
        except ValueError:
            eos = None
    return HFTokenizer(hf), eos


def _generation_eos(folder: Path) -> int | None:
    ids = _generation_eos_ids(folder)
    return ids[0] if ids else None


def _generation_eos_ids(folder: Path) -> list[int]:
    """generation_config.json's eos_token_id: one id, or a list (Llama 3 ends turns and
    documents with different tokens)."""
    path = folder / "generation_config.json"
    if path.is_file():
        value = json.loads(path.read_text()).get("eos_token_id")
        if isinstance(value, int):
            return [value]
        if isinstance(value, list):
            return [v for v in value if isinstance(v, int)]
    return []
