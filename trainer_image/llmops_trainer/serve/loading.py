"""The model folders the server accepts, as the trainer writes them:

- the final model (`<LLMOPS_OUTPUT_DIR>/model`, the GPT-2 layout of `hf_export`, with
  tokenizer.json and llmops_model.json), or the output folder above it;
- a checkpoint folder (`step-<N>`, DeepSpeed files plus trainer_state.json), verified against
  its checkpoint.json before use; or a checkpoint root or pointer file (`latest`, `best`).

The tokenizer is LLMOPS_TOKENIZER_PATH when set, else a tokenizer.json in the folder or next
to the checkpoint root; without one, prompts are token ids written as numbers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llmops.api.workload import Env
from llmops_trainer import checkpoint, hf_export
from llmops_trainer.model import GPTConfig
from llmops_trainer.serve.text import HFTokenizer, NumericTokenizer, TextTokenizer

TOKENIZER_ENV = Env.TOKENIZER_PATH
MODEL_CONFIG = "llmops_model.json"  # our full model config, next to the export
log = logging.getLogger("llmops_trainer.serve")


class ModelFolderError(RuntimeError):
    """The folder holds nothing the server can load."""


@dataclass
class LoadedModel:
    config: GPTConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: TextTokenizer
    eos_token_id: int | None
    folder: Path
    label: str  # what is served: the checkpoint name or the folder name


def model_folder(path: Path) -> Path:
    """The folder to load from what a user or the controller points at."""
    if not path.exists():
        raise ModelFolderError(f"{path} does not exist")
    if path.is_dir() and not hf_export.is_export(path) and hf_export.is_export(path / "model"):
        return path / "model"  # the trainer's output folder
    return checkpoint.resolve(path)


def load(path: Path) -> LoadedModel:
    folder = model_folder(path)
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
    path = folder / "generation_config.json"
    if path.is_file():
        value = json.loads(path.read_text()).get("eos_token_id")
        if isinstance(value, int):
            return value
    return None
