"""LoRA adapters served by name on one base model (peft's folder layout).

An adapter is a set of low-rank updates: for a projection W of the base, the adapter adds
scale * B(A(x)). The engine applies them per request, so sequences of different adapters
(and of the base) share one batch and one KV cache: each row of a projection's output gets
the update of its own adapter only. Nothing is merged into the base weights.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight -> (3, "self_attn.q_proj", "A")
_KEY = re.compile(r"layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
SUPPORTED_MODULES = frozenset(
    {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
)


class AdapterError(ValueError):
    """An adapter folder the engine cannot serve on this base."""


@dataclass
class Adapter:
    name: str
    folder: Path
    # (layer, module) -> (A (rank, in), B (out, rank)), scale folded into B
    updates: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def is_adapter(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def load(name: str, folder: Path) -> Adapter:
    if not is_adapter(folder):
        raise AdapterError(f"adapter {name!r}: {folder} has no {CONFIG} and {WEIGHTS}")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: only LoRA adapters are served")
    if config.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: DoRA adapters are not served")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    pieces: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(folder / WEIGHTS)).items():
        found = _KEY.search(key)
        if found is None:
            raise AdapterError(f"adapter {name!r}: unexpected weight {key}")
        layer, module, part = int(found[1]), found[2], found[3]
        if module not in SUPPORTED_MODULES:
            raise AdapterError(f"adapter {name!r}: adapts {module}, which is not served")
        pieces.setdefault((layer, module), {})[part] = tensor.float()
    adapter = Adapter(name, folder)
    for where, parts in pieces.items():
        if set(parts) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: {where} lacks lora_A or lora_B")
        adapter.updates[where] = (parts["A"], parts["B"] * scale)
    return adapter


def check_fits(adapter: Adapter, shapes: dict[tuple[int, str], tuple[int, int]]) -> None:
    """Refuse an adapter trained on another base: every update must fit its projection
    (out, in) of this model."""
    for where, (a, b) in adapter.updates.items():
        if where not in shapes:
            raise AdapterError(f"adapter {adapter.name!r}: the base has no layer {where}")
        out_features, in_features = shapes[where]
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise AdapterError(
                f"adapter {adapter.name!r}: {where} is {b.shape[0]}x{a.shape[1]}, the base's "
                f"is {out_features}x{in_features}: it was trained on another model"
            )
