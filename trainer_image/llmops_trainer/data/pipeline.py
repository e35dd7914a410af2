"""The stages of a Dataset version, each a Job (`slice_stage`; `dedup_stage`, whose cluster
step the merge pod runs first; `merge_stage`) and `run_local`, which runs them all
in-process. The document steps and their order are in `steps`."""

from __future__ import annotations

from pathlib import Path

from llmops.api.dataset import Dataset, dedup_groups
from llmops_trainer.data.dedup_stage import run_cluster, run_dedup
from llmops_trainer.data.merge_stage import fingerprint, run_merge
from llmops_trainer.data.registry import Options
from llmops_trainer.data.slice_stage import config_key, run_slice, slice_dir
from llmops_trainer.shards import Manifest

__all__ = [
    "Options",
    "config_key",
    "fingerprint",
    "run_cluster",
    "run_dedup",
    "run_local",
    "run_merge",
    "run_slice",
    "slice_dir",
]


def run_local(
    dataset: Dataset,
    output_dir: Path,
    num_slices: int = 1,
    work_dir: Path | None = None,
    options: Options | None = None,
    groups: int | None = None,
) -> Manifest:
    """All slices, then every dedup group, then the merge, in this process (tests and
    benchmarks). `groups`: dedup pods, by default as many as the Job would have."""
    work = work_dir or output_dir / ".work"
    groups = groups or dedup_groups(dataset.spec)
    for index in range(num_slices):
        run_slice(dataset, work, index, num_slices, options)
    for group in range(groups):
        run_dedup(dataset, work, group, groups, num_slices)
    return run_merge(dataset, output_dir, work, num_slices, options, groups)
