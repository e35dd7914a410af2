"""Choosing the next token from logits: logit bias and presence/frequency penalties, then
greedy, or temperature with top-k and top-p; and the log-probabilities clients ask for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmops_trainer.serve.protocol import SamplingParams

# What vLLM reports instead of -inf (JSON has no infinity).
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log-probability of one token, and of the likeliest alternatives at its
    position (most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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


class TokenCounts:
    """How often each token id occurs in a generation's output, kept up to date token by
    token, so the penalties cost the same at the thousandth token as at the first."""

    def __init__(self, vocab_size: int, tokens: Sequence[int] = ()) -> None:
        self.counts = torch.zeros(vocab_size, dtype=torch.int32)
        for token in tokens:
            self.add(token)

    def add(self, token: int) -> None:
        if 0 <= token < self.counts.shape[0]:
            self.counts[token] += 1


def adjust(
    logits: torch.Tensor, params: SamplingParams, output: TokenCounts | None
) -> torch.Tensor:
    """One row's logits (vocab,) with the request's logit bias and OpenAI's penalties on the
    tokens generated so far: logit - count * frequency_penalty - (count > 0) * presence."""
    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], device=logits.device)
        bias = torch.tensor([b for _, b in params.logit_bias], device=logits.device)
        logits.index_add_(0, ids, bias.to(logits.dtype))
    if output is not None and (params.presence_penalty or params.frequency_penalty):
        counts = output.counts[: logits.shape[-1]].to(device=logits.device, dtype=logits.dtype)
        logits[: counts.shape[0]] -= (
            counts * params.frequency_penalty + (counts > 0) * params.presence_penalty
        )
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    outputs: Sequence[TokenCounts | None] | None = None,
) -> list[int]:
    """One token per row of logits (batch, vocab). Each request draws from its own generator,
    so a seeded request gives the same tokens whatever else is in the batch. `outputs` count
    the tokens each row generated so far (for the penalties)."""
    # max's indices: argmax's (the first maximum of each row), in a third of the time on CPU.
    chosen = logits.max(dim=-1).indices.tolist()
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.greedy and not p.penalised:
            continue
        scores = adjust(logits[row].float(), p, outputs[row] if outputs else None)
        if p.greedy:
            chosen[row] = int(scores.argmax().item())
            continue
        scores = filter_logits(scores / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(scores, dim=-1)
        chosen[row] = int(torch.multinomial(probs, 1, generator=generator).item())
    return [int(token) for token in chosen]


def logprobs_of(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """The log-probabilities under logits (n, vocab) of tokens[i] at row i, each with the
    `top` likeliest alternatives of its row."""
    if not tokens:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(tokens), device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, index)[:, 0].clamp(min=MIN_LOGPROB).tolist()
    alternatives: list[tuple[tuple[int, float], ...]] = [()] * len(tokens)
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
        values = values.clamp(min=MIN_LOGPROB)
        alternatives = [
            tuple(zip(row_ids, row_values, strict=True))
            for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    return [
        TokenLogprob(int(token), float(lp), alt)
        for token, lp, alt in zip(tokens, chosen, alternatives, strict=True)
    ]
