"""Full fp32 weights of a model, read from a checkpoint written with any ZeRO stage and any
number of processes: what a resume on another world size, a fine-tune and the export need."""

from __future__ import annotations

from pathlib import Path

import torch

from llmops_trainer import checkpoint, hf_export

MODEL_STATES = "mp_rank_00_model_states.pt"


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict of a checkpoint folder (ours) or a GPT-2 export folder."""
    if hf_export.is_export(folder):
        return hf_export.load_export(folder)[1]
    state = checkpoint.read_state(folder)
    if state["zeroStage"] == 0:
        # Without ZeRO, rank 0's module file holds every weight (in the training precision).
        saved = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=False)
        return {name: tensor.float() for name, tensor in saved["module"].items()}
    # With ZeRO the fp32 master weights are spread over the ranks' optimizer shards.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    merged: dict[str, torch.Tensor] = get_fp32_state_dict_from_zero_checkpoint(
        str(folder.parent), tag=folder.name
    )
    return merged
