"""The stages of a Dataset version, each a Job: `slice_stage` (Indexed, a pod per slice),
`dedup_stage` (Indexed, a pod per group of LSH bands), `prepare_stage` (one pod: the dedup
clusters, splits, decontamination index, tokenizer), `tokenize_stage` (Indexed: units of the
kept text, tokenized and sharded in parallel) and `finalize_stage` (one pod: manifest,
statistics, card); and `run_local`, which runs them all in-process. The document steps and
their order are in `steps`."""

from __future__ import annotations

from pathlib import Path

from llmops.api.dataset import Dataset, dedup_groups
from llmops_trainer.data.dedup_stage import run_cluster, run_dedup
from llmops_trainer.data.finalize_stage import run_finalize
from llmops_trainer.data.prepare_stage import decisions, fingerprint, run_prepare
from llmops_trainer.data.registry import Options
from llmops_trainer.data.slice_stage import config_key, run_slice, slice_dir
from llmops_trainer.data.tokenize_stage import run_tokenize
from llmops_trainer.shards import Manifest

__all__ = [
    "Options",
    "config_key",
    "decisions",
    "fingerprint",
    "run_cluster",
    "run_dedup",
    "run_finalize",
    "run_local",
    "run_prepare",
    "run_slice",
    "run_tokenize",
    "slice_dir",
]


def run_local(
    dataset: Dataset,
    output_dir: Path,
    num_slices: int = 1,
    work_dir: Path | None = None,
    options: Options | None = None,
    groups: int | None = None,
    pods: int | None = None,
) -> Manifest:
    """All slices, every dedup group, the prepare step, every tokenize pod and the finalize
    step, in this process (tests and benchmarks). `groups`: dedup pods, by default as many
    as the Job would have; `pods`: tokenize pods, by default one per slice."""
    work = work_dir or output_dir / ".work"
    groups = groups or dedup_groups(dataset.spec)
    for index in range(num_slices):
        run_slice(dataset, work, index, num_slices, options)
    for group in range(groups):
        run_dedup(dataset, work, group, groups, num_slices)
    run_prepare(dataset, output_dir, work, num_slices, options, groups)
    pods = pods or num_slices
    for pod in range(pods):
        run_tokenize(dataset, output_dir, work, pod, pods)
    return run_finalize(dataset, output_dir, work, num_slices, options)
