"""Choosing the next token from logits: greedy, or temperature with top-k and top-p."""

from __future__ import annotations

import torch

from llmops_trainer.serve.protocol import SamplingParams


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits (vocab,) with everything outside the top-k and the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (cumulative - torch.softmax(ordered, dim=-1)) >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """One token per row of logits (batch, vocab). Each request draws from its own generator,
    so a seeded request gives the same tokens whatever else is in the batch."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        scores = filter_logits(logits[row].float() / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(scores, dim=-1)
        chosen[row] = int(torch.multinomial(probs, 1, generator=generator).item())
    return [int(token) for token in chosen]
