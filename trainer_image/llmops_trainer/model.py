"""A GPT-style transformer, small enough to read in one sitting.

One model serves the three objectives: `causal-lm` and `sft` use causal attention (sft only
changes which tokens count towards the loss), `masked-lm` uses bidirectional attention and
predicts masked positions. Parameter names follow GPT-2's (`transformer.h.0.attn.c_attn`, ...),
so exporting to the Hugging Face layout is a matter of transposing a few matrices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # label of positions that do not count towards the loss


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    context_length: int = 256
    num_layers: int = 6
    num_heads: int = 6
    hidden_size: int = 384
    dropout: float = 0.0
    causal: bool = True  # False for masked-lm (an encoder)
    # GPT-2 has biases in every linear layer and LayerNorm and the tanh GELU ("gelu_new");
    # nanoGPT's small configurations drop the biases and use the exact GELU, which is
    # cheaper per step on CPUs (the tanh form costs about 3x the exact one per element).
    bias: bool = True
    activation: str = "gelu-tanh"  # or "gelu" (exact)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dropout(p: float) -> nn.Module:
    """Dropout, or nothing when p is 0: torch's dropout still costs a kernel each way."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class SelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.causal = config.causal
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.resid_dropout = dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        # (batch, heads, length, head_dim) as scaled_dot_product_attention expects.
        q, k, v = (t.view(batch, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal
        )
        y = y.transpose(1, 2).contiguous().view(batch, length, width)
        out: torch.Tensor = self.resid_dropout(self.c_proj(y))
        return out


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=config.bias)
        # GPT-2's "gelu_new" is the tanh approximation; matching it keeps the export exact.
        self.act = nn.GELU(approximate="tanh" if config.activation == "gelu-tanh" else "none")
        self.c_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=config.bias)
        self.dropout = dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.dropout(self.c_proj(self.act(self.c_fc(x))))
        return out


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        out: torch.Tensor = x + self.mlp(self.ln_2(x))
        return out


class Transformer(nn.Module):
    """Embeddings, blocks and the final norm (GPT-2's `transformer` submodule)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.context_length, config.hidden_size)
        self.drop = dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, bias=config.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x: torch.Tensor = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.h:
            x = block(x)
        out: torch.Tensor = self.ln_f(x)
        return out


ACTIVATIONS = ("gelu-tanh", "gelu")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"activation {config.activation!r} is not one of {ACTIVATIONS}")
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Weight tying: the output projection is the token embedding (fewer parameters, and
        # what GPT-2 does, so the export needs no separate head).
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance
        # independent of depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameters, counting the tied head once; without position embeddings by default
        (they do no matmul work, which is what the count is used for)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.transformer.wpe.weight.numel()
        return total

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, length, vocab) for token ids (batch, length)."""
        if idx.shape[1] > self.config.context_length:
            raise ValueError(
                f"sequence of {idx.shape[1]} exceeds context {self.config.context_length}"
            )
        logits: torch.Tensor = self.lm_head(self.transformer(idx))
        return logits

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation; always runs exactly `new_tokens` forward passes, so that under
        ZeRO-3 every rank takes part in the same number of (parameter-gathering) forwards."""
        for _ in range(new_tokens):
            window = idx[:, -self.config.context_length :]
            next_token = self(window)[:, -1, :].argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, next_token], dim=1)
        return idx


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not IGNORE_INDEX."""
    return F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX
    )


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """(summed loss, counted tokens, correctly predicted tokens) for aggregation across ranks."""
    flat_logits = logits.float().view(-1, logits.shape[-1])
    flat_labels = labels.view(-1)
    counted = flat_labels != IGNORE_INDEX
    loss_sum = F.cross_entropy(
        flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    ).item()
    correct = ((flat_logits.argmax(dim=-1) == flat_labels) & counted).sum().item()
    return float(loss_sum), int(counted.sum().item()), int(correct)


def loss_by_kind(logits: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[loss sum, tokens] of the counted targets that are plain text (`text` True), then of
    the others (supervised records), as float64, for summing over steps and ranks."""
    flat_labels = labels.view(-1)
    losses = F.cross_entropy(
        logits.detach().float().view(-1, logits.shape[-1]),
        flat_labels,
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    counted = flat_labels != IGNORE_INDEX
    plain = text.view(-1).to(counted.device) & counted
    supervised = counted & ~plain
    return torch.stack(
        [losses[plain].sum(), plain.sum(), losses[supervised].sum(), supervised.sum()]
    ).to(dtype=torch.float64, device="cpu")


def kind_means(sums: torch.Tensor) -> tuple[float | None, float | None]:
    """(plain-text loss, supervised loss) from loss_by_kind's sums; None for a kind with no
    counted token."""
    text_sum, text_n, sup_sum, sup_n = sums.tolist()
    return (text_sum / text_n if text_n else None, sup_sum / sup_n if sup_n else None)


def mask_tokens(
    tokens: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: pick `probability` of the positions as targets; of those, 80% become the
    mask token, 10% a random token and 10% stay as they are. Returns (inputs, labels)."""
    labels = tokens.clone()
    targets = torch.rand(tokens.shape, generator=generator) < probability
    labels[~targets] = IGNORE_INDEX
    inputs = tokens.clone()
    draw = torch.rand(tokens.shape, generator=generator)
    inputs[targets & (draw < 0.8)] = mask_token_id
    randomize = targets & (draw >= 0.8) & (draw < 0.9)
    random_tokens = torch.randint(vocab_size, tokens.shape, generator=generator)
    inputs[randomize] = random_tokens[randomize]
    return inputs, labels


def flops_per_token(config: GPTConfig, num_parameters: int) -> float:
    """Training FLOPs per token: 6N for the weight matmuls (forward 2N, backward 4N) plus
    12 * layers * width * context for attention scores (PaLM appendix B, as nanoGPT)."""
    return 6.0 * num_parameters + 12.0 * config.num_layers * config.hidden_size * (
        config.context_length
    )
