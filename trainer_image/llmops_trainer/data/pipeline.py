"""The two stages of a preprocessing Job (`slice_stage`, `merge_stage`) and `run_local`,
which runs both in-process. The document steps and their order are in `steps`."""

from __future__ import annotations

from pathlib import Path

from llmops.api.dataset import Dataset
from llmops_trainer.data.merge_stage import fingerprint, run_merge
from llmops_trainer.data.registry import Options
from llmops_trainer.data.slice_stage import config_key, run_slice, slice_dir
from llmops_trainer.shards import Manifest

__all__ = [
    "Options",
    "config_key",
    "fingerprint",
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
) -> Manifest:
    """All slices, then the merge, in this process (tests and the local runtime)."""
    work = work_dir or output_dir / ".work"
    for index in range(num_slices):
        run_slice(dataset, work, index, num_slices, options)
    return run_merge(dataset, output_dir, work, num_slices, options)
