"""Prefill and single-token decoding of a `transformers` Llama-family model (Llama, Mistral,
Qwen2, Qwen3) with the engine's slot-based KV cache.

The same contract as `engine.KVCacheModel` for the built-in GPT: running sequences occupy
cache slots 0..B-1, a step reads the cache as a slice, and a finished sequence's slot is
refilled by moving the last one. The layers' own weights and rotary embedding are used with
the same operations as `transformers` (tests hold the logits to the models' own forward), in
fewer calls: the projections reading one input are one matmul over their stacked weights
(the modules' weights become views of it), RMSNorm is `F.rms_norm`, and the rotation is
computed once for all positions when the model is loaded (a lookup per step; per step for
the rotary kinds that depend on the sequence's length). A base-model layer runs from tensors
gathered once (`_Plain`), with no module calls. The attention over the cache is ours: prompts of
one length and decoding steps with every row at one position need no mask (SDPA's fused
kernels); a decoding query's heads sharing a key/value head attend as one. Grouped-query
attention keeps the cache at the key/value head count. LoRA adapters (serve/adapters.py) are
applied per row (their rows take the per-projection path): a batch mixes sequences of several
adapters and of the base.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llmops_trainer.serve.adapters import Adapter, check_fits

# An adapter's low-rank updates: (layer, module) -> (A, B with the scale folded in).
Updates = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
# Rows of a batch per adapter (1-based; the base's rows are not listed).
Groups = list[tuple[int, torch.Tensor]]
# The (cos, sin) of the rotary embedding at a batch's positions, shared by all the layers
# (`DecoderKVCacheModel._rotary`).
Rotary = tuple[torch.Tensor, torch.Tensor]


class _Causal:
    """Plain causal attention (a prefill of prompts of one length): no mask tensor, so SDPA
    may use its fused kernels."""

    def __repr__(self) -> str:
        return "CAUSAL"


CAUSAL = _Causal()
# A boolean mask (True: attend), CAUSAL, or None: every query sees every key given.
Mask = torch.Tensor | _Causal | None
# Linear modules of one input as one: the stacked weight and bias (`_fuse`).
Fused = tuple[torch.Tensor, torch.Tensor | None]

# Families whose decoder layer is: x + o_proj(attn(rope(q, k), v)) on input_layernorm(x),
# then x + mlp(post_attention_layernorm(x)), scaled by 1/sqrt(head_dim).
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def padded(
    prompts: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prompts right-padded for one prefill: (ids, lengths, positions, mask); the mask hides
    padding keys and keeps causality (None for prompts of one length, a single prompt
    included: plain causal attention, which SDPA runs with its fused kernels)."""
    n, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros((n, longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    positions = torch.arange(longest, device=device)
    mask: torch.Tensor | None = None
    if any(len(p) != longest for p in prompts):
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
        # The projections reading one input, stored as one weight (the modules' own weights
        # become views of it: no copy), so the base model runs one matmul for them. Each
        # output column is the same dot product either way.
        self._qkv = [
            _fuse(layer.self_attn, ("q_proj", "k_proj", "v_proj")) for layer in self.layers
        ]
        self._gate_up = [
            _fuse(layer.mlp, ("gate_proj", "up_proj")) if _gated(layer.mlp) else None
            for layer in self.layers
        ]
        self._shapes = shapes
        self._dtype = dtype
        self._plain = [self._plain_of(index) for index in range(len(self.layers))]
        self._table = self._rotary_table()
        # Slot i + 1 holds an adapter's updates; a dropped slot (an adapter replaced by a
        # newer version, once no sequence uses it) is None. Slots are never reused.
        self.adapters: list[Updates | None] = []
        for adapter in adapters:
            self.add_adapter(adapter)

    def add_adapter(self, adapter: Adapter) -> int:
        """Install an adapter's updates (checked against this base) in a new slot: its
        1-based number, what a row's adapter id names. Safe beside a running step: the
        step never reads a slot no sequence names."""
        check_fits(adapter, self._shapes)
        updates = {
            where: (
                a.to(device=self.device, dtype=self._dtype),
                b.to(device=self.device, dtype=self._dtype),
            )
            for where, (a, b) in adapter.updates.items()
        }
        self.adapters.append(updates)
        return len(self.adapters)

    def drop_adapter(self, slot: int) -> None:
        """Free a slot no sequence uses any more."""
        self.adapters[slot - 1] = None

    def _plain_of(self, index: int) -> _Plain | None:
        """The tensors of layer `index` for the base model's path, or None when the layer
        needs its modules (a Qwen3 head norm, another norm or MLP, a bias on some of q/k/v)."""
        layer = self.layers[index]
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = self._qkv[index], self._gate_up[index]
        norm1, norm2 = _rms_of(layer.input_layernorm), _rms_of(layer.post_attention_layernorm)
        if qkv is None or gate_up is None or norm1 is None or norm2 is None:
            return None
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
            return None
        act = mlp.act_fn
        silu = type(act).__name__ in ("SiLU", "SiLUActivation")  # both call F.silu
        o, down = attn.o_proj, mlp.down_proj
        return _Plain(
            norm1, qkv, (o.weight, o.bias), norm2, gate_up, (down.weight, down.bias),
            F.silu if silu else act,
        )  # fmt: skip

    @torch.no_grad()
    def _rotary_table(self) -> Rotary | None:
        """`_rotary` of every position (context, head_dim), computed by the model's own
        rotary embedding (elementwise per position, so a lookup gives the same values); None
        for the kinds whose frequencies depend on the batch's positions (dynamic, longrope)."""
        rotary = self.decoder.rotary_emb
        kind = getattr(rotary, "rope_type", "default")
        if not isinstance(kind, str) or "dynamic" in kind or kind == "longrope":
            return None
        probe = torch.zeros(1, device=self.device, dtype=self._dtype)  # its dtype and device
        positions = torch.arange(self.context_length, device=self.device)[None]
        cos, sin = rotary(probe, positions)
        half = sin.shape[-1] // 2
        signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos[0], signed[0]

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
        y: torch.Tensor = F.linear(x, module.weight, module.bias)
        for adapter, rows in groups:
            updates = self.adapters[adapter - 1]
            assert updates is not None, f"adapter slot {adapter} was dropped while in use"
            update = updates.get((layer, name))
            if update is not None:
                a, b = update
                y[rows] += (x[rows] @ a.T) @ b.T
        return y

    def _project(
        self, index: int, attn: Any, h: torch.Tensor, rotary: Rotary, groups: Groups
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (batch, heads, length, head_dim) with rotary positions."""
        batch, length, _ = h.shape
        heads, kv_heads = self.heads, self.kv_heads
        cos, sin = rotary
        fused = self._qkv[index]
        if not groups and fused is not None and not hasattr(attn, "q_norm"):
            # The base model: one matmul for the three projections, and one rotation for
            # the queries and keys together.
            qkv = F.linear(h, *fused).view(batch, length, -1, self.head_dim)
            qk = _rotate(qkv[:, :, : heads + kv_heads], cos, sin)
            q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads :]
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        def project(name: str) -> torch.Tensor:
            module = getattr(attn, name)
            out = self._linear(index, f"self_attn.{name}", module, h, groups)
            return out.view(batch, length, -1, self.head_dim)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
            q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask
    ) -> torch.Tensor:
        """Attention of queries (batch, heads, length, head_dim) over keys and values at the
        key/value head count. `mask`: a boolean mask, CAUSAL (a prefill of prompts of one
        length), or None (one new position per row, every row seeing all `span` keys)."""
        batch, heads, length, head_dim = q.shape
        causal = isinstance(mask, _Causal)
        given = None if isinstance(mask, _Causal) else mask
        if length == 1 and self.kv_heads != heads:
            # Decoding: the query heads sharing a key/value head become that head's query
            # positions, so one plain attention serves the group (no copies of the cache,
            # SDPA's fast kernel). A mask (batch, 1, 1, span) broadcasts over the group.
            grouped = q.reshape(batch, self.kv_heads, heads // self.kv_heads, head_dim)
            y = F.scaled_dot_product_attention(grouped, k, v, attn_mask=given)
            return y.view(batch, heads, 1, head_dim)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=given,
            is_causal=causal and length > 1,
            enable_gqa=self.kv_heads != heads,
        )

    def _mlp(self, index: int, mlp: Any, h: torch.Tensor, groups: Groups) -> torch.Tensor:
        fused = self._gate_up[index]
        if not groups and fused is not None:
            gate, up = F.linear(h, *fused).chunk(2, dim=-1)
            down = mlp.down_proj
            return F.linear(mlp.act_fn(gate) * up, down.weight, down.bias)
        if not groups:
            out: torch.Tensor = mlp(h)
            return out
        # The gated MLP of these families, with each projection adapted per row.
        gate = self._linear(index, "mlp.gate_proj", mlp.gate_proj, h, groups)
        up = self._linear(index, "mlp.up_proj", mlp.up_proj, h, groups)
        return self._linear(index, "mlp.down_proj", mlp.down_proj, mlp.act_fn(gate) * up, groups)

    def _plain_layer(
        self, index: int, x: torch.Tensor, rotary: Rotary, store: Any, read: Any, mask: Mask
    ) -> torch.Tensor:
        """`_layer` of the base model from the tensors of `_Plain`: the same operations,
        without the modules' calls and attribute lookups."""
        plain = self._plain[index]
        assert plain is not None
        batch, length, _ = x.shape
        heads, kv_heads = self.heads, self.kv_heads
        cos, sin = rotary
        qkv = F.linear(_rms(x, *plain.norm1), *plain.qkv).view(batch, length, -1, self.head_dim)
        qk = _rotate(qkv[:, :, : heads + kv_heads], cos, sin)
        q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
        v = qkv[:, :, heads + kv_heads :].transpose(1, 2)
        store(index, k, v)
        k, v = read(index, k, v)
        y = self._attend(q, k, v, mask).transpose(1, 2).reshape(batch, length, -1)
        x = x + F.linear(y, *plain.o)
        gate, up = F.linear(_rms(x, *plain.norm2), *plain.gate_up).chunk(2, dim=-1)
        out: torch.Tensor = x + F.linear(plain.act(gate) * up, *plain.down)
        return out

    def _layer(
        self,
        index: int,
        x: torch.Tensor,
        rotary: Rotary,
        store: Any,
        read: Any,
        mask: Mask,
        groups: Groups,
    ) -> torch.Tensor:
        if not groups and self._plain[index] is not None:
            return self._plain_layer(index, x, rotary, store, read, mask)
        layer = self.layers[index]
        attn = layer.self_attn
        q, k, v = self._project(index, attn, _norm(layer.input_layernorm, x), rotary, groups)
        store(index, k, v)
        k, v = read(index, k, v)
        y = self._attend(q, k, v, mask).transpose(1, 2).reshape(*x.shape[:2], -1)
        x = x + self._linear(index, "self_attn.o_proj", attn.o_proj, y, groups)
        out: torch.Tensor = x + self._mlp(
            index, layer.mlp, _norm(layer.post_attention_layernorm, x), groups
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
        # The rotation depends on positions only: computed once for all the layers.
        rotary = self._rotary(x, positions[None].expand(n, -1))
        attend: Mask = CAUSAL if mask is None else mask
        for index in range(len(self.layers)):
            x = self._layer(index, x, rotary, store, _same, attend, groups)
        last = _norm(self.decoder.norm, x[torch.arange(n, device=self.device), lengths - 1])
        logits: torch.Tensor = self.model.lm_head(last)
        hidden = {row: _norm(self.decoder.norm, x[row, : len(prompts[row])]) for row in every}
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
        store, mask = self._decode_store(batch, positions, pos, span)

        def read(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.keys[layer, :batch, :, :span], self.values[layer, :batch, :, :span]

        x = self.decoder.embed_tokens(ids)
        rotary = self._rotary(x, pos[:, None])  # once for all the layers
        for index in range(len(self.layers)):
            x = self._layer(index, x, rotary, store, read, mask, groups)
        logits: torch.Tensor = self.model.lm_head(_norm(self.decoder.norm, x[:, 0]))
        return logits.float()

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> Rotary:
        """The model's rotary embedding at positions (batch, length) as `_rotate` takes it:
        over (batch, length, heads, head_dim), with the sine's first half negated."""
        if self._table is not None:
            cos_table, sin_table = self._table
            return cos_table[positions].unsqueeze(2), sin_table[positions].unsqueeze(2)
        cos, sin = self.decoder.rotary_emb(x, positions)
        half = sin.shape[-1] // 2
        signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.unsqueeze(2), signed.unsqueeze(2)

    def _decode_store(
        self, batch: int, positions: list[int], pos: torch.Tensor, span: int
    ) -> tuple[Callable[[int, torch.Tensor, torch.Tensor], None], Mask]:
        """How a decoding step writes its new keys and values, and the attention mask. Rows
        at one position (a batch admitted together) write a slice and need no mask: each
        query sees exactly the `span` keys of its own slot. Otherwise each row writes at its
        own position and a mask hides the stale cache beyond each row's length."""
        if all(p == positions[0] for p in positions):
            at = positions[0]

            def store_at(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
                self.keys[layer, :batch, :, at] = k[:, :, 0]
                self.values[layer, :batch, :, at] = v[:, :, 0]

            return store_at, None
        rows = torch.arange(batch, device=self.device)

        def store_rows(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            self.keys[layer, rows, :, pos] = k[:, :, 0]
            self.values[layer, rows, :, pos] = v[:, :, 0]

        mask = (torch.arange(span, device=self.device)[None, :] <= pos[:, None])[:, None, None]
        return store_rows, mask

    def move(self, source: int, target: int, length: int) -> None:
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]


# An RMSNorm as `_rms` takes it: (weight, epsilon).
Norm = tuple[torch.Tensor, float]


@dataclass(frozen=True)
class _Plain:
    """A decoder layer's tensors for the base model's path (`DecoderKVCacheModel._plain_layer`):
    the two norms, the fused q/k/v and gate/up projections, o and down, the activation."""

    norm1: Norm
    qkv: Fused
    o: Fused
    norm2: Norm
    gate_up: Fused
    down: Fused
    act: Callable[[torch.Tensor], torch.Tensor]


def _rms_of(module: Any) -> Norm | None:
    """The families' RMSNorm as (weight, epsilon); None for another norm (`_norm`)."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None or not type(module).__name__.endswith("RMSNorm"):
        return None
    return module.weight, eps


def _fuse(parent: Any, names: Sequence[str]) -> Fused | None:
    """One weight (and bias) for linear modules of one input, stacked along their outputs;
    each module's weight (and bias) becomes a view of its rows, so nothing is copied. None
    when only some of them have a bias (no family here does that)."""
    modules = [getattr(parent, name) for name in names]
    biases = [m.bias for m in modules]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    with torch.no_grad():
        weight = torch.cat([m.weight for m in modules])
        bias = None if biases[0] is None else torch.cat(biases)
        start = 0
        for m in modules:
            end = start + m.weight.shape[0]
            m.weight = torch.nn.Parameter(weight[start:end], requires_grad=False)
            if m.bias is not None:
                assert bias is not None
                m.bias = torch.nn.Parameter(bias[start:end], requires_grad=False)
            start = end
    return weight, bias


def _gated(mlp: Any) -> bool:
    """The gated MLP of these families: down_proj(act_fn(gate_proj(x)) * up_proj(x))."""
    return all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _norm(module: Any, x: torch.Tensor) -> torch.Tensor:
    """The families' RMSNorm (weight * normalised x, normalised in float32) with one fused
    kernel instead of the module's six operations; other norms through the module."""
    norm = _rms_of(module)
    if norm is None:
        out: torch.Tensor = module(x)
        return out
    return _rms(x, *norm)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with weight: normalised in float32, then weighted in x's dtype."""
    if x.dtype == weight.dtype == torch.float32:  # nothing to convert: the weight fused too
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    normalised = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return weight * normalised.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of these families on x (batch, length, heads, head_dim):
    `apply_rotary_pos_emb`'s x * cos + rotate_half(x) * sin, where rotate_half(x) is
    (-x2, x1); here (x2, x1) is a roll of x and the sign is in the sine's first half
    (`_rotary`): the same products, in two operations instead of four."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _same(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return k, v
