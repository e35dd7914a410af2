"""Training samples from memory-mapped shards, in a deterministic, resumable order.

A sample is a fixed window of `context + 1` tokens of one shard (stride `context`, so each
token is a target exactly once). Samples are visited in a per-epoch permutation drawn from the
seed, and the whole schedule is a function of one integer, the number of samples consumed so
far: optimizer step s takes positions [consumed, consumed + global batch) of that stream and
rank r takes its own contiguous slice. Resuming from `consumed` therefore neither repeats nor
skips a sample, and the samples of a step do not depend on the world size.

k-fold cross-validation (`spec.crossValidation`) cuts the training split's samples into k
contiguous blocks by index (`fold_bounds`); a run trains on a `Subset` of the other blocks and
validates on its held-out block, so its sample stream never yields a held-out sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from llmops_trainer.model import IGNORE_INDEX, mask_tokens
from llmops_trainer.shards import MASK_IGNORE, MASK_TEXT, Manifest, open_mask, open_tokens

Sample = tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8] | None]


class Samples(Protocol):
    """Samples addressed 0..len-1: a split's `Windows`, or a `Subset` of them."""

    def __len__(self) -> int: ...
    def get(self, index: int) -> Sample: ...
    def source_index(self, index: int) -> int: ...


class Windows:
    """The samples of one split: windows of `context + 1` tokens, addressed by index."""

    def __init__(self, root: Path, manifest: Manifest, split: str, context: int) -> None:
        if split not in manifest.splits:
            raise ValueError(f"the dataset has no {split!r} split")
        self.context = context
        self.tokens: list[npt.NDArray[Any]] = []
        self.masks: list[npt.NDArray[np.uint8] | None] = []
        counts = []
        for shard in manifest.splits[split].shards:
            self.tokens.append(open_tokens(root, manifest, shard))
            self.masks.append(open_mask(root, shard))
            counts.append(max(0, (shard.tokens - 1) // context))
        # starts[k] is the index of shard k's first window.
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, index: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8] | None]:
        """Tokens (context + 1) of window `index`, and its loss mask for supervised data."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        offset = (index - int(self.starts[shard])) * self.context
        span = slice(offset, offset + self.context + 1)
        tokens = np.asarray(self.tokens[shard][span], dtype=np.int64)
        mask = self.masks[shard]
        return tokens, None if mask is None else np.array(mask[span], dtype=np.uint8)

    def source_index(self, index: int) -> int:
        """The sample's index in its split (itself)."""
        return index


def fold_bounds(num_samples: int, folds: int, fold: int) -> range:
    """The sample indices of fold `fold` of `folds`: contiguous blocks whose sizes differ by
    at most one and which together cover 0..num_samples-1 exactly once."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} is not one of 0..{folds - 1}")
    return range(fold * num_samples // folds, (fold + 1) * num_samples // folds)


class Subset:
    """Some samples of a split, addressed 0..len-1 in the order given."""

    def __init__(self, windows: Windows, indices: Sequence[int]) -> None:
        self.windows = windows
        self.context = windows.context
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.windows.get(int(self.indices[index]))

    def source_index(self, index: int) -> int:
        """The sample's index in the split it was taken from."""
        return int(self.indices[index])


def cross_validation_split(windows: Windows, folds: int, fold: int) -> tuple[Subset, Subset]:
    """(training samples: every fold but `fold`, held-out samples: fold `fold`) of a split."""
    if len(windows) < folds:
        raise ValueError(
            f"spec.crossValidation.folds: the training split has {len(windows)} samples, "
            f"fewer than {folds} folds; use fewer folds or a shorter context"
        )
    held = fold_bounds(len(windows), folds, fold)
    rest = [*range(held.start), *range(held.stop, len(windows))]
    return Subset(windows, rest), Subset(windows, held)


class SampleOrder:
    """Position in the endless sample stream -> sample index (a fresh permutation per epoch)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError("the split has no complete sample; use a shorter context")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = -1
        self._permutation: npt.NDArray[np.int64] = np.arange(0)

    def epoch(self, position: int) -> int:
        return position // self.num_samples

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._permutation = rng.permutation(self.num_samples)
            self._epoch = epoch
        return int(self._permutation[offset])


def rank_positions(consumed: int, global_batch: int, world_size: int, rank: int) -> range:
    """Stream positions rank `rank` trains on in the step that starts at `consumed`."""
    per_rank = global_batch // world_size
    start = consumed + rank * per_rank
    return range(start, start + per_rank)


@dataclass(frozen=True)
class Objective:
    name: str  # causal-lm, masked-lm or sft
    vocab_size: int  # the dataset's vocabulary; masked-lm adds one mask token after it
    seed: int

    @property
    def model_vocab_size(self) -> int:
        return self.vocab_size + 1 if self.name == "masked-lm" else self.vocab_size

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size


def make_batch(
    windows: Samples, indices: list[int], objective: Objective
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels), each (len(indices), context), for the objective."""
    inputs, labels = [], []
    for index in indices:
        tokens, mask = windows.get(index)
        window = torch.from_numpy(tokens)
        if objective.name == "masked-lm":
            # Masking is seeded by the sample, so it is identical after a resume.
            generator = torch.Generator().manual_seed(objective.seed * 1_000_003 + index)
            x, y = mask_tokens(
                window[:-1], objective.mask_token_id, objective.vocab_size, generator
            )
        else:
            x, y = window[:-1], window[1:].clone()
            if objective.name == "sft":
                if mask is None:
                    raise ValueError("objective sft needs a supervised dataset (loss masks)")
                # Responses (MASK_RESPONSE) and, in a mixed dataset, plain text (MASK_TEXT).
                y[torch.from_numpy(mask[1:]) == MASK_IGNORE] = IGNORE_INDEX
        inputs.append(x)
        labels.append(y)
    return torch.stack(inputs), torch.stack(labels)


def text_targets(windows: Samples, indices: list[int], objective: Objective) -> torch.Tensor:
    """For the labels make_batch returns for the same samples: True where the target token
    belongs to a plain-text document (MASK_TEXT), False where it belongs to a supervised
    record, so a mixed dataset's loss splits into the two. Every target of a dataset without
    masks is plain text."""
    kinds = []
    for index in indices:
        tokens, mask = windows.get(index)
        if mask is None:
            kinds.append(torch.ones(len(tokens) - 1, dtype=torch.bool))
            continue
        # masked-lm predicts the tokens in place, the others the next token.
        marks = mask[:-1] if objective.name == "masked-lm" else mask[1:]
        kinds.append(torch.from_numpy(marks == MASK_TEXT))
    return torch.stack(kinds)


def eval_indices(
    num_samples: int, count: int, seed: int, world_size: int, rank: int, draw: int = 0
) -> list[int]:
    """This rank's share of an evaluation subset of `count` samples of a split.

    The subset is a stretch of the split's seeded sample stream (the permutations of
    `SampleOrder`): draw 0, the fixed subset every evaluation of `evaluation.sample: fixed`
    and the final one score, is its first `count` samples; draw k (`fresh`: k counts the
    evaluations) the k-th stretch after it, so successive draws do not overlap until the
    split is used up. Every rank gets the same number, because under ZeRO-3 every forward
    pass is collective.
    """
    order = SampleOrder(num_samples, seed)
    per_rank = min(count, num_samples) // world_size
    start = draw * per_rank * world_size + rank * per_rank
    return [order.index(start + i) for i in range(per_rank)]
