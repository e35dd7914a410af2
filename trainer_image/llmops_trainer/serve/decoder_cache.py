"""Prefill and single-token decoding of a `transformers` Llama-family model (Llama, Mistral,
Qwen2, Qwen3) with the engine's slot-based KV cache.

The same contract as `engine.KVCacheModel` for the built-in GPT: running sequences occupy
cache slots 0..B-1, a step reads the cache as a slice, and a finished sequence's slot is
refilled by moving the last one. The layers' own modules (projections, norms, MLP, rotary
embedding) do the arithmetic, so the weights are used exactly as `transformers` uses them;
only the attention over the cache is ours. Grouped-query attention keeps the cache at the
key/value head count. LoRA adapters (serve/adapters.py) are applied per row: a batch mixes
sequences of several adapters and of the base.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llmops_trainer.serve.adapters import Adapter, check_fits

# Rows of a batch per adapter (1-based; the base's rows are not listed).
Groups = list[tuple[int, torch.Tensor]]

# Families whose decoder layer is: x + o_proj(attn(rope(q, k), v)) on input_layernorm(x),
# then x + mlp(post_attention_layernorm(x)), scaled by 1/sqrt(head_dim).
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def padded(
    prompts: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prompts right-padded for one prefill: (ids, lengths, positions, mask); the mask hides
    padding keys and keeps causality (None for a single prompt: plain causal attention)."""
    n, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros((n, longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    positions = torch.arange(longest, device=device)
    mask: torch.Tensor | None = None
    if n > 1:
        causal = positions[None, :] <= positions[:, None]
        mask = (causal[None] & (positions[None, None, :] < lengths[:, None, None]))[:, None]
    return ids.to(device), lengths, positions, mask


class UnsupportedModel(ValueError):
    pass


@dataclass
class Prefill:
    """What a prefill returns: the logits (n, vocab) of each prompt's last position, and for
    the rows asked for (echo with logprobs) the final hidden states (length, hidden) of every
    position, which `head` turns into logits a chunk at a time."""

    logits: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


class DecoderKVCacheModel:
    def __init__(
        self,
        model: Any,  # a transformers *ForCausalLM of a SUPPORTED family
        max_batch: int,
        context_length: int,
        device: torch.device,
        dtype: torch.dtype,
        adapters: Sequence[Adapter] = (),
    ) -> None:
        config = model.config
        if config.model_type not in SUPPORTED:
            raise UnsupportedModel(
                f"the built-in engine serves {', '.join(SUPPORTED)} and llmops GPT models, not "
                f"{config.model_type!r}; serve it with runtime vllm"
            )
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and context_length > window:
            raise UnsupportedModel(
                f"context {context_length} exceeds the model's sliding window {window}; "
                "set server.contextLength at most that"
            )
        self.config = config
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.max_batch = max_batch
        self.context_length = context_length
        self.decoder = self.model.model
        self.layers = list(self.decoder.layers)
        # Each modeling file defines its own rotary helper (same maths, family quirks).
        self._rotate = sys.modules[type(self.model).__module__].apply_rotary_pos_emb
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        shape = (len(self.layers), max_batch, self.kv_heads, context_length, self.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        shapes = {
            (index, f"{part}.{name}"): tuple(getattr(getattr(layer, part), name).weight.shape)
            for index, layer in enumerate(self.layers)
            for part, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
            for name in (f"{n}_proj" for n in names)
        }
        self.adapters: list[dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]] = []
        for adapter in adapters:
            check_fits(adapter, shapes)
            self.adapters.append(
                {
                    where: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
                    for where, (a, b) in adapter.updates.items()
                }
            )

    def _groups(self, adapters: Sequence[int] | None) -> Groups:
        if not adapters or not any(adapters):
            return []
        ids = torch.tensor(list(adapters))
        return [
            (int(a), torch.nonzero(ids == a).flatten().to(self.device))
            for a in sorted(set(adapters) - {0})
        ]

    def _linear(
        self, layer: int, name: str, module: Any, x: torch.Tensor, groups: Groups
    ) -> torch.Tensor:
        """The base projection, plus each row's adapter update where it has one."""
        y: torch.Tensor = module(x)
        for adapter, rows in groups:
            update = self.adapters[adapter - 1].get((layer, name))
            if update is not None:
                a, b = update
                y[rows] += (x[rows] @ a.T) @ b.T
        return y

    def _project(
        self, index: int, attn: Any, h: torch.Tensor, positions: torch.Tensor, groups: Groups
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (batch, heads, length, head_dim) with rotary positions."""
        batch, length, _ = h.shape

        def project(name: str) -> torch.Tensor:
            module = getattr(attn, name)
            out = self._linear(index, f"self_attn.{name}", module, h, groups)
            return out.view(batch, length, -1, self.head_dim)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = self.decoder.rotary_emb(v, positions)
        q, k = self._rotate(q, k, cos, sin)
        return q, k, v

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        # Grouped-query attention without copying the cache out to every query head.
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.kv_heads != self.heads
        )

    def _mlp(self, index: int, mlp: Any, h: torch.Tensor, groups: Groups) -> torch.Tensor:
        if not groups:
            out: torch.Tensor = mlp(h)
            return out
        # The gated MLP of these families, with each projection adapted per row.
        gate = self._linear(index, "mlp.gate_proj", mlp.gate_proj, h, groups)
        up = self._linear(index, "mlp.up_proj", mlp.up_proj, h, groups)
        return self._linear(index, "mlp.down_proj", mlp.down_proj, mlp.act_fn(gate) * up, groups)

    def _layer(
        self,
        index: int,
        x: torch.Tensor,
        positions: torch.Tensor,
        store: Any,
        read: Any,
        mask: torch.Tensor | None,
        groups: Groups,
    ) -> torch.Tensor:
        layer = self.layers[index]
        attn = layer.self_attn
        q, k, v = self._project(index, attn, layer.input_layernorm(x), positions, groups)
        store(index, k, v)
        k, v = read(index, k, v)
        y = self._attend(q, k, v, mask).transpose(1, 2).reshape(*x.shape[:2], -1)
        x = x + self._linear(index, "self_attn.o_proj", attn.o_proj, y, groups)
        out: torch.Tensor = x + self._mlp(
            index, layer.mlp, layer.post_attention_layernorm(x), groups
        )
        return out

    @torch.inference_mode()
    def prefill(
        self,
        first_slot: int,
        prompts: list[list[int]],
        adapters: Sequence[int] | None = None,
        every: Collection[int] = (),
    ) -> Prefill:
        """Whole prompts into slots first_slot.. (right-padded); the logits (n, vocab) of
        each prompt's last position, and the hidden states of all positions of the rows in
        `every`. `adapters[i]` is prompt i's adapter (0: the base)."""
        groups = self._groups(adapters)
        ids, lengths, positions, mask = padded(prompts, self.device)
        n, longest = len(prompts), int(positions.shape[0])
        slots = slice(first_slot, first_slot + n)

        def store(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            self.keys[layer, slots, :, :longest] = k
            self.values[layer, slots, :, :longest] = v

        x = self.decoder.embed_tokens(ids)
        for index in range(len(self.layers)):
            x = self._layer(index, x, positions[None].expand(n, -1), store, _same, mask, groups)
        last = self.decoder.norm(x[torch.arange(n, device=self.device), lengths - 1])
        logits: torch.Tensor = self.model.lm_head(last)
        hidden = {row: self.decoder.norm(x[row, : len(prompts[row])]) for row in every}
        return Prefill(logits.float(), hidden)

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (positions, vocab) of final hidden states from `prefill`."""
        logits: torch.Tensor = self.model.lm_head(hidden)
        return logits.float()

    @torch.inference_mode()
    def decode(
        self, tokens: list[int], positions: list[int], adapters: Sequence[int] | None = None
    ) -> torch.Tensor:
        """One token for each sequence in slots 0..len(tokens)-1 at its position; the logits
        (batch, vocab) of the next token."""
        groups = self._groups(adapters)
        batch = len(tokens)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        span = max(positions) + 1
        rows = torch.arange(batch, device=self.device)
        # Always masked: one query attends to its own cache prefix, which causality alone
        # would not express for a single position against `span` keys.
        mask = (torch.arange(span, device=self.device)[None, :] <= pos[:, None])[:, None, None]

        def store(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            self.keys[layer, rows, :, pos] = k[:, :, 0]
            self.values[layer, rows, :, pos] = v[:, :, 0]

        def read(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.keys[layer, :batch, :, :span], self.values[layer, :batch, :, :span]

        x = self.decoder.embed_tokens(ids)
        for index in range(len(self.layers)):
            x = self._layer(index, x, pos[:, None], store, read, mask, groups)
        logits: torch.Tensor = self.model.lm_head(self.decoder.norm(x[:, 0]))
        return logits.float()

    def move(self, source: int, target: int, length: int) -> None:
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]


def _same(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return k, v
