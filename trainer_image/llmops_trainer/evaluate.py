"""Evaluation: loss, perplexity and token accuracy on a split, BLEU of generated text, and the
worst-predicted passages. Every rank calls these functions with its own share of the samples
(the same number on each, since ZeRO-3 forwards are collective); results are reduced to all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from llmops_trainer.batches import Objective, Samples, make_batch, text_targets
from llmops_trainer.model import GPT, IGNORE_INDEX, kind_means, loss_by_kind
from llmops_trainer.shards import MASK_RESPONSE, Manifest, open_mask, open_tokens

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SplitScores:
    loss: float
    perplexity: float
    accuracy: float
    tokens: int
    # (sample index, mean loss) of this evaluation's samples, all ranks, worst first.
    per_sample: list[tuple[int, float]] = field(default_factory=list)
    # A mixed dataset (by_kind): the mean loss of the plain-text and supervised targets.
    loss_text: float | None = None
    loss_supervised: float | None = None


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 80.0))  # exp(80) already means "hopeless"; avoids inf in JSON


@torch.no_grad()
def score_split(
    forward: Forward,
    windows: Samples,
    indices: list[int],
    objective: Objective,
    micro_batch: int,
    device: torch.device,
    keep_per_sample: bool = False,
    by_kind: bool = False,
) -> SplitScores:
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, tokens, correct
    kinds = torch.zeros(4, dtype=torch.float64)  # by_kind: loss_by_kind's sums
    per_sample: list[tuple[int, float]] = []
    for start in range(0, len(indices), micro_batch):
        chunk = indices[start : start + micro_batch]
        inputs, labels = make_batch(windows, chunk, objective)
        logits = forward(inputs.to(device)).float().cpu()
        losses = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counted = labels != IGNORE_INDEX
        correct = (logits.argmax(dim=-1) == labels) & counted
        totals += torch.tensor(
            [losses.sum().item(), counted.sum().item(), correct.sum().item()],
            dtype=torch.float64,
        )
        if by_kind:
            kinds += loss_by_kind(logits, labels, text_targets(windows, chunk, objective))
        if keep_per_sample:
            sample_tokens = counted.sum(dim=1).clamp(min=1)
            means = (losses.sum(dim=1) / sample_tokens).tolist()
            per_sample.extend(zip(chunk, means, strict=True))
    if dist.is_initialized():
        dist.all_reduce(totals)
        if by_kind:
            dist.all_reduce(kinds)
        if keep_per_sample:
            gathered: list[list[tuple[int, float]]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, per_sample)
            per_sample = [item for part in gathered for item in part]
    loss_sum, tokens, correct = totals.tolist()
    loss = loss_sum / max(tokens, 1)
    per_sample.sort(key=lambda item: item[1], reverse=True)
    text, supervised = kind_means(kinds) if by_kind else (None, None)
    return SplitScores(
        loss, _perplexity(loss), correct / max(tokens, 1), int(tokens), per_sample, text, supervised
    )


def documents(
    root: Path, manifest: Manifest, split: str
) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8] | None]]:
    """Documents of a split (without their end-of-sequence token), with their loss masks."""
    for shard in manifest.splits[split].shards:
        tokens = open_tokens(root, manifest, shard)
        mask = open_mask(root, shard)
        ends = np.flatnonzero(np.asarray(tokens) == manifest.eos_token_id)
        start = 0
        for end in ends:
            doc = np.asarray(tokens[start:end], dtype=np.int64)
            yield doc, None if mask is None else np.asarray(mask[start:end], dtype=np.uint8)
            start = int(end) + 1


@dataclass(frozen=True)
class GenerationTask:
    """Prompts and reference continuations for BLEU."""

    kind: str  # "responses" (sft) or "continuation"
    prompts: list[list[int]]
    references: list[list[int]]


def generation_task(
    root: Path, manifest: Manifest, split: str, context: int, count: int
) -> GenerationTask:
    """For supervised data, prompt -> reference response; otherwise the first half of a
    held-out passage -> its second half (at most context/2 tokens each)."""
    half = max(1, context // 2)
    prompts: list[list[int]] = []
    references: list[list[int]] = []
    supervised = manifest.supervised
    for doc, mask in documents(root, manifest, split):
        if len(prompts) >= count:
            break
        if supervised and mask is not None:
            response = np.flatnonzero(mask == MASK_RESPONSE)  # plain text has none: skipped
            if not response.size or response[0] == 0:
                continue
            cut = int(response[0])
            prompt, reference = doc[:cut][-half:], doc[cut:][:half]
        else:
            if len(doc) < 8:
                continue
            cut = min(len(doc) // 2, half)
            prompt, reference = doc[:cut], doc[cut : 2 * cut]
        prompts.append(prompt.tolist())
        references.append(reference.tolist())
    return GenerationTask("responses" if supervised else "continuation", prompts, references)


@torch.no_grad()
def generate_all(
    model: GPT, prompts: list[list[int]], new_tokens: int, device: torch.device
) -> list[list[int]]:
    return [
        model.generate(torch.tensor([prompt], device=device), new_tokens)[0, len(prompt) :].tolist()
        for prompt in prompts
    ]


def bleu(
    model: GPT,
    task: GenerationTask,
    eos_token_id: int,
    decode: Callable[[list[int]], str],
    device: torch.device,
) -> tuple[float | None, list[dict[str, str]]]:
    """Corpus BLEU (sacrebleu) of greedy generations against the references, computed over
    all ranks' shares; also a few examples for the report."""
    import sacrebleu

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    per_rank = len(task.prompts) // world
    if per_rank == 0:
        return None, []
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    new_tokens = max(len(task.references[i]) for i in range(world * per_rank))
    outputs = generate_all(model, [task.prompts[i] for i in mine], new_tokens, device)
    pairs = []
    for i, output in zip(mine, outputs, strict=True):
        if eos_token_id in output:
            output = output[: output.index(eos_token_id)]
        pairs.append((decode(task.prompts[i]), decode(output), decode(task.references[i])))
    if dist.is_initialized():
        gathered: list[list[tuple[str, str, str]]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, pairs)
        pairs = [pair for part in gathered for pair in part]
    score = sacrebleu.corpus_bleu([p[1] for p in pairs], [[p[2] for p in pairs]]).score
    examples = [
        {"prompt": prompt, "generated": generated, "reference": reference}
        for prompt, generated, reference in pairs[:5]
    ]
    return float(score), examples


def decoder(tokenizer_path: Path) -> Callable[[list[int]], str]:
    """Token ids -> text with the dataset's tokenizer; ids as words when there is none."""
    if tokenizer_path.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        return lambda ids: tokenizer.decode(ids)
    return lambda ids: " ".join(str(i) for i in ids)


def worst_passages(
    scores: SplitScores,
    windows: Samples,
    decode: Callable[[list[int]], str],
    count: int = 10,
) -> list[dict[str, Any]]:
    """The held-out windows the model predicts worst, for error analysis."""
    report = []
    for index, loss in scores.per_sample[:count]:
        tokens, _ = windows.get(index)
        report.append(
            {
                "sample": windows.source_index(index),
                "loss": loss,
                "perplexity": _perplexity(loss),
                "text": decode(tokens.tolist()),
            }
        )
    return report


def unigram_perplexity(root: Path, manifest: Manifest, train: str, split: str) -> float:
    """Perplexity of `split` under token frequencies counted on `train` (add-one smoothed):
    the baseline a language model has to beat by a wide margin to have learned anything
    beyond which tokens are common."""
    counts = np.zeros(manifest.vocab_size, dtype=np.int64)
    for shard in manifest.splits[train].shards:
        counts += np.bincount(open_tokens(root, manifest, shard), minlength=manifest.vocab_size)
    log_probs = np.log(counts + 1.0) - math.log(float(counts.sum() + manifest.vocab_size))
    total, n = 0.0, 0
    for shard in manifest.splits[split].shards:
        tokens = np.asarray(open_tokens(root, manifest, shard))
        total -= float(log_probs[tokens].sum())
        n += tokens.size
    return math.exp(total / max(n, 1))
